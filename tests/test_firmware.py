"""The firmware bundle: loading, every validation error, and the demo build."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import zlib
from pathlib import Path

import pytest
from esptool.bin_image import LoadFirmwareImage
from esptool.loader import ESPLoader

from station.config import FirmwareSection, ImageSpec
from station.demo import esp_image, make_demo_firmware, partition_table
from station.errors import FirmwareError
from station.flash import FirmwareBundle, load_firmware, xor_checksum
from station.flash.firmware import parse_image

CHIPS = ("esp32", "esp32s3", "esp32c3")


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An esp32 demo build (flasher_args.json path), shared read-only by the tests."""
    return make_demo_firmware(tmp_path_factory.mktemp("build"), chip="esp32")


def images(chip: str, *specs: tuple[int, Path]) -> FirmwareSection:
    return FirmwareSection(chip=chip, flasher_args=None,  # type: ignore[arg-type]
                           images=tuple(ImageSpec(offset=o, file=f) for o, f in specs))


def from_args(chip: str, path: Path) -> FirmwareSection:
    return FirmwareSection(chip=chip, flasher_args=path, images=())  # type: ignore[arg-type]


def demo_specs(build: Path) -> list[tuple[int, Path]]:
    d = build.parent
    return [(0x1000, d / "bootloader/bootloader.bin"),
            (0x8000, d / "partition_table/partition-table.bin"),
            (0x10000, d / "app.bin")]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def expect(section: FirmwareSection, file: Path, key: str, words: str,
           flash_size_hint: int | None = None) -> FirmwareError:
    with pytest.raises(FirmwareError) as info:
        load_firmware(section, flash_size_hint)
    err = info.value
    assert err.path == str(file), str(err)
    assert err.key == key, str(err)
    assert words in err.reason, str(err)
    assert "\n" not in str(err)
    return err


# -- loading ---------------------------------------------------------------------------


def test_bundle_from_flasher_args(build: Path) -> None:
    b = load_firmware(from_args("esp32", build))
    assert b.chip == "esp32"
    assert [(r.name, r.offset) for r in b.regions] == [
        ("bootloader", 0x1000), ("partition-table", 0x8000), ("app", 0x10000)]
    for region, (_, file) in zip(b.regions, demo_specs(build), strict=True):
        raw = file.read_bytes()
        assert region.data[:len(raw)] == raw and len(region.data) % 4 == 0
        assert zlib.decompress(region.compressed) == region.data
        assert region.md5 == hashlib.md5(region.data).hexdigest()
    assert b.total_bytes == sum(len(r.data) for r in b.regions)
    assert b.compressed_bytes < b.total_bytes
    assert b.flash_size == 4 << 20
    assert b.end == 0x10000 + len(b.regions[2].data)
    line = b.describe()
    assert "esp32" in line and b.sha256[:12] in line and "\n" not in line


def test_bundle_from_images_matches_flasher_args(build: Path) -> None:
    a = load_firmware(from_args("esp32", build))
    b = load_firmware(images("esp32", *reversed(demo_specs(build))))
    assert b.sha256 == a.sha256
    assert [r.offset for r in b.regions] == [0x1000, 0x8000, 0x10000]
    assert [r.name for r in b.regions] == ["bootloader", "partition-table", "app"]


def test_sha256_is_stable_and_covers_offsets_and_contents(build: Path, tmp_path: Path) -> None:
    first = load_firmware(from_args("esp32", build)).sha256
    assert load_firmware(from_args("esp32", build)).sha256 == first
    other = make_demo_firmware(tmp_path / "other", chip="esp32", seed=2)
    assert load_firmware(from_args("esp32", other)).sha256 != first
    # same bytes at another offset is other firmware
    data = write(tmp_path / "data.bin", b"\x01" * 4096)
    at = [load_firmware(images("esp32", (off, data))).sha256 for off in (0x200000, 0x201000)]
    assert at[0] != at[1]


