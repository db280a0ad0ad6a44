"""A deterministic, ESP-IDF-like build for demos, tests and benchmarks.

`make_demo_firmware` writes what `idf.py build` leaves in `build/`: a bootloader, a
partition table, an app and `flasher_args.json`. The images are not runnable, but they
are valid ESP images for the chip (magic, segments, flash mode and size, entry point,
extended header with the chip id, checksum and appended SHA256; esptool's `image-info`
reads them), and the app compresses like a real one (about 60% of its size after zlib -9),
so flash times and progress look like the real thing.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from esptool.targets import CHIP_DEFS

from station import chips
from station.flash import (
    EXTENDED_HEADER,
    IMAGE_HEADER,
    PARTITION_ENTRY,
    PARTITION_MD5_MAGIC,
    PARTITION_TABLE_MAX,
    SEGMENT_HEADER,
    xor_checksum,
)
from station.flash.bootcheck import SECURE_CERT_OK
from station.security.images import APP_FE, BOOTLOADER_FE, BOOTLOADER_RELEASE, BOOTLOADER_SB

PARTITION_TABLE_OFFSET = 0x8000
APP_OFFSET = 0x10000
FLASH_SIZE = 4 << 20
APP_DESC_MAGIC = 0xABCD5432
# Share of "instruction" pieces that are incompressible (literal pools, tables, data);
# tuned so the app compresses to ~60% with zlib -9 (tests/test_firmware.py asserts it).
RANDOM_SHARE = 0.175
# Log formats as a CONFIG_LOG_COLORS=y build compiles them (esp_log.h LOG_FORMAT: colour,
# letter, "(%lu) %s: ", the message, LOG_RESET_COLOR).
COLORED_LOG_FORMATS = (b"\x1b[0;31mE (%lu) %s: %s\x1b[0m\n\0\x1b[0;33mW (%lu) %s: %s\x1b[0m\n\0"
                       b"\x1b[0;32mI (%lu) %s: %s\x1b[0m\n\0")


@dataclass(frozen=True)
class _ChipLayout:
    flash_freq: int  # low nibble of header byte 3
    freq_name: str
    max_rev_full: int
    boot_segments: tuple[tuple[int, int], ...]  # (load address, size)
    boot_entry: int
    drom: int
    dram: int
    iram: int
    irom: int
    app_entry: int


LAYOUTS = {
    "esp32": _ChipLayout(0x0, "40m", 399, ((0x3FFF0030, 0x1184), (0x40078000, 0x3D2C),
                                           (0x40080400, 0x0E94)), 0x40080618,
                         0x3F400020, 0x3FFB0000, 0x40080000, 0x400D0020, 0x40081B28),
    "esp32s3": _ChipLayout(0xF, "80m", 99, ((0x3FCE3810, 0x1034), (0x403C9700, 0x3D70),
                                            (0x403CC710, 0x0EF8)), 0x403C98D0,
                           0x3C020020, 0x3FC92700, 0x40374000, 0x42000020, 0x40375288),
    "esp32c3": _ChipLayout(0xF, "80m", 199, ((0x3FCD5820, 0x0E08), (0x403CC710, 0x2F10),
                                             (0x403CE710, 0x16A8)), 0x403CC71A,
                           0x3C020020, 0x3FC8B000, 0x40380000, 0x42000020, 0x40380080),
}


def layout(chip: str) -> _ChipLayout:
    """The hand-made layouts above, else one derived from esptool's memory map of the chip
    (flash-mapped segments at the start of its IROM/DROM windows, RAM segments in its
    DRAM/IRAM): not a real build's addresses, but where the chip maps such segments."""
    if chip in LAYOUTS:
        return LAYOUTS[chip]
    chips.facts(chip)  # KeyError for a chip esptool does not know
    rom = CHIP_DEFS[chip]
    ram = {name: start for start, _, name in rom.MEMORY_MAP}
    freq = next((f for f in ("80m", "40m") if f in rom.FLASH_FREQUENCY),
                next(iter(rom.FLASH_FREQUENCY)))
    dram, iram = ram.get("DRAM", 0x40800000), ram.get("IRAM", 0x40800000)
    boot_dram, boot_iram = dram + 0x40000, iram + 0x48000
    return _ChipLayout(rom.FLASH_FREQUENCY[freq], freq, 99,
                       ((boot_dram, 0x1000), (boot_iram, 0x3000), (boot_iram + 0x4000, 0xE00)),
                       boot_iram + 0x10, rom.DROM_MAP_START + 0x20, dram + 0x10000,
                       iram + 0x8000, rom.IROM_MAP_START + 0x20, iram + 0x8080)

