"""Flash encryption enabled by the bootloader on first boot, with a key the chip makes.

A bootloader built for flash encryption (:mod:`.boot_security` reads that from its log
strings) finds encryption off: ESP-IDF v5.5.1 ``bootloader_utility.c`` ``load_image``
then runs ``esp_flash_encrypt_init`` (``flash_encryption/flash_encrypt.c``:
``check_and_generate_encryption_keys``, ``esp_flash_encryption_enable_secure_features``
from ``<chip>/flash_encryption_secure_features.c``), ``esp_flash_encrypt_contents``
(bootloader, partition table, then every partition that must be encrypted) and
``esp_flash_encrypt_enable`` (the crypt counter), and resets. The lines and their order
are ESP-IDF's; the sample logs are ``docs/en/security/esp32*_log.inc``.

Configuration the images cannot state is read from the strings the build leaves in the
bootloader, as ESP-IDF compiles them in only for that configuration:
``Not disabling UART bootloader encryption`` (``SECURE_FLASH_UART_BOOTLOADER_ALLOW_ENC``,
development mode), ``Not disabling UART bootloader cache - SECURITY COMPROMISED``,
``Not disabling JTAG - SECURITY COMPROMISED``, ``Setting CRYPT_CNT for permanent
encryption`` (release mode: the counter goes straight to its maximum). The key is
XTS_AES_128_KEY in the first free key block (ESP32: BLOCK1 with FLASH_CRYPT_CONFIG 0xF);
AES-256 and the key manager are not modelled.

**Time.** ``esp_flash_encrypt_region`` reads, erases and rewrites each 4 KB sector in
turn; the board's flash model gives each its time (read, 45 ms erase, 16 pages x 0.7 ms:
about 14.5 s per MB). ESP-IDF's sample logs show 0x100000 bytes encrypted in 10.9 s
(S3), 12.5 s (ESP32) and 14.0 s (C3). The key burn takes the eFuse controller's time
(:mod:`.efuse_timing`). Each piece of work happens when its time has passed, sector by
sector (the erase, then the write of the ciphertext), so a reset in the middle leaves
what a real chip leaves. ESP-IDF v5.5.1 ``bootloader_utility.c`` ``load_image`` spells
it out: a reset before the bootloader's turn (the key generated and burned, nothing
encrypted) and the next boot uses the pre-loaded key and starts over; a reset once the
bootloader's first sector is rewritten and the ROM reads ciphertext with encryption
still off ("the next boot will fail ... Only solution is to reflash with all
plaintext"); a sector caught between its erase and its write is left erased.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from esptool.bin_image import LoadFirmwareImage

from . import secure_boot as sb
from .boot_log import PARTITION_TABLE_OFFSET
from .chips import ChipSpec
from .efuse import EfuseArray
from .efuse_timing import program_seconds
from .flash import SECTOR, Flash
from .flash_crypto import chip_cipher, has_key

ALLOW_ENC = b"Not disabling UART bootloader encryption"
ALLOW_CACHE = b"Not disabling UART bootloader cache - SECURITY COMPROMISED"
ALLOW_JTAG = b"Not disabling JTAG - SECURITY COMPROMISED"
RELEASE = b"Setting CRYPT_CNT for permanent encryption"
_PART = struct.Struct("<HBBII16sI")
# partitions encrypted unconditionally (encrypt_partition): otadata, TEE otadata, NVS keys
_ALWAYS = {(1, 0x00), (1, 0x90), (1, 0x04)}


@dataclass
class Step:
    """Lines the chip prints, the seconds it then works, what that work changes
    (``what``: "burn", "erase 0x..." / "write 0x..." per sector, "enable", or "")."""

    lines: list[str]
    seconds: float = 0.0
    action: Callable[[], None] | None = None
    what: str = ""


@dataclass
class FirstBoot:
    steps: list[Step] = field(default_factory=list)


class _Clock:
    """ESP-IDF log lines with the time the work took."""

    def __init__(self, log: Any) -> None:
        self.ms = log.ms
        self.lines: list[str] = []

    def line(self, tag: str, text: str, level: str = "I") -> None:
        self.ms += 4
        self.lines.append(f"{level} ({self.ms}) {tag}: {text}")

    def cut(self, seconds: float = 0.0, action: Callable[[], None] | None = None,
            what: str = "") -> Step:
        step = Step(self.lines, seconds, action, what)
        self.lines = []
        self.ms += int(seconds * 1000)
        return step

    def work(self, steps: list[Step]) -> list[Step]:
        """The lines so far, then ``steps`` (timed work that prints nothing)."""
        self.ms += int(sum(step.seconds for step in steps) * 1000)
        head, self.lines = Step(self.lines), []
        return [head, *steps]


def _key_index(efuses: EfuseArray, block_id: int) -> int:
    """BLOCK_KEYn's n (the log names key blocks from EFUSE_BLK_KEY0)."""
    name = efuses.ctrl.Blocks.get(efuses.ctrl.Blocks.BLOCKS[block_id]).name
    return int(name.removeprefix("BLOCK_KEY")) if name.startswith("BLOCK_KEY") else block_id


