"""What a chip prints on its console after a reset, derived from its flash contents.

There is no CPU: the boot story is *read* from the virtual flash, as the ROM and the
ESP-IDF second-stage bootloader would read it, and told in their words, so a station
checking "did the board boot what we flashed" meets the same text as on hardware.

* ROM banner (closed ROM; wording from Espressif's published boot logs): download mode
  prints ``boot:0x3 (DOWNLOAD_BOOT(...))`` and ``waiting for download`` (esptool's
  ``_connect_attempt`` regex ``boot:(0x..)(.*waiting for download)?``); SPI boot prints
  the SPI config and one ``load:`` line per bootloader segment, then ``entry``.
* The bootloader image at the chip's bootloader offset (esptool's target class
  ``BOOTLOADER_FLASH_OFFSET``) is parsed with esptool's own
  :func:`esptool.bin_image.LoadFirmwareImage` (magic, segments, checksum); a word there
  that is not an image header is ``invalid header: 0x...``, retried by the ROM.
* The app is judged as ``bootloader_support/src/esp_image_format.c`` loads it: each
  segment logged as it is read, then the XOR checksum, then the appended SHA256.
* The partition table at 0x8000 (ESP-IDF ``esp_partition_info_t``: 32-byte entries,
  magic 0x50AA, 0xEBEB MD5 entry, 0xFFFF end), printed as
  ``bootloader_support/src/bootloader_utility.c`` does; the app is the factory partition
  (else the first OTA partition; OTA data is not read).
* The app's ``esp_app_desc_t`` (``esp_app_format/include/esp_app_desc.h``), which sits
  right after the first segment header (offset 0x20), gives the app lines of
  ``esp_app_format/esp_app_desc.c`` (``app_init:`` since v5.3, ``cpu_start:`` before;
  the ELF SHA256 as 9 hex digits since v5.2, 16 before).

The ESP-IDF version the bootloader lines follow is the app's ``idf_ver``.
"""

from __future__ import annotations

import contextlib
import re
import struct
from dataclasses import dataclass
from typing import Any

from esptool.bin_image import LoadFirmwareImage

from .chips import _REVISIONS, ChipSpec
from .secure_cert_app import app_lines

APP_DESC_MAGIC = 0xABCD5432
APP_DESC_OFFSET = 0x20  # image header (24 B) + first segment header (8 B)
_APP_DESC = struct.Struct("<II8x32s32s16s16s32s32s")
PARTITION_TABLE_OFFSET = 0x8000
PARTITION_MAGIC = 0x50AA
PARTITION_MD5_MAGIC = 0xEBEB
_PART = struct.Struct("<HBBII16sI")
BOOTLOOP_ROUNDS = 3  # a boot loop is told this many times, then the board goes quiet
# The ESP32 ROM retries an invalid header: 8 "invalid header" lines per boot, then its RTC
# watchdog resets the chip (whole rounds in the logs of esp-idf#13208 and
# Ai-Thinker-Open/ESP32-A1S-AudioKit#49; docs/virtual-boards.md).
ROM_HEADER_TRIES = 8

# ROM banners: (first lines, reset cause, SPI boot, download boot)
_ESP32 = ("ets Jul 29 2019 12:21:46\r\n\r\n", "rst:0x1 (POWERON_RESET)",
          "boot:0x13 (SPI_FAST_FLASH_BOOT)",
          "boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))")


def _rom(chip: str) -> tuple[str, str, str, str]:
    if chip == "esp32":
        return _ESP32
    # Later ROMs print "ESP-ROM:<chip>-<date>" and a shorter reset cause; the exact ROM
    # build strings and strap codes differ per chip and are not modelled.
    return (f"ESP-ROM:{chip}\r\nBuild:\r\n", "rst:0x1 (POWERON)",
            "boot:0x8 (SPI_FAST_FLASH_BOOT)", "boot:0x0 (DOWNLOAD(USB/UART0))")