def test_partitions_and_lookup(build: Path) -> None:
    b = load_firmware(from_args("esp32", build))
    assert [(p.label, p.type_name, p.offset, p.size) for p in b.partitions] == [
        ("nvs", "data", 0x9000, 0x6000), ("phy_init", "data", 0xF000, 0x1000),
        ("factory", "app", 0x10000, 0x170000)]
    nvs = b.partition("nvs")
    assert (nvs.subtype, nvs.flags, nvs.end) == (0x02, 0, 0xF000)
    with pytest.raises(FirmwareError) as info:
        b.partition("certs")
    assert "'certs'" in info.value.reason
    assert "nvs, phy_init, factory" in info.value.reason


def test_no_partition_table_lookup_says_so(tmp_path: Path) -> None:
    b = load_firmware(images("esp32", (0x200000, write(tmp_path / "d.bin", b"x" * 100))))
    assert b.partitions == ()
    with pytest.raises(FirmwareError, match="no partition table"):
        b.partition("nvs")


def test_flash_size_from_flasher_args(build: Path, tmp_path: Path) -> None:
    doc = json.loads(build.read_text())
    doc["flash_settings"]["flash_size"] = "8MB"
    doc["flash_files"]["0x600000"] = "big.bin"
    write(build.parent / "big.bin", b"\x00" * 0x10000)
    args = tmp_path / "flasher_args.json"
    args.write_text(json.dumps(doc))
    # the files are relative to the json's folder
    with pytest.raises(FirmwareError, match="no such file"):
        load_firmware(from_args("esp32", args))
    args = build.parent / "flasher_args_8mb.json"
    args.write_text(json.dumps(doc))
    b = load_firmware(from_args("esp32", args))
    assert b.flash_size == 8 << 20 and b.end == 0x610000


# -- every mistake names the file and the key -------------------------------------------


def test_missing_file_in_flasher_args(build: Path, tmp_path: Path) -> None:
    doc = json.loads(build.read_text())
    doc["flash_files"]["0x10000"] = "gone.bin"
    args = write(build.parent / "flasher_args_gone.json", json.dumps(doc).encode())
    expect(from_args("esp32", args), build.parent / "gone.bin", 'flash_files["0x10000"]',
           "no such file")


def test_missing_image_file(build: Path, tmp_path: Path) -> None:
    specs = demo_specs(build)
    specs[1] = (0x8000, tmp_path / "nope.bin")
    expect(images("esp32", *specs), tmp_path / "nope.bin", "firmware.images[1].file",
           "no such file")


def test_flasher_args_not_json(tmp_path: Path) -> None:
    args = write(tmp_path / "flasher_args.json", b"{ not json")
    expect(from_args("esp32", args), args, "firmware.flasher_args", "not a flasher_args.json")
    args = write(tmp_path / "flasher_args.json", b'{"flash_files": {}}')
    expect(from_args("esp32", args), args, "flash_files", "missing or empty")


@pytest.mark.parametrize("chip", ["esp32s3", "esp32c3"])
def test_wrong_chip(build: Path, chip: str) -> None:
    expect(from_args(chip, build), build, "extra_esptool_args.chip",
           f"the build is for esp32, but [firmware] chip is {chip}")
    app = build.parent / "app.bin"
    expect(images(chip, (0x10000, app)), app, "firmware.images[0].file",
           f"built for esp32 (image chip id 0), but [firmware] chip is {chip}")


def test_wrong_chip_bootloader_of_other_chip(tmp_path: Path) -> None:
    s3 = make_demo_firmware(tmp_path / "s3", chip="esp32s3")
    boot = s3.parent / "bootloader/bootloader.bin"
    expect(images("esp32", (0x1000, boot)), boot, "firmware.images[0].file",
           "built for esp32s3 (image chip id 9)")


def test_bootloader_at_wrong_offset(build: Path, tmp_path: Path) -> None:
    boot = build.parent / "bootloader/bootloader.bin"
    expect(images("esp32", (0x0, boot), (0x10000, build.parent / "app.bin")), boot,
           "firmware.images[0].offset", "the esp32 ROM loads it from 0x1000")
    c3 = make_demo_firmware(tmp_path / "c3", chip="esp32c3")
    boot = c3.parent / "bootloader/bootloader.bin"
    expect(images("esp32c3", (0x1000, boot)), boot, "firmware.images[0].offset",
           "the esp32c3 ROM loads it from 0x0")