def _region(flash: Flash, efuses: EfuseArray, start: int, length: int) -> list[Step]:
    """``esp_flash_encrypt_region``: per 4 KB sector, read it and erase it, then write
    it back through the flash encryption block (the key in eFuse)."""
    steps: list[Step] = []
    timing = flash.timing
    end = min(len(flash.data), start + -(-length // SECTOR) * SECTOR)
    for addr in range(start, end, SECTOR):
        held: list[bytes] = []

        def erase(addr: int = addr, held: list[bytes] = held) -> None:
            held.append(bytes(flash.data[addr:addr + SECTOR]))
            flash.data[addr:addr + SECTOR] = b"\xff" * SECTOR

        def write(addr: int = addr, held: list[bytes] = held) -> None:
            flash.data[addr:addr + SECTOR] = chip_cipher(efuses).encrypt(addr, held[0])

        steps.append(Step([], timing.read(SECTOR) + timing.erase(1, 0), erase,
                          f"erase {addr:#x}"))
        steps.append(Step([], timing.program(SECTOR), write, f"write {addr:#x}"))
    return steps


def _image_len(chip: str, data: bytes, signed: bool) -> int | None:
    try:
        image = LoadFirmwareImage(chip, data)
    except Exception:
        return None
    length = sb.image_length(image)
    return sb.signature_sector_at(0, length) + sb.SECTOR if signed else length


def _segment_lines(clock: _Clock, chip: str, data: bytes, offset: int, rom: Any) -> None:
    """``esp_image_verify`` logs each segment (verify mode: ``map`` or nothing)."""
    try:
        image = LoadFirmwareImage(chip, data)
    except Exception:
        return
    for n, seg in enumerate(image.segments):
        mapped = any(lo <= seg.addr < hi for lo, hi in (
            (rom.IROM_MAP_START, rom.IROM_MAP_END), (rom.DROM_MAP_START, rom.DROM_MAP_END)))
        clock.line("esp_image", f"segment {n}: paddr={offset + seg.file_offs + 8:08x} "
                   f"vaddr={seg.addr:08x} size={len(seg.data):05x}h ({len(seg.data):6d})"
                   + (" map" if mapped else ""))


def first_boot(spec: ChipSpec, efuses: EfuseArray, flash: Flash, bootloader: bytes,
               log: Any, secure_boot: bool) -> FirstBoot:
    """The steps of ``esp_flash_encrypt_init``/``_contents``/``_enable``."""
    clock = _Clock(log)
    run = FirstBoot()
    esp32 = spec.name == "esp32"
    free: int | None = None
    clock.line("efuse", "Batch mode of writing fields is enabled")
    if has_key(efuses):
        clock.line("flash_encrypt", "Using pre-loaded flash encryption key in efuse")
        key = None
    else:
        clock.line("flash_encrypt", "Generating new flash encryption key...")
        key = os.urandom(32)
        free = efuses.free_key_block()
        if not esp32 and free is not None:
            clock.line("efuse", f"Writing EFUSE_BLK_KEY{_key_index(efuses, free)} with "
                       f"purpose {efuses.purpose_number('XTS_AES_128_KEY')}")
    burns: list[tuple[str, int]] = []

    def feature(allowed: bytes, off_text: str, on_text: str, names: list[str]) -> None:
        if allowed in bootloader:
            clock.line("flash_encrypt", off_text, "W")
        else:
            clock.line("flash_encrypt", on_text)
            burns.extend((n, 1) for n in names if efuses.has(n))

    if esp32:
        clock.line("flash_encrypt", "Setting CRYPT_CONFIG efuse to 0xF")
        burns.append(("FLASH_CRYPT_CONFIG", 0xF))
        feature(ALLOW_ENC, "Not disabling UART bootloader encryption",
                "Disable UART bootloader encryption...", ["DISABLE_DL_ENCRYPT"])
        clock.line("flash_encrypt", "Disable UART bootloader decryption...")
        clock.line("flash_encrypt", "Disable UART bootloader MMU cache...")
        clock.line("flash_encrypt", "Disable JTAG...")
        clock.line("flash_encrypt", "Disable ROM BASIC interpreter fallback...")
        burns += [("DISABLE_DL_DECRYPT", 1), ("DISABLE_DL_CACHE", 1), ("JTAG_DISABLE", 1),
                  ("CONSOLE_DEBUG_DISABLE", 1)]
    else:
        feature(ALLOW_ENC, "Not disabling UART bootloader encryption",
                "Disable UART bootloader encryption...", ["DIS_DOWNLOAD_MANUAL_ENCRYPT"])
        feature(ALLOW_CACHE, "Not disabling UART bootloader cache - SECURITY COMPROMISED",
                "Disable UART bootloader cache...",
                ["DIS_DOWNLOAD_DCACHE", "DIS_DOWNLOAD_ICACHE"])
        feature(ALLOW_JTAG, "Not disabling JTAG - SECURITY COMPROMISED", "Disable JTAG...",
                ["DIS_PAD_JTAG", "DIS_USB_JTAG"])
        burns.append(("DIS_DIRECT_BOOT", 1))
    clock.line("efuse", "Batch mode. Prepared fields are committed")

    def burn_init() -> None:
        if key is not None:
            if esp32:
                efuses.burn_key(1, key, None, read_protect=True)
            elif free is not None:
                efuses.burn_key(free, key, "XTS_AES_128_KEY", read_protect=True)
        for name, value in burns:
            if efuses.has(name):
                efuses.burn(name, value)
        if not esp32 and efuses.has("DIS_ICACHE"):
            efuses.burn_write_protection("DIS_ICACHE")
        efuses.commit()

    # esp_efuse_batch_write_commit: the key block, then BLOCK0 (:mod:`.efuse_timing`)
    seconds = program_seconds(len(burns) + 2, 256)
    if key is not None:
        seconds += program_seconds(sum(bin(b).count("1") for b in key), len(key) * 8)
    run.steps.append(clock.cut(seconds, burn_init, "burn"))
    _encrypt_contents(spec, efuses, flash, clock, run, secure_boot)
    return run


def _encrypt_contents(spec: ChipSpec, efuses: EfuseArray, flash: Flash, clock: _Clock,
                      run: FirstBoot, secure_boot: bool) -> None:
    data = bytes(flash.data)
    boot_at = spec.bootloader_offset

    boot_len = _image_len(spec.name, data[boot_at:PARTITION_TABLE_OFFSET], secure_boot)
    if boot_len is None:
        clock.line("flash_encrypt", "no valid bootloader was found", "W")
        run.steps.append(clock.cut())
        return
    _segment_lines(clock, spec.name, data[boot_at:PARTITION_TABLE_OFFSET], boot_at,
                   spec.rom_class)
    run.steps += clock.work(_region(flash, efuses, boot_at, boot_len))
    clock.line("flash_encrypt", "bootloader encrypted successfully")
    run.steps += clock.work(_region(flash, efuses, PARTITION_TABLE_OFFSET, SECTOR))
    clock.line("flash_encrypt", "partition table encrypted and loaded successfully")
    rows = range(PARTITION_TABLE_OFFSET, PARTITION_TABLE_OFFSET + 0xC00, _PART.size)
    for index, pos in enumerate(rows):
        magic, ptype, sub, offset, size, _label, flags = _PART.unpack_from(data, pos)
        if magic != 0x50AA:
            break
        length: int | None = size if flags & 1 or (ptype, sub) in _ALWAYS else None
        if ptype == 0:
            length = _image_len(spec.name, data[offset:offset + size], secure_boot)
            if length is not None:  # CONFIG_SECURE_FLASH_ENCRYPT_ONLY_IMAGE_LEN_IN_APP_PART
                _segment_lines(clock, spec.name, data[offset:offset + size], offset,
                               spec.rom_class)
        if length:
            clock.line("flash_encrypt", f"Encrypting partition {index} at offset "
                       f"0x{offset:x} (length 0x{length:x})...")
            run.steps += clock.work(_region(flash, efuses, offset, length))
            clock.line("flash_encrypt", "Done encrypting")
    release = RELEASE in data[boot_at:PARTITION_TABLE_OFFSET]
    if release:
        clock.line("flash_encrypt", "Setting CRYPT_CNT for permanent encryption")

    def enable() -> None:
        bits = efuses.crypt_cnt_bits
        cnt = efuses.crypt_cnt
        # release: straight to the maximum; else the least significant 0 bit
        new = (1 << bits) - 1 if release else cnt | (~cnt & (cnt + 1))
        efuses.burn(efuses.crypt_cnt_name, new)
        efuses.commit()

    # esp_flash_encrypt_enable burns (one BLOCK0 program command), then logs
    blown = efuses.crypt_cnt_bits if release else 1
    run.steps.append(clock.cut(program_seconds(blown, 256), enable, "enable"))
    clock.line("flash_encrypt", "Flash encryption completed")
    clock.line("boot", "Resetting with flash encryption enabled...")
    run.steps.append(clock.cut())