def loop_cause(chip: str, text: str) -> str:
    """``text`` told again after the reset a failed boot ends in.

    The ROM gives up through its RTC watchdog (``RTCWDT_RTC_RESET``); the second-stage
    bootloader calls ``bootloader_reset()``, a system software reset (``SW_RESET``).
    """
    _first, cause, _spi, _dl = _rom(chip)
    bootloader = "2nd stage bootloader" in text
    if chip == "esp32":
        again = "rst:0x3 (SW_RESET)" if bootloader else "rst:0x10 (RTCWDT_RTC_RESET)"
    else:
        again = "rst:0x3 (RTC_SW_SYS_RST)" if bootloader else "rst:0x10 (RTCWDT_RTC_RST)"
    return text.replace(cause, again, 1)


def download_banner(chip: str) -> str:
    first, cause, _spi, download = _rom(chip)
    return f"{first}{cause},{download}\r\nwaiting for download\r\n"


@dataclass(frozen=True)
class AppDesc:
    version: str
    project_name: str
    time: str
    date: str
    idf_ver: str
    elf_sha256: bytes

    @property
    def idf_version(self) -> tuple[int, int]:
        m = re.match(r"v?(\d+)\.(\d+)", self.idf_ver)
        return (int(m.group(1)), int(m.group(2))) if m else (5, 0)


def app_desc(image: bytes) -> AppDesc | None:
    """The ``esp_app_desc_t`` of an app image, or None if it has none."""
    if len(image) < APP_DESC_OFFSET + _APP_DESC.size:
        return None
    magic, _sv, ver, name, time, date, idf, sha = _APP_DESC.unpack_from(image, APP_DESC_OFFSET)
    if magic != APP_DESC_MAGIC:
        return None

    def text(b: bytes) -> str:
        return b.split(b"\0", 1)[0].decode("ascii", "replace")

    return AppDesc(text(ver), text(name), text(time), text(date), text(idf), sha)


@dataclass(frozen=True)
class Partition:
    label: str
    type: int
    subtype: int
    offset: int
    size: int

    @property
    def usage(self) -> str:
        # bootloader_utility.c: partition_usage strings
        if self.type == 0:
            if self.subtype == 0:
                return "factory app"
            if 0x10 <= self.subtype < 0x20:
                return "OTA app"
            return "test app"
        return {0: "OTA data", 1: "RF data", 2: "WiFi data", 3: "NVS keys",
                4: "efuse"}.get(self.subtype, "unknown")


def partitions(flash: bytes) -> list[Partition] | None:
    """The partition table at 0x8000, or None if its first entry is not one."""
    table: list[Partition] = []
    for pos in range(PARTITION_TABLE_OFFSET, PARTITION_TABLE_OFFSET + 0xC00, _PART.size):
        magic, ptype, sub, offset, size, label, _flags = _PART.unpack_from(flash, pos)
        if magic in (0xFFFF, PARTITION_MD5_MAGIC):
            break
        if magic != PARTITION_MAGIC:
            return None
        table.append(Partition(label.split(b"\0", 1)[0].decode("ascii", "replace"), ptype,
                               sub, offset, size))
    return table or None


# ESP-IDF's log.h (v5.1-v5.3, components/log/include/esp_log.h and esp_log_color.h since
# v5.4) with CONFIG_LOG_COLORS=y: LOG_FORMAT(letter, fmt) is
# LOG_COLOR_<letter> #letter " (%" PRIu32 ") %s: " fmt LOG_RESET_COLOR "\n", with
# LOG_COLOR(c) "\033[0;" c "m": E red (31), W brown (33), I green (32), D/V none. The colour
# codes are compiled into every format string, so a build that logs in colour carries them
# in its image; the ROM's own lines are never coloured.
LOG_COLORS = {"E": "\x1b[0;31m", "W": "\x1b[0;33m", "I": "\x1b[0;32m"}
LOG_RESET_COLOR = "\x1b[0m"
COLORED_FORMAT = b"\x1b[0;32mI (%"  # LOG_FORMAT(I, ...) in a CONFIG_LOG_COLORS=y image


def logs_in_color(image: bytes) -> bool:
    """Was this image built with CONFIG_LOG_COLORS=y (its log formats carry the codes)?"""
    return COLORED_FORMAT in image


