"""Images that verify by MD5 and still do not boot (issue 10), through the real daemon.

A bootloader where the ROM does not look and a corrupt app are refused at start by
default (station/flash/firmware.py). `[firmware] image_checks = "warn"` flashes them as given,
one warning each; real esptool writes them over RFC 2217 to virtual boards, the MD5s
match, and the boot check after the reset fails each board quoting what its ROM or
bootloader printed (the words of station/sim/boot_log.py, from ESP-IDF's sources).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from station.daemon import EXIT_BOARDS_FAILED, EXIT_CONFIG, EXIT_OK
from station.demo import make_demo_firmware
from station.sim import Rig
from tests.test_bad_inputs import Firmware, Site, toml_value

pytestmark = pytest.mark.timeout(180)

APP_AT = 0x10000
TABLE_AT = 0x8000


@dataclass(frozen=True)
class Build:
    """One chip's images as `[firmware] images`, one of them wrong on purpose."""

    chip: str
    images: list[dict[str, Any]]
    bad: Path  # the file that is wrong
    key: str  # the config key a message names for it


@dataclass
class Line(Site):
    """A Site whose firmware is `[[firmware]]` entries, one per chip."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def write(self) -> Path:
        self.sections.pop("firmware", None)
        super().write()
        with self.config.open("a") as f:
            for entry in self.entries:
                f.write("[[firmware]]\n" + "".join(f"{k} = {toml_value(v)}\n"
                                                   for k, v in entry.items()) + "\n")
        return self.config


def images(build: Path, boot_at: int, app: Path | None = None) -> list[dict[str, Any]]:
    d = build.parent
    return [{"offset": boot_at, "file": d / "bootloader" / "bootloader.bin"},
            {"offset": TABLE_AT, "file": d / "partition_table" / "partition-table.bin"},
            {"offset": APP_AT, "file": app or d / "app.bin"}]


@pytest.fixture(scope="module")
def builds(firmware: Firmware, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Build]:
    """esp32: its bootloader at 0x0 (the ROM reads 0x1000); esp32s3: at 0x1000 (the ROM
    reads 0x0, left blank); esp32c3: an app with one bit flipped in a segment."""
    c3 = make_demo_firmware(tmp_path_factory.mktemp("c3"), chip="esp32c3", app_size=0x4000)
    app = bytearray((c3.parent / "app.bin").read_bytes())
    app[0x400] ^= 0x01  # inside the first segment (the app descriptor ends at 0x120)
    corrupt = c3.parent / "corrupt-app.bin"
    corrupt.write_bytes(bytes(app))
    boot = "bootloader/bootloader.bin"
    return {
        "esp32": Build("esp32", images(firmware.esp32, 0x0), firmware.esp32.parent / boot,
                       "images[0].offset"),
        "esp32s3": Build("esp32s3", images(firmware.esp32s3, 0x1000),
                         firmware.esp32s3.parent / boot, "images[0].offset"),
        "esp32c3": Build("esp32c3", images(c3, 0x0, app=corrupt), corrupt, "images[2].file"),
    }


@pytest.fixture
def line(tmp_path: Path, firmware: Firmware) -> Line:
    return Line(tmp_path, firmware)


def test_wrong_images_flash_verify_and_fail_the_boot_check_in_the_boards_words(
        line: Line, builds: dict[str, Build]) -> None:
    line.entries = [{"chip": b.chip, "images": b.images, "image_checks": "warn"}
                    for b in builds.values()]
    line.set("verify", "boot", "app").set("verify", "boot_timeout", 3.0)
    with Rig(line.hub, seed=17, throttle=False, flash_timing=False, rfc2217_base=0) as rig:
        boards = {chip: rig.plug(chip=chip) for chip in builds}
        line.set("ports", "watch", [str(line.hub / "none-*")])
        line.set("ports", "remote", [b.rfc2217 for b in boards.values()])
        result = line.run(len(boards))
        flashes = {chip: rig.flash(board) for chip, board in boards.items()}
    assert result.code == EXIT_BOARDS_FAILED, str(result)

    # one warning each at start, in the words `refuse` would have used
    warned = [w for w in result.stderr.splitlines() if "image_checks" in w]
    assert len(warned) == 3, result
    for i, b in enumerate(builds.values()):
        assert any(w.startswith(f"station: WARNING: {b.bad}: firmware[{i}].{b.key}: ")
                   and w.endswith(f'; flashed as given (firmware[{i}].image_checks = "warn")')
                   for w in warned), (b, warned)

    rows = line.rows_by_port()
    for chip, board in boards.items():
        row = rows[board.rfc2217]
        assert (row["result"], row["failed_stage"], row["boot"]) == ("failed", "boot",
                                                                     "failed"), row
        assert "verify" in row["timings"], row  # the MD5s matched: written as given
        for image in builds[chip].images:
            data = Path(image["file"]).read_bytes()
            offset = image["offset"]
            assert flashes[chip][offset:offset + len(data)] == data, (chip, offset)

    # the ROM finds no image header where it looks, says so 8 times, and starts over
    boot = (builds["esp32"].bad).read_bytes()
    word = int.from_bytes(boot[0x1000:0x1004], "little")  # the middle of the bootloader
    row = rows[boards["esp32"].rfc2217]
    assert "expected the ESP-IDF 2nd stage bootloader to start; the board printed " \
           f"'invalid header: 0x{word:08x}'" in row["error"], row
    assert row["boot_log"].splitlines()[:3] == [
        "ets Jul 29 2019 12:21:46", "rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)",
        f"invalid header: 0x{word:08x}"], row
    assert row["boot_log"].count(f"invalid header: 0x{word:08x}") == 8, row

    row = rows[boards["esp32s3"].rfc2217]  # nothing was written at 0x0: erased flash
    assert "the board printed 'invalid header: 0xffffffff'" in row["error"], row
    assert row["boot_log"].count("invalid header: 0xffffffff") == 8, row

    # the bootloader names the cause first, then gives up on the only app
    row = rows[boards["esp32c3"].rfc2217]
    assert 'expected "Loaded app from partition at offset 0x10000"; the board printed ' \
           "'E (" in row["error"], row
    assert ") esp_image: Checksum failed. Calculated 0x" in row["error"], row
    assert ") boot: No bootable app partitions in the partition table'" in row["error"], row
    assert "boot: Factory app partition is not bootable" in row["boot_log"], row
    assert "esp_image: segment 0: paddr=00010020 vaddr=3c020020" in row["boot_log"], row


@pytest.mark.parametrize("chip", ["esp32", "esp32s3", "esp32c3"])
def test_by_default_the_same_images_are_refused_at_start_naming_the_file(
        line: Line, builds: dict[str, Build], chip: str) -> None:
    build = builds[chip]
    line.entries = [{"chip": chip, "images": build.images}]
    result = line.run(1)
    assert result.code == EXIT_CONFIG, str(result)
    complaint = result.complaint()
    assert f"firmware error: {build.bad}: firmware[0].{build.key}: {REFUSED[chip]}" \
        in complaint, result


REFUSED = {"esp32": "a bootloader at 0x0, but the esp32 ROM loads it from 0x1000",
           "esp32s3": "a bootloader at 0x1000, but the esp32s3 ROM loads it from 0x0",
           "esp32c3": "checksum mismatch (header says 0x"}


def test_check_lists_the_warnings_and_that_nothing_proves_the_boot_without_a_boot_check(
        line: Line, builds: dict[str, Build]) -> None:
    line.entries = [{"chip": "esp32", "images": builds["esp32"].images,
                     "image_checks": "warn"}]
    result = line.check()
    assert result.code == EXIT_OK, str(result)
    warnings = [w for w in result.stdout.splitlines() if w.startswith("firmware    warning: ")]
    assert warnings == [
        f"firmware    warning: {builds['esp32'].bad}: firmware[0].images[0].offset: a "
        "bootloader at 0x0, but the esp32 ROM loads it from 0x1000; flashed as given "
        '(firmware[0].image_checks = "warn")',
        f"firmware    warning: {line.config}: verify.boot: \"off\": boards get these images "
        'and end done without proof that they boot; set [verify] boot = "app"'], result
    assert "from bootloader.bin, 1 image warning (image_checks = warn)\n" in result.stdout


def test_boards_that_log_in_colour_boot_and_are_recorded_plain(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """ESP-IDF up to v5.3 builds with CONFIG_LOG_COLORS=y by default: every bootloader and
    app log line comes wrapped in ANSI colour codes (issue 24). The boot check matches,
    shows and stores the lines without them."""
    root = tmp_path_factory.mktemp("colour-fw")
    firmware = Firmware(
        esp32=make_demo_firmware(root / "esp32", app_size=0x4000, log_colors=True),
        esp32s3=make_demo_firmware(root / "esp32s3", chip="esp32s3", app_size=0x4000,
                                   log_colors=True))
    site = Site(tmp_path, firmware)
    site.set("verify", "boot", "app").set("verify", "marker", "SELFTEST: PASS")
    with Rig(site.hub, seed=23, throttle=False, flash_timing=False, rfc2217_base=0) as rig:
        boards = [rig.plug(chip="esp32", app_line="SELFTEST: PASS") for _ in range(3)]
        site.set("ports", "watch", [str(site.hub / "none-*")])
        site.set("ports", "remote", [b.rfc2217 for b in boards])
        result = site.run(len(boards))
    assert result.code == EXIT_OK, str(result)
    rows = site.rows_by_port()
    for board in boards:
        row = rows[board.rfc2217]
        assert (row["result"], row["boot"], row["booted_project"], row["booted_version"]) \
            == ("done", "ok", "station-demo-esp32", "1.0.0"), row
        assert "\x1b" not in row["boot_log"] and "[0m" not in row["boot_log"], row
        assert "I (107) app_init: Compile time:" in row["boot_log"], row
    assert "\x1b" not in result.stdout + result.stderr
    assert result.stdout.count("booted station-demo-esp32 1.0.0") == len(boards), result