def test_overlapping_images(build: Path, tmp_path: Path) -> None:
    data = write(tmp_path / "data.bin", b"\x00" * 0x3000)
    specs = [*demo_specs(build), (0x20000, data)]
    expect(images("esp32", *specs), data, "firmware.images[3].offset", "overlaps app.bin")


def test_images_sharing_a_sector_overlap(tmp_path: Path) -> None:
    # the stub erases whole sectors: a short image still owns its last sector
    a = write(tmp_path / "a.bin", b"\x00" * 100)
    b = write(tmp_path / "b.bin", b"\x00" * 100)
    load_firmware(images("esp32", (0x200000, a), (0x201000, b)))  # next sector: fine
    c = write(tmp_path / "c.bin", b"\x00" * 0x1001)
    expect(images("esp32", (0x200000, c), (0x201000, b)), b, "firmware.images[1].offset",
           "overlaps c.bin")


def test_unaligned_offset(tmp_path: Path) -> None:
    data = write(tmp_path / "data.bin", b"\x00" * 16)
    expect(images("esp32", (0x200800, data)), data, "firmware.images[0].offset",
           "not a multiple of 0x1000")


def test_too_big_for_flash(build: Path, tmp_path: Path) -> None:
    data = write(tmp_path / "data.bin", b"\x00" * 0x20000)
    expect(images("esp32", (0x3F0000, data)), data, "firmware.images[0].file",
           "past the end of 4 MB flash")
    assert load_firmware(images("esp32", (0x3F0000, data)), flash_size_hint=8 << 20)


def test_flash_size_from_bootloader_header(build: Path, tmp_path: Path) -> None:
    # a bootloader built for 2 MB flash: the images must fit 2 MB, whatever the hint
    layout_boot = parse_image((build.parent / "bootloader/bootloader.bin").read_bytes())
    assert layout_boot.flash_size == 4 << 20
    rng = random.Random(3)
    boot = write(tmp_path / "boot2mb.bin",
                 esp_image("esp32", 0x40080618, [(0x40078000, rng.randbytes(4096))],
                           flash_size_code=1))
    data = write(tmp_path / "data.bin", b"\x00" * 0x20000)
    expect(images("esp32", (0x1000, boot), (0x1F0000, data)), data, "firmware.images[1].file",
           "past the end of 2 MB flash", flash_size_hint=16 << 20)


def test_app_too_big_for_its_partition(build: Path, tmp_path: Path) -> None:
    table = write(tmp_path / "pt.bin", partition_table([
        ("nvs", 1, 2, 0x9000, 0x6000), ("factory", 0, 0, 0x10000, 0x100000)]))
    app = build.parent / "app.bin"
    expect(images("esp32", (0x8000, table), (0x10000, app)), app, "firmware.images[1].file",
           "do not fit partition 'factory'")


def test_partition_past_end_of_flash(tmp_path: Path) -> None:
    table = write(tmp_path / "pt.bin", partition_table([("storage", 1, 0x82, 0x300000,
                                                         0x200000)]))
    expect(images("esp32", (0x8000, table)), table, "firmware.images[0].file",
           "partition 'storage' ends at 0x500000")


def test_corrupt_partition_table(build: Path, tmp_path: Path) -> None:
    raw = bytearray((build.parent / "partition_table/partition-table.bin").read_bytes())
    raw[0x2C] ^= 0x40  # a byte of the first label: the MD5 row no longer matches
    table = write(tmp_path / "pt.bin", bytes(raw))
    expect(images("esp32", (0x8000, table)), table, "firmware.images[0].file", "MD5")
    raw = bytearray((build.parent / "partition_table/partition-table.bin").read_bytes())
    raw[0x40:0x60] = b"\x12" * 32
    table = write(tmp_path / "pt2.bin", bytes(raw))
    expect(images("esp32", (0x8000, table)), table, "firmware.images[0].file", "entry 2")


