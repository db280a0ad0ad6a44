"""Bootable ESP-IDF-shaped images for the boot-story tests, built with esptool's own
image classes (header, segments, checksum, appended SHA256), plus a partition table in
ESP-IDF's binary format and an ``esp_app_desc_t`` at the start of the app's first
segment (where ESP-IDF's linker script puts ``.rodata_desc``)."""

from __future__ import annotations

import hashlib
import struct

from esptool.bin_image import ELFSection, ESP32FirmwareImage

from station.demo.firmware import COLORED_LOG_FORMATS

APP_DESC_MAGIC = 0xABCD5432
PART_MAGIC = 0x50AA


def image(segments: list[tuple[int, bytes]], entry: int) -> bytes:
    """An ESP32 app/bootloader image (flash mode DIO, 4MB, 40 MHz)."""
    img = ESP32FirmwareImage()
    img.flash_mode = 2  # DIO
    img.flash_size_freq = 0x20  # 4MB, 40m
    img.entrypoint = entry
    img.segments = [ELFSection(f".seg{n}".encode(), addr, data, 0)
                    for n, (addr, data) in enumerate(segments)]
    data = img.save(None)
    assert data is not None
    return data


def app_desc(project: str, version: str, idf: str, elf_sha256: bytes,
             date: str = "Dec  1 2026", time: str = "12:00:00") -> bytes:
    return struct.pack("<II8x32s32s16s16s32s32s20x", APP_DESC_MAGIC, 0, version.encode(),
                       project.encode(), time.encode(), date.encode(), idf.encode(),
                       elf_sha256).ljust(256, b"\0")


def elf_sha256(project: str, version: str, seed: int = 1) -> bytes:
    """The ELF SHA256 written into the app's descriptor (a stand-in: there is no ELF)."""
    return hashlib.sha256(f"{project}-{version}-{seed}".encode()).digest()


def app(project: str = "hello_world", version: str = "1.2.3", idf: str = "v5.3.1",
        seed: int = 1, log_colors: bool = False) -> bytes:
    sha = elf_sha256(project, version, seed)
    formats = COLORED_LOG_FORMATS if log_colors else b""
    rodata = app_desc(project, version, idf, sha) + formats + bytes(range(256)) * 8
    text = hashlib.sha256(str(seed).encode()).digest() * 64
    return image([(0x3F400020, rodata), (0x400D0020, text)], 0x40081000)


def bootloader(log_colors: bool = False) -> bytes:
    formats = COLORED_LOG_FORMATS if log_colors else b""
    return image([(0x3FFF0030, formats + b"\x11" * 0x1000), (0x40078000, b"\x22" * 0x2000)],
                 0x40080400)


def partition_table(app_offset: int = 0x10000, app_size: int = 0x100000) -> bytes:
    def entry(ptype: int, sub: int, offset: int, size: int, label: str) -> bytes:
        return struct.pack("<HBBII16sI", PART_MAGIC, ptype, sub, offset, size,
                           label.encode(), 0)

    body = (entry(1, 2, 0x9000, 0x6000, "nvs") + entry(1, 1, 0xF000, 0x1000, "phy_init")
            + entry(0, 0, app_offset, app_size, "factory"))
    md5 = struct.pack("<HBB", 0xEBEB, 0xFF, 0xFF) + b"\xff" * 12 + hashlib.md5(body).digest()
    return (body + md5).ljust(0xC00, b"\xff")