class _Log:
    def __init__(self, colors: bool = False) -> None:
        self.lines: list[str] = []
        self.ms = 27
        self.colors = colors

    def i(self, tag: str, text: str, level: str = "I") -> None:
        self.ms += 4
        line = f"{level} ({self.ms}) {tag}: {text}"
        if self.colors and level in LOG_COLORS:
            line = f"{LOG_COLORS[level]}{line}{LOG_RESET_COLOR}"
        self.lines.append(line)

    def e(self, tag: str, text: str) -> None:
        self.i(tag, text, "E")


def spi_boot(spec: ChipSpec, flash: bytes, app_line: str | None = None,
             security: Any = None) -> tuple[str, bool]:
    """The console output of one SPI boot, and whether the app came up (False: loop).

    ``flash`` is what the chip reads (decrypted where encryption is on); ``security``
    (:class:`~.boot_security.BootSecurity`) adds secure boot and flash encryption.
    """
    first, cause, spi, _dl = _rom(spec.name)
    out = [f"{first}{cause},{spi}"]
    boot_at = spec.bootloader_offset
    magic = struct.unpack_from("<I", flash, boot_at)[0]
    if flash[boot_at] != 0xE9:
        out += [f"invalid header: 0x{magic:08x}"] * ROM_HEADER_TRIES
        return "\r\n".join(out) + "\r\n", False
    try:
        image = LoadFirmwareImage(spec.name, flash[boot_at:boot_at + 0x10000])
    except Exception:  # esptool's parser refuses: the ROM would too (its words unknown)
        out += [f"invalid header: 0x{magic:08x}"] * ROM_HEADER_TRIES
        return "\r\n".join(out) + "\r\n", False
    if spec.name == "esp32":
        out += ["configsip: 0, SPIWP:0xee",
                "clk_drv:0x00,q_drv:0x00,d_drv:0x00,cs0_drv:0x00,hd_drv:0x00,wp_drv:0x00",
                "mode:DIO, clock div:2"]
    if security is not None:
        rom_lines, verified = security.rom(flash, boot_at, image)
        out += rom_lines
        if not verified:
            return "\r\n".join(out) + "\r\n", False
    for seg in image.segments:
        out.append(f"load:0x{seg.addr:08x},len:{len(seg.data)}")
    if image.calculate_checksum() != image.checksum:
        out.append(f"checksum error: 0x{image.calculate_checksum():02x} != 0x{image.checksum:02x}")
        return "\r\n".join(out) + "\r\n", False
    out.append(f"entry 0x{image.entrypoint:08x}")
    # The bootloader logs through its own formats; the app (a separate build config in
    # principle, the same sdkconfig in practice) through its own: each image decides.
    log = _Log(logs_in_color(flash[boot_at:boot_at + 0x10000]))
    table = partitions(flash)
    apps = [p for p in table or [] if p.type == 0]
    app = next((p for p in apps if p.subtype == 0), apps[0] if apps else None)
    desc = app_desc(flash[app.offset:app.offset + 0x100]) if app else None
    idf = desc.idf_ver if desc else "v5.1"
    log.i("boot", f"ESP-IDF {idf} 2nd stage bootloader")
    log.i("boot", f"compile time {desc.date if desc else ''} {desc.time if desc else ''}")
    log.i("boot", f"chip revision: v{_revision(spec)}")
    if table is None:
        log.e("flash_parts", "partition 0 invalid magic number 0x"
              f"{struct.unpack_from('<H', flash, PARTITION_TABLE_OFFSET)[0]:x}")
        log.e("boot", "Failed to verify partition table")
        log.e("boot", "load partition table error!")
        return "\r\n".join(out + log.lines) + "\r\n", False
    log.i("boot", "Partition Table:")
    log.i("boot", "## Label            Usage          Type ST Offset   Length")
    for n, p in enumerate(table):
        log.i("boot", f"{n:2d} {p.label:<16s} {p.usage:<16s} {p.type:02x} {p.subtype:02x} "
              f"{p.offset:08x} {p.size:08x}")
    log.i("boot", "End of partition table")
    if app is None:
        log.e("boot", "No bootable app partitions in the partition table")
        return "\r\n".join(out + log.lines) + "\r\n", False
    if flash[app.offset] != 0xE9:
        log.e("esp_image", f"image at 0x{app.offset:x} has invalid magic byte "
              "(nothing flashed here?)")
        log.e("boot", "Factory app partition is not bootable")
        log.e("boot", "No bootable app partitions in the partition table")
        return "\r\n".join(out + log.lines) + "\r\n", False
    app_image = None
    with contextlib.suppress(Exception):  # not an image esptool can walk: judged below
        app_image = LoadFirmwareImage(spec.name, flash[app.offset:app.offset + app.size])
    rom = spec.rom_class
    for n, seg in enumerate(app_image.segments if app_image else []):
        # esp_image_format.c process_segment(): logged as each segment is loaded, before
        # the checksum and the hash are known; paddr is the data's, after its 8-byte header
        mapped = any(lo <= seg.addr < hi for lo, hi in (
            (rom.IROM_MAP_START, rom.IROM_MAP_END), (rom.DROM_MAP_START, rom.DROM_MAP_END)))
        log.i("esp_image", f"segment {n}: paddr={app.offset + seg.file_offs + 8:08x} "
              f"vaddr={seg.addr:08x} size={len(seg.data):05x}h ({len(seg.data):6d}) "
              f"{'map' if mapped else 'load'}")
    error = _app_error(app_image)
    if error is not None or (security is not None
                             and not security.verify_app(log, flash, app.offset, app_image)):
        if error is not None:
            log.e("esp_image", error)
        log.e("boot", "Factory app partition is not bootable")
        log.e("boot", "No bootable app partitions in the partition table")
        return "\r\n".join(out + log.lines) + "\r\n", False
    log.i("boot", f"Loaded app from partition at offset 0x{app.offset:x}")
    if security is not None and not security.after_load(log):
        return "\r\n".join(out + log.lines) + "\r\n", False  # it resets itself
    log.i("boot", "Disabling RNG early entropy source...")
    log.colors = logs_in_color(flash[app.offset:app.offset + app.size])
    log.i("cpu_start", "Pro cpu start user code")
    if desc is not None:
        major_minor = desc.idf_version
        tag = "app_init" if major_minor >= (5, 3) else "cpu_start"
        digits = 9 if major_minor >= (5, 2) else 16
        log.i(tag, "Application information:")
        log.i(tag, f"Project name:     {desc.project_name}")
        log.i(tag, f"App version:      {desc.version}")
        log.i(tag, f"Compile time:     {desc.date} {desc.time}")
        log.i(tag, f"ELF file SHA256:  {desc.elf_sha256.hex()[:digits]}...")
        log.i(tag, f"ESP-IDF:          {desc.idf_ver}")
    if security is not None:
        security.app_start(log, flash[app.offset:app.offset + app.size])
    app_lines(log, spec.name, flash[app.offset:app.offset + app.size], table, flash,
              security.efuses if security is not None else None)
    lines = out + log.lines
    if app_line:
        lines.append(app_line)
    return "\r\n".join(lines) + "\r\n", True


def _app_error(image: Any) -> str | None:
    """esp_image_format.c's verdict on an app it loaded, in its order: process_checksum()
    ("Checksum failed"), then verify_simple_hash() over the appended SHA256."""
    if image is None:  # esptool cannot walk its segments; ESP-IDF's exact words not modelled
        return "Checksum failed. Calculated 0x0 read 0x0"
    calculated = image.calculate_checksum()
    if calculated != image.checksum:
        return f"Checksum failed. Calculated 0x{calculated:x} read 0x{image.checksum:x}"
    if image.append_digest and image.stored_digest != image.calc_digest:
        return "Image hash failed - image is corrupt"
    return None


def _revision(spec: ChipSpec) -> str:
    if spec.revision:
        return spec.revision.lower().removeprefix("v")
    major, minor = _REVISIONS.get(spec.name, (0, 0))
    return f"{major}.{minor}"