_WORDS = (
    "wifi", "esp_netif", "tcpip_adapter", "nvs_flash", "event", "loop", "task", "heap",
    "spi_flash", "partition", "mqtt", "tls", "handshake", "cert", "device", "shadow", "ota",
    "update", "boot", "app_main", "init", "failed", "ok", "timeout", "retry", "connect",
    "disconnect", "station", "ap", "scan", "channel", "rssi", "ssid", "password", "gpio",
    "uart", "i2c", "adc", "ledc", "timer", "queue", "semaphore", "mutex", "notify", "core",
    "panic", "abort", "assert", "stack", "overflow", "watchdog", "reset", "reason",
    "brownout", "sleep", "wake",
)
_FORMATS = ("E (%d) {}: {} {} (0x%x)\n", "W (%d) {}: {} %s {}\n", "I (%d) {}: {} {} %d\n",
            "{}_{}_{}", "/IDF/components/{}/{}.c", "{}: {} {} %s:%d")


def _text(rng: random.Random, size: int) -> bytes:
    """Log strings and symbol names, like an app's .rodata."""
    parts: list[str] = []
    n = 0
    while n < size:
        s = rng.choice(_FORMATS).format(*rng.choices(_WORDS, k=3)) + "\0"
        parts.append(s)
        n += len(s)
    return "".join(parts).encode()[:size]


def _code(rng: random.Random, size: int) -> bytes:
    """Machine-code-like bytes: a small vocabulary of 'instructions' mixed with raw data."""
    vocab = [rng.randbytes(3) for _ in range(400)]
    pieces: list[bytes] = []
    n = 0
    while n < size:
        if rng.random() < RANDOM_SHARE:
            piece = rng.randbytes(48)
        else:
            piece = b"".join(rng.choices(vocab, k=16))
        pieces.append(piece)
        n += len(piece)
    return b"".join(pieces)[:size]


def _app_desc(rng: random.Random, chip: str) -> bytes:
    """esp_app_desc_t, the 256 bytes at the start of an app's first DROM segment."""
    def cstr(s: str, n: int) -> bytes:
        return s.encode()[:n - 1].ljust(n, b"\0")

    return (struct.pack("<III4x", APP_DESC_MAGIC, 0, 0) + cstr("1.0.0", 32)
            + cstr(f"station-demo-{chip}", 32) + cstr("12:00:00", 16) + cstr("Jan  1 2025", 16)
            + cstr("v5.4.1", 32) + rng.randbytes(32) + struct.pack("<HHB3x", 0, 199, 16)
            + b"\0" * 72)


def esp_image(chip: str, entry: int, segments: list[tuple[int, bytes]],
              flash_size_code: int = 2, min_rev_full: int = 0) -> bytes:
    """An ESP image: header, extended header, segments, checksum, appended SHA256."""
    chip_layout = layout(chip)
    out = bytearray(IMAGE_HEADER.pack(0xE9, len(segments), 2,  # 2: DIO
                                      (flash_size_code << 4) | chip_layout.flash_freq, entry))
    out += EXTENDED_HEADER.pack(0xEE, 0, 0, 0, chips.facts(chip).image_chip_id,
                                min_rev_full // 100, min_rev_full,
                                chip_layout.max_rev_full,
                                b"\0" * 4, 1)
    state = 0xEF
    for addr, data in segments:
        out += SEGMENT_HEADER.pack(addr, len(data)) + data
        state = xor_checksum(data, state)
    out += b"\0" * (15 - len(out) % 16)
    out.append(state)
    out += hashlib.sha256(out).digest()
    return bytes(out)


def partition_table(rows: list[tuple[str, int, int, int, int]],
                    encrypted: tuple[str, ...] = ()) -> bytes:
    """(label, type, subtype, offset, size) rows -> partition-table.bin with its MD5 row;
    the partitions named in `encrypted` carry the `encrypted` flag (bit 0)."""
    body = b"".join(PARTITION_ENTRY.pack(b"\xaa\x50", t, st, off, size, label.encode(),
                                         1 if label in encrypted else 0)
                    for label, t, st, off, size in rows)
    table = body + PARTITION_MD5_MAGIC + hashlib.md5(body).digest()
    return table.ljust(PARTITION_TABLE_MAX, b"\xff")