def test_garbage_header(build: Path, tmp_path: Path) -> None:
    junk = write(tmp_path / "bootloader.bin", os.urandom(2000).replace(b"\xe9", b"\x00"))
    expect(images("esp32", (0x1000, junk)), junk, "firmware.images[0].file",
           "not an ESP image")
    # at an app partition's offset an image is required too
    specs = demo_specs(build)
    expect(images("esp32", specs[1], (0x10000, junk)), junk, "firmware.images[1].file",
           "not an ESP image")


def test_truncated_and_corrupt_images(build: Path, tmp_path: Path) -> None:
    raw = (build.parent / "app.bin").read_bytes()
    short = write(tmp_path / "short.bin", raw[:100_000])
    expect(images("esp32", (0x10000, short)), short, "firmware.images[0].file", "truncated")
    flipped = bytearray(raw)
    flipped[700_000] ^= 1
    bad = write(tmp_path / "bad.bin", bytes(flipped))
    expect(images("esp32", (0x10000, bad)), bad, "firmware.images[0].file", "corrupt")
    empty = write(tmp_path / "empty.bin", b"")
    expect(images("esp32", (0x200000, empty)), empty, "firmware.images[0].file", "empty")


# -- image_checks = "warn": content problems flashed as given, layout problems still fatal


def warned(section: FirmwareSection) -> FirmwareBundle:
    return load_firmware(dataclasses.replace(section, image_checks="warn"))


def test_warn_keeps_each_content_problem_in_the_errors_words(build: Path,
                                                              tmp_path: Path) -> None:
    d = build.parent
    raw = bytearray((d / "app.bin").read_bytes())
    raw[700_000] ^= 1
    bad = write(tmp_path / "bad.bin", bytes(raw))
    s3_app = make_demo_firmware(tmp_path / "s3", chip="esp32s3").parent / "app.bin"
    boot = d / "bootloader/bootloader.bin"
    specs = ((0x0, boot), (0x8000, d / "partition_table/partition-table.bin"), (0x10000, bad),
             (0x200000, s3_app))
    with pytest.raises(FirmwareError) as refused:  # refuse: the first problem is the error
        load_firmware(images("esp32", *specs))
    b = warned(images("esp32", *specs))
    suffix = '; flashed as given (firmware.image_checks = "warn")'
    assert b.warnings == (
        f"{refused.value}{suffix}",
        f"{bad}: firmware.images[2].file: checksum mismatch (header says 0x{raw[-33]:02x}, "
        f"segments give 0x{raw[-33] ^ 1:02x}): the file is corrupt{suffix}",
        f"{s3_app}: firmware.images[3].file: built for esp32s3 (image chip id 9), but "
        f"[firmware] chip is esp32{suffix}"), b.warnings
    assert str(refused.value) == f"{boot}: firmware.images[0].offset: a bootloader at 0x0, " \
                                 "but the esp32 ROM loads it from 0x1000"
    assert b.describe().endswith(" from bootloader.bin, 3 image warnings (image_checks = warn)")
    # flashed as given, each where it was put
    assert [(r.name, r.offset, r.data) for r in b.regions] == [
        ("bootloader", 0x0, boot.read_bytes()),
        ("partition-table", 0x8000, specs[1][1].read_bytes()),
        ("bad.bin", 0x10000, bad.read_bytes()), ("app.bin", 0x200000, s3_app.read_bytes())]
    assert warned(from_args("esp32s3", build)).warnings[0].startswith(
        f"{build}: extra_esptool_args.chip: the build is for esp32, but [firmware] chip is "
        "esp32s3; ")


