"""Images for the security boot tests: ESP-IDF-shaped, signed and encrypted by espsecure.

A bootloader "built for" flash encryption or secure boot carries ESP-IDF's log format
strings for them, as a real build does (boot_security.py explains the signal); the
images are laid out per chip by ``station.demo.firmware``. Signing and encryption go
through the real ``espsecure`` CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

from station.demo.firmware import esp_image, layout, partition_table
from station.sim.boot_security import APP_FE, BOOTLOADER_FE, BOOTLOADER_SB

from .boot_images import app_desc, elf_sha256
from .efusekit import espsecure

APP_AT = 0x10000
TABLE_AT = 0x8000


def bootloader(chip: str, fe: bool = False, sb: bool = False,
               extra: tuple[bytes, ...] = ()) -> bytes:
    """``extra``: more log strings of the build's configuration (device_key.py)."""
    lay = layout(chip)
    strings = (BOOTLOADER_FE + b"\0" if fe else b"") + (BOOTLOADER_SB + b"\0" if sb else b"")
    strings += b"".join(s + b"\0" for s in extra)
    segments = []
    for n, (addr, size) in enumerate(lay.boot_segments):
        fill = bytes((n * 37 + i) & 0xFF for i in range(size))
        segments.append((addr, (strings + fill)[:size] if n == 0 else fill))
    return esp_image(chip, lay.boot_entry, segments)


def app(chip: str, fe: bool = False, project: str = "locked") -> bytes:
    lay = layout(chip)
    rodata = app_desc(project, "2.0.0", "v5.5.1", elf_sha256(project, "2.0.0"))
    rodata += (APP_FE + b"\0" if fe else b"") + bytes(range(256)) * 16
    text = os.urandom(0x4000)
    return esp_image(chip, lay.app_entry, [(lay.drom, rodata), (lay.irom, text)])


def table() -> bytes:
    """ESP-IDF's "factory app, two OTA definitions" layout, up to the factory app."""
    return partition_table([("nvs", 1, 0x02, 0x9000, 0x4000),
                            ("otadata", 1, 0x00, 0xD000, 0x2000),
                            ("phy_init", 1, 0x01, 0xF000, 0x1000),
                            ("factory", 0, 0x00, APP_AT, 0x100000)])


def sign(data: bytes, key: Path, tmp: Path) -> bytes:
    """``espsecure sign-data --version 2``: padded to 4 KB plus a signature sector."""
    src, out = tmp / "unsigned.bin", tmp / "signed.bin"
    src.write_bytes(data)
    result = espsecure("sign-data", "--version", "2", "--keyfile", str(key), "--output",
                       str(out), str(src))
    assert result.returncode == 0, result.output
    return out.read_bytes()


def encrypt(data: bytes, key: Path, address: int, chip: str, tmp: Path) -> bytes:
    """``espsecure encrypt-flash-data`` at ``address`` (padded to 16 bytes first)."""
    src, out = tmp / "plain.bin", tmp / "cipher.bin"
    src.write_bytes(data.ljust(-(-len(data) // 16) * 16, b"\xff"))
    scheme = ["--flash-crypt-conf", "0xF"] if chip == "esp32" else ["--aes-xts"]
    result = espsecure("encrypt-flash-data", *scheme, "--keyfile", str(key), "--address",
                       hex(address), "--output", str(out), str(src))
    assert result.returncode == 0, result.output
    return out.read_bytes()


def signing_key(path: Path, scheme: str = "rsa3072") -> Path:
    result = espsecure("generate-signing-key", "--version", "2", "--scheme", scheme,
                       str(path))
    assert result.returncode == 0, result.output
    return path


def flash_image(parts: dict[int, bytes], size: int = 0x400000) -> bytes:
    flash = bytearray(b"\xff" * size)
    for offset, data in parts.items():
        flash[offset:offset + len(data)] = data
    return bytes(flash)