def make_demo_firmware(out_dir: Path, chip: str = "esp32", app_size: int = 1_500_000,
                       seed: int = 1, log_colors: bool = False, secure: bool = False,
                       device_key: bool = False, secure_cert: bool = False,
                       nvs_keys: bool = False) -> Path:
    """Write a demo ESP-IDF build into `out_dir`; returns its flasher_args.json.

    `log_colors`: built with CONFIG_LOG_COLORS=y (ESP-IDF's default up to v5.3): the log
    formats in both images carry ANSI colour codes, so the board's lines come coloured.
    `secure`: built with flash encryption and secure boot v2 (the bootloader and app
    carry ESP-IDF's log strings of those features, station/security/images.py; an ESP32
    build asks for silicon v3.0, CONFIG_ESP32_REV_MIN_3), unsigned. `device_key`: built
    for release-mode flash encryption only, the bootloader making the key on first boot
    (its release-mode string, no secure boot).
    `secure_cert`: the
    table has esp_secure_cert_mgr's example row `esp_secure_cert, 0x3F, , 0xD000, 0x2000,
    encrypted` (nvs shrinks to 0x4000 to make room).
    `nvs_keys`: the table has the NVS-encryption key partition `nvs_key, data, nvs_keys, ,
    0x1000, encrypted` after the app, where ESP-IDF's `security/flash_encryption` example
    puts it (the flash-encryption-based scheme of NVS encryption)."""
    if chip not in chips.supported():
        raise ValueError(f"unknown chip {chip!r} (one of {', '.join(chips.supported())})")
    if not 0x4000 <= app_size <= FLASH_SIZE - APP_OFFSET:
        raise ValueError(f"app_size {app_size} must be within 16 KB..{FLASH_SIZE - APP_OFFSET}")
    chip_layout = layout(chip)
    rng = random.Random(f"station-demo:{chip}:{seed}")

    formats = COLORED_LOG_FORMATS if log_colors else b""
    boot_strings = formats + (BOOTLOADER_FE + b"\0" + BOOTLOADER_SB + b"\0" if secure else b"")
    boot_strings += BOOTLOADER_FE + b"\0" + BOOTLOADER_RELEASE + b"\0" if device_key else b""
    boot_segments = [(addr, _code(rng, size)) for addr, size in chip_layout.boot_segments]
    first_addr, first = boot_segments[0]
    boot_segments[0] = (first_addr, boot_strings + first[len(boot_strings):])
    boot = esp_image(chip, chip_layout.boot_entry, boot_segments,
                     min_rev_full=300 if secure and chip == "esp32" else 0)
    formats += APP_FE + b"\0" if secure or device_key else b""
    formats += SECURE_CERT_OK.encode() + b"\0" if secure_cert else b""  # reads its credentials

    overhead = IMAGE_HEADER.size + EXTENDED_HEADER.size + 4 * SEGMENT_HEADER.size + 16 + 32
    body = app_size - overhead
    drom = (body // 5) & ~3
    dram = min(0x2000, body // 20) & ~3
    iram = min(0xC000, body // 8) & ~3
    irom = (body - drom - dram - iram) & ~3
    app = esp_image(chip, chip_layout.app_entry, [
        (chip_layout.drom, _app_desc(rng, chip) + formats + _text(rng, drom - 256 - len(formats))),
        (chip_layout.dram, _code(rng, dram)),
        (chip_layout.iram, _code(rng, iram)),
        (chip_layout.irom, _code(rng, irom)),
    ])
    factory = max(0x100000, -(-len(app) // 0x10000) * 0x10000)
    if secure_cert:
        table = partition_table([("nvs", 1, 0x02, 0x9000, 0x4000),
                                 ("esp_secure_cert", 0x3F, 0x00, 0xD000, 0x2000),
                                 ("phy_init", 1, 0x01, 0xF000, 0x1000),
                                 ("factory", 0, 0x00, APP_OFFSET, factory)],
                                encrypted=("esp_secure_cert",))
    else:
        table = partition_table([("nvs", 1, 0x02, 0x9000, 0x6000),
                                 ("phy_init", 1, 0x01, 0xF000, 0x1000),
                                 ("factory", 0, 0x00, APP_OFFSET, factory)]
                                + [("nvs_key", 1, 0x04, APP_OFFSET + factory, 0x1000)]
                                * nvs_keys, encrypted=("nvs_key",))

    out_dir.mkdir(parents=True, exist_ok=True)
    boot_at = chips.facts(chip).bootloader_offset
    files = {boot_at: ("bootloader/bootloader.bin", boot),
             PARTITION_TABLE_OFFSET: ("partition_table/partition-table.bin", table),
             APP_OFFSET: ("app.bin", app)}
    for name, data in files.values():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_bytes(data)

    settings = {"flash_mode": "dio", "flash_size": "4MB", "flash_freq": chip_layout.freq_name}
    role = {boot_at: "bootloader", PARTITION_TABLE_OFFSET: "partition-table",
            APP_OFFSET: "app"}
    doc = {
        "write_flash_args": ["--flash_mode", "dio", "--flash_size", "4MB",
                             "--flash_freq", chip_layout.freq_name],
        "flash_settings": settings,
        "flash_files": {f"0x{off:x}": name for off, (name, _) in sorted(files.items())},
        **{role[off]: {"offset": f"0x{off:x}", "file": name, "encrypted": "false"}
           for off, (name, _) in sorted(files.items())},
        "extra_esptool_args": {"after": "hard_reset", "before": "default_reset",
                               "stub": True, "chip": chip},
    }
    path = out_dir / "flasher_args.json"
    path.write_text(json.dumps(doc, indent=4) + "\n")
    return path