def test_warn_still_refuses_what_cannot_be_flashed(build: Path, tmp_path: Path) -> None:
    data = write(tmp_path / "data.bin", b"\x00" * 0x3000)
    junk = write(tmp_path / "junk.bin", b"\x00" * 16)
    empty = write(tmp_path / "empty.bin", b"")
    for section, file, key, words in [
            (images("esp32", *demo_specs(build), (0x20000, data)), data,
             "firmware.images[3].offset", "overlaps app.bin"),
            (images("esp32", (0x3F0000, write(tmp_path / "big.bin", b"\x00" * 0x20000))),
             tmp_path / "big.bin", "firmware.images[0].file", "past the end of 4 MB flash"),
            (images("esp32", (0x200800, junk)), junk, "firmware.images[0].offset",
             "not a multiple of 0x1000"),
            (images("esp32", (0x200000, empty)), empty, "firmware.images[0].file", "empty"),
            (images("esp32", (0x200000, tmp_path / "none.bin")), tmp_path / "none.bin",
             "firmware.images[0].file", "no such file")]:
        expect(dataclasses.replace(section, image_checks="warn"), file, key, words)


def test_data_images_need_no_header(tmp_path: Path) -> None:
    spiffs = write(tmp_path / "spiffs.bin", b"\x00\x01" * 3000)
    b = load_firmware(images("esp32", (0x300000, spiffs)))
    assert [(r.name, r.offset) for r in b.regions] == [("spiffs.bin", 0x300000)]


# -- the demo build -------------------------------------------------------------------


@pytest.mark.parametrize("chip", CHIPS)
def test_demo_firmware_compresses_like_a_real_app(tmp_path: Path, chip: str) -> None:
    args = make_demo_firmware(tmp_path, chip=chip)
    app = (tmp_path / "app.bin").read_bytes()
    assert abs(len(app) - 1_500_000) < 64
    ratio = len(zlib.compress(app, 9)) / len(app)
    assert 0.55 <= ratio <= 0.65, ratio
    b = load_firmware(from_args(chip, args))
    assert isinstance(b, FirmwareBundle) and b.chip == chip


@pytest.mark.parametrize("chip", CHIPS)
def test_demo_images_pass_esptools_image_parser(tmp_path: Path, chip: str) -> None:
    make_demo_firmware(tmp_path, chip=chip, app_size=200_000)
    for name in ("bootloader/bootloader.bin", "app.bin"):
        image = LoadFirmwareImage(chip, str(tmp_path / name))
        assert image.chip_id == {"esp32": 0, "esp32s3": 9, "esp32c3": 5}[chip]
        assert image.stored_digest == image.calc_digest
        assert image.checksum == image.calculate_checksum()
    doc = json.loads((tmp_path / "flasher_args.json").read_text())
    boot = "0x1000" if chip == "esp32" else "0x0"
    assert doc["bootloader"]["offset"] == boot and doc["extra_esptool_args"]["chip"] == chip
    assert sorted(doc["flash_files"]) == sorted([boot, "0x8000", "0x10000"])


def test_demo_firmware_is_deterministic(tmp_path: Path) -> None:
    a = make_demo_firmware(tmp_path / "a", app_size=100_000, seed=5).parent
    b = make_demo_firmware(tmp_path / "b", app_size=100_000, seed=5).parent
    c = make_demo_firmware(tmp_path / "c", app_size=100_000, seed=6).parent
    for name in ("bootloader/bootloader.bin", "partition_table/partition-table.bin",
                 "app.bin", "flasher_args.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "app.bin").read_bytes() != (c / "app.bin").read_bytes()


def test_demo_factory_partition_fits_the_app(tmp_path: Path) -> None:
    args = make_demo_firmware(tmp_path, app_size=2_500_000)
    b = load_firmware(from_args("esp32", args))
    assert b.partition("factory").size >= len(b.regions[2].data)
    with pytest.raises(ValueError):
        make_demo_firmware(tmp_path / "x", app_size=5_000_000)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 15, 16, 17, 4096, 16384, 16385])
def test_xor_checksum_matches_esptool(length: int) -> None:
    data = random.Random(length).randbytes(length)
    assert xor_checksum(data) == ESPLoader.checksum(data)
    assert xor_checksum(memoryview(data)[1:], 0x12) == ESPLoader.checksum(data[1:], 0x12)
