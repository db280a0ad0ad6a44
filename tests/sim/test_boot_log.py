"""The boot story a chip tells from its flash contents (no esptool run: pure parsing)."""

from __future__ import annotations

import pytest

from station.sim.boot_log import download_banner, spi_boot
from station.sim.chips import chip_spec

from . import boot_images as bi


def flash_with(parts: dict[int, bytes], size: int = 0x400000) -> bytes:
    flash = bytearray(b"\xff" * size)
    for offset, data in parts.items():
        flash[offset:offset + len(data)] = data
    return bytes(flash)


def esp32_flash(app: bytes | None = None, table: bytes | None = None,
                boot_at: int = 0x1000) -> bytes:
    return flash_with({boot_at: bi.bootloader(), 0x8000: table or bi.partition_table(),
                       0x10000: app or bi.app()})


@pytest.mark.parametrize(("idf", "tag", "digits"), [
    ("v5.1.4", "cpu_start", 16), ("v5.2.2", "cpu_start", 9), ("v5.3.1", "app_init", 9),
    ("v5.5", "app_init", 9)])
def test_app_lines_follow_the_images_esp_idf_version(idf: str, tag: str, digits: int) -> None:
    text, ok = spi_boot(chip_spec("esp32"), esp32_flash(bi.app("meter", "4.0", idf)),
                        "SELFTEST: PASS")
    sha = bi.elf_sha256("meter", "4.0").hex()
    assert ok
    assert text.startswith("ets Jul 29 2019 12:21:46\r\n\r\n"
                           "rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n")
    assert f"boot: ESP-IDF {idf} 2nd stage bootloader" in text
    assert "boot:  2 factory          factory app      00 00 00010000 00100000" in text
    assert "boot: Loaded app from partition at offset 0x10000" in text
    assert f"{tag}: Project name:     meter\r\n" in text
    assert f"{tag}: App version:      4.0\r\n" in text
    assert f"{tag}: ELF file SHA256:  {sha[:digits]}...\r\n" in text
    assert f"{tag}: ESP-IDF:          {idf}\r\n" in text
    assert text.endswith(f"{tag}: ESP-IDF:          {idf}\r\nSELFTEST: PASS\r\n")


def test_bootloader_at_the_wrong_offset_stops_in_the_rom() -> None:
    text, ok = spi_boot(chip_spec("esp32"), esp32_flash(boot_at=0x0))
    assert not ok
    # The ROM reads 0x1000, which now holds the middle of the bootloader's first segment,
    # and tries 8 times before its watchdog starts it over (as hardware logs show).
    assert text.endswith("(SPI_FAST_FLASH_BOOT)\r\n" + "invalid header: 0x11111111\r\n" * 8)
    assert "2nd stage bootloader" not in text


def test_a_corrupt_app_fails_its_checksum() -> None:
    app = bytearray(bi.app())
    app[0x400] ^= 0x01  # inside the first segment, after the app descriptor
    text, ok = spi_boot(chip_spec("esp32"), esp32_flash(bytes(app)))
    assert not ok
    # esp_image_format.c logs each segment as it loads it, then checks the checksum
    lines = text.splitlines()
    n = next(i for i, line in enumerate(lines) if "esp_image: Checksum failed." in line)
    segments = [line for line in lines[:n] if "esp_image: segment " in line]
    assert len(segments) == 3 and segments[0].endswith(  # (esptool padded the IROM segment)
        "esp_image: segment 0: paddr=00010020 vaddr=3f400020 size=00900h (  2304) map")
    assert lines[n].startswith("E (") and lines[n].endswith(
        f"esp_image: Checksum failed. Calculated 0x{app[-33] ^ 1:x} read 0x{app[-33]:x}")
    assert "boot: Factory app partition is not bootable" in text
    assert "Loaded app" not in text


def test_a_corruption_the_checksum_misses_fails_the_appended_sha256() -> None:
    app = bytearray(bi.app())
    app[0x400] ^= 0x10
    app[0x401] ^= 0x10  # the XOR checksum cancels out; the SHA256 does not
    text, ok = spi_boot(chip_spec("esp32"), esp32_flash(bytes(app)))
    assert not ok
    assert "Checksum failed" not in text
    assert "E (" in text and "esp_image: Image hash failed - image is corrupt\r\n" in text
    assert text.endswith("boot: No bootable app partitions in the partition table\r\n")


def test_a_partition_table_pointing_elsewhere_finds_no_app() -> None:
    text, ok = spi_boot(chip_spec("esp32"), esp32_flash(table=bi.partition_table(0x20000)))
    assert not ok
    assert "esp_image: image at 0x20000 has invalid magic byte (nothing flashed here?)" in text
    assert "boot: No bootable app partitions in the partition table" in text


def test_a_missing_partition_table_is_a_bootloader_error() -> None:
    flash = flash_with({0x1000: bi.bootloader(), 0x10000: bi.app()})
    text, ok = spi_boot(chip_spec("esp32"), flash)
    assert not ok
    assert "flash_parts: partition 0 invalid magic number 0xffff" in text
    assert text.endswith("boot: load partition table error!\r\n")


def test_later_chips_boot_from_offset_zero() -> None:
    spec = chip_spec("esp32c3")
    flash = flash_with({0x0: bi.bootloader(), 0x8000: bi.partition_table(), 0x10000: bi.app()})
    text, ok = spi_boot(spec, flash)
    assert ok and "app_init: Project name:     hello_world" in text
    assert "waiting for download" in download_banner("esp32c3")
