"""A board's eFuses: espefuse's own emulator for the chip, behind its register window.

espefuse ships, per chip, the class behind ``espefuse --virt``
(``espefuse/efuse/<chip>/emulate_efuse_controller.py``, ``EmulateEfuseController``): a
model of the eFuse controller's registers (``REGS.DR_REG_EFUSE_BASE``, ``EFUSE_MEM_SIZE``
bytes) that programs the write registers into the read registers on the burn command,
checks the coding scheme (RS on the newer chips, 3/4 on the ESP32), honours ``WR_DIS``
and clears read-protected blocks (``RD_DIS``). espefuse itself talks to a chip only with
READ_REG/WRITE_REG in that window (plus GET_SECURITY_INFO and the crystal), so a virtual
board hands every access in the window to an instance of that class: the real
``espefuse`` CLI and library then burn and read a virtual board as they would a chip.
That this is enough is an inference from espefuse's code, not an Espressif interface.

One thing the emulator throws away that the silicon keeps: a read-protected key is still
in the fuses, and the chip's flash-encryption and secure-boot hardware use it. The
emulator zeroes such a block in its memory (what a read returns); :class:`EfuseArray`
keeps the burned bits of every block it zeroes ("hidden"), so the flash model can
encrypt with the key nobody can read.

Persistence: ``efuse-<mac>.bin`` is the emulator's own file (``--path-efuse-file``:
``espefuse --virt --chip X --path-efuse-file F summary`` reads it); the hidden key bits
go beside it in ``efuse-<mac>.keys`` (mode 0600), a file no real chip has. The rig
loads them for the same board again (a replug, or ``--persist``).

What the emulator does instantly takes the chip's time here: a program command keeps
the command register set while the bits are blown (:mod:`.efuse_timing`). The chip's
own burns (the bootloader's, a board locked by another line) are :mod:`.efuse_burns`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import cache
from pathlib import Path
from typing import Any

from esptool import FatalError

from station.security.efuse_defs import parse_once

from .efuse_burns import ChipBurns, espefuse_module, key_purposes
from .efuse_timing import pending_bits, program_seconds

log = logging.getLogger(__name__)

# GET_SECURITY_INFO flag bits (esptool loader.get_security_info, SECURITY_INFO_FLAG_MAP:
# "taken from the ROM code ... same across all targets") and the eFuse each reports,
# by espefuse's field name or alias (first one the chip has).
SECURITY_FLAG_FIELDS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (0, ("SECURE_BOOT_EN",)),
    (1, ("SECURE_BOOT_AGGRESSIVE_REVOKE",)),
    (2, ("ENABLE_SECURITY_DOWNLOAD",)),
    (3, ("SECURE_BOOT_KEY_REVOKE0",)),
    (4, ("SECURE_BOOT_KEY_REVOKE1",)),
    (5, ("SECURE_BOOT_KEY_REVOKE2",)),
    (6, ("SOFT_DIS_JTAG",)),
    (7, ("HARD_DIS_JTAG",)),  # alias of DIS_PAD_JTAG on the S3
    (8, ("DIS_USB",)),  # alias of DIS_USB_OTG on the S3
    (9, ("DIS_DOWNLOAD_DCACHE",)),
    (10, ("DIS_DOWNLOAD_ICACHE",)),
)
KEY_PURPOSE_SLOTS = 7  # "7x1 byte key_purposes" (esptool docs, serial-protocol.rst)


@cache
def controller_class(chip: str) -> type[Any]:
    """espefuse's emulator class for ``chip``, extended to keep read-protected bits."""
    module = espefuse_module(f"efuse.{chip}.emulate_efuse_controller")
    parse_once(module)  # one parse of the chip's table per rig, not one per board
    base: type[Any] = module.EmulateEfuseController
    return type(f"SiliconEfuses_{chip}", (_KeepsHiddenBits, base), {})


class _KeepsHiddenBits:
    """Mixin over an ``EmulateEfuseController``: remember what RD_DIS hides."""

    hidden: dict[int, Any]  # block id -> BitStream of its burned bits

    def check_rd_protection_area(self) -> None:
        ctrl: Any = self
        rd_dis = ctrl.read_field("RD_DIS", bitstring=False)
        for entry in ctrl.Blocks.BLOCKS:
            blk = ctrl.Blocks.get(entry)
            if (blk.read_disable_bit is not None and blk.id not in self.hidden
                    and rd_dis & ctrl.get_read_disable_mask(blk)):
                self.hidden[blk.id] = ctrl.read_block(blk.id).copy()
        super().check_rd_protection_area()  # type: ignore[misc]

    def update_block(self, blk: Any, wr_data: Any) -> None:
        if blk.id in self.hidden:  # the fuses take the new bits; reads stay zero
            self.hidden[blk.id] = self.hidden[blk.id] | wr_data
        super().update_block(blk, wr_data)  # type: ignore[misc]


class EfuseArray(ChipBurns):
    """One board's eFuses: the chip's emulator, its file, and what the ROM reads of it."""

    def __init__(self, chip: str, path: Path | None = None,
                 seed: dict[int, int] | None = None, load: bool = True) -> None:
        """``path``: the board's file, read if ``load`` and it exists (the same chip
        again), else written anew from ``seed`` (a new chip: MAC and revision words)."""
        self.chip = chip
        self.path = path
        cls = controller_class(chip)
        # The emulator could read and write the file itself (its efuse_file), but it
        # leaves the file objects open; the same format is read and written here.
        self.ctrl: Any = cls(None)
        self.ctrl.hidden = {}
        self.base: int = self.ctrl.REGS.DR_REG_EFUSE_BASE
        self.size: int = self.ctrl.REGS.EFUSE_MEM_SIZE
        regs = self.ctrl.REGS
        self._cmd_reg: int = getattr(regs, "EFUSE_CMD_REG", None) or regs.EFUSE_REG_CMD
        self._fields: dict[str, Any] = {}
        for efuse in self.ctrl.Fields.EFUSES:
            for name in [efuse.name, *(efuse.alt_names or [])]:
                self._fields.setdefault(name, efuse)
        self.fresh = not (load and self._load())  # a new chip
        if self.fresh:
            if self.hidden_path is not None:
                self.hidden_path.unlink(missing_ok=True)  # an earlier chip's keys
            for addr, value in (seed or {}).items():
                if self.covers(addr):
                    self.ctrl.update_reg(addr, 0xFFFFFFFF, value)
            self.save()
        self.program_count = 0  # program commands since this object was made (faults, tests)
        self.busy_until = 0.0  # time.monotonic() when the last program command is done
        self._busy_command = 0
        self.program_times: list[tuple[tuple[int, ...], float]] = []  # (blocks, s), ever
        self.weak_block: int | None = None  # fault: a bit of this block never blows
        self.rom_secure_download = False  # what the ROM loader acts on (latch_rom)
        self.rom_download_disabled = False
        self.latch_rom()

    # -- the register window ---------------------------------------------------------

    def covers(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.size

    def read(self, addr: int) -> int:
        if addr == self._cmd_reg and time.monotonic() < self.busy_until:
            return self._busy_command  # still programming (:mod:`.efuse_timing`)
        return int(self.ctrl.read_reg(addr))

    def write(self, addr: int, value: int, mask: int = 0xFFFFFFFF) -> None:
        """WRITE_REG in the window: the ROM writes ``old & ~mask | value & mask``."""
        new = (self.read(addr) & ~mask | value & mask) & 0xFFFFFFFF
        if addr == self._cmd_reg:
            self._start_busy(new)
        try:
            self.ctrl.write_reg(addr, new)
        except FatalError as e:
            # The emulator refuses data whose coding-scheme check fails (espefuse never
            # sends such data). The chip would burn it and report read errors; here the
            # burn is dropped and the controller returns to idle.
            log.warning("eFuse %s: burn refused by the emulator: %s", self.chip, e)
            self.ctrl.clean_blocks_wr_regs()
            self._idle()
        if addr == self._cmd_reg:
            self._programmed(value & mask)
            self.save()  # burned is burned: a board pulled now keeps it
            read_cmd = getattr(self.ctrl.REGS, "EFUSE_READ_CMD", None)
            if read_cmd is not None and value & mask & read_cmd:
                self.latch_rom()

    def _program_blocks(self, command: int) -> list[int]:
        """The blocks a command programs: its block number (PGM_CMD), or every block
        at once (the ESP32's EFUSE_CMD_WRITE); none for other commands."""
        regs = self.ctrl.REGS
        pgm = getattr(regs, "EFUSE_PGM_CMD", None)
        if pgm is None:
            if command != getattr(regs, "EFUSE_CMD_WRITE", -1):
                return []
            return [self.ctrl.Blocks.get(b).id for b in self.ctrl.Blocks.BLOCKS]
        return [(command >> 2) & 0xF] if command & pgm else []

    def _start_busy(self, command: int) -> None:
        """A program command keeps the command register set for as long as the
        controller blows the bits waiting in the write registers."""
        blocks = self._program_blocks(command)
        if blocks:
            seconds = program_seconds(*pending_bits(self.ctrl, blocks))
            self.busy_until = time.monotonic() + seconds
            self._busy_command = command
            self.program_times.append((tuple(blocks), seconds))

    def _programmed(self, command: int) -> None:
        """Count program commands; a weak bit leaves the RS decoder reporting an error."""
        blocks = self._program_blocks(command)
        if not blocks:
            return
        self.program_count += 1
        if len(blocks) > 1:  # ESP32: EFUSE_CMD_WRITE programs every block at once
            return
        block = blocks[0]
        regs = self.ctrl.REGS
        # (addr, num_mask, num_offs[, fail_bit]); the C3 keeps its numbers apart from its
        # misplaced fail bits (BLOCK_NUM_ERRORS, "a design error" in its mem_definition)
        table = getattr(regs, "BLOCK_ERRORS", None) or getattr(regs, "BLOCK_NUM_ERRORS", [])
        if block == self.weak_block and block < len(table):
            addr, num_mask, num_offs = table[block][:3]
            if num_mask is not None:  # one corrected byte: ERRORS:1 FAIL:False
                self.ctrl.update_reg(addr, num_mask << num_offs, 1 << num_offs)

    def _idle(self) -> None:
        self.ctrl.write_reg(self._cmd_reg, 0)

    def reset(self) -> None:
        """Chip reset: the controller's write registers come back as zeros, the ROM
        reads the eFuses afresh."""
        self.ctrl.clean_blocks_wr_regs()
        self.busy_until = 0.0  # a burn cut short: what was blown so far stays blown
        self.latch_rom()

    def latch_rom(self) -> None:
        """The ROM loader's view of secure download / download disabled.

        At reset; and on the newer chips after the controller's READ command, because
        their ROM "checks some efuse registers after each command is completed"
        (espefuse ``efuse_read``, which therefore reconnects after burning
        ENABLE_SECURITY_DOWNLOAD or DIS_DOWNLOAD_MODE). The ESP32 ROM decides at boot.
        (espefuse's emulator refreshes its read registers at the program command, the
        chip at the read command; latching here keeps the ROM on the chip's timing.)
        """
        self.rom_secure_download = self.secure_download
        self.rom_download_disabled = self.download_disabled

    # -- what the ROM and the bootloader read -----------------------------------------

    def has(self, name: str) -> bool:
        return name in self._fields

    def field(self, name: str) -> int:
        """An eFuse by espefuse's name or alias, as the read registers hold it (0 if none)."""
        efuse = self._fields.get(name)
        if efuse is None:
            return 0
        return int(self.ctrl.read_field(efuse.name, bitstring=False))

    def first(self, *names: str) -> int:
        """The first of ``names`` this chip has (0 if none)."""
        for name in names:
            if name in self._fields:
                return self.field(name)
        return 0

    def block_bytes(self, block_id: int) -> bytes:
        """A block's burned bits in register order (word 0 little-endian first), read
        protection or not: what the chip's crypto hardware sees."""
        bits = self.ctrl.hidden.get(block_id)
        if bits is None:
            bits = self.ctrl.read_block(block_id)
        return bytes(bits.bytes[::-1])

    def readable(self, block_id: int) -> bool:
        return block_id not in self.ctrl.hidden

    def blocks_with_purpose(self, purpose: str) -> list[int]:
        """Key blocks whose KEY_PURPOSE_n is ``purpose`` (espefuse's purpose names)."""
        number = key_purposes(self.chip).get(purpose)
        if number is None:
            return []
        found = []
        for entry in self.ctrl.Blocks.BLOCKS:
            blk = self.ctrl.Blocks.get(entry)
            if blk.key_purpose and self.field(blk.key_purpose) == number:
                found.append(blk.id)
        return found

    def key_purpose_bytes(self) -> bytes:
        values = []
        for entry in self.ctrl.Blocks.BLOCKS:
            blk = self.ctrl.Blocks.get(entry)
            if blk.key_purpose:
                values.append(self.field(blk.key_purpose) & 0xFF)
        return bytes(values[:KEY_PURPOSE_SLOTS]).ljust(KEY_PURPOSE_SLOTS, b"\x00")

    @property
    def crypt_cnt(self) -> int:
        """The flash-encryption counter: SPI_BOOT_CRYPT_CNT (FLASH_CRYPT_CNT on ESP32)."""
        return self.first("SPI_BOOT_CRYPT_CNT", "FLASH_CRYPT_CNT")

    @property
    def crypt_cnt_name(self) -> str:
        return "SPI_BOOT_CRYPT_CNT" if self.has("SPI_BOOT_CRYPT_CNT") else "FLASH_CRYPT_CNT"

    @property
    def crypt_cnt_bits(self) -> int:
        efuse = self._fields.get(self.crypt_cnt_name)
        return int(efuse.bit_len) if efuse is not None else 0

    def write_protected(self, name: str) -> bool:
        """Is the eFuse's WR_DIS bit burned (espefuse's table gives the bit)?"""
        efuse = self._fields.get(name)
        if efuse is None or efuse.write_disable_bit is None:
            return False
        return bool(self.field("WR_DIS") >> int(efuse.write_disable_bit) & 1)

    @property
    def flash_encryption(self) -> bool:
        """On when the counter has an odd number of bits set (ESP-IDF flash_encrypt.c)."""
        return bin(self.crypt_cnt).count("1") % 2 == 1

    @property
    def secure_download(self) -> bool:
        return bool(self.field("ENABLE_SECURITY_DOWNLOAD"))

    @property
    def download_disabled(self) -> bool:
        """No ROM download mode at all: DIS_DOWNLOAD_MODE (ESP32 V3: UART_DOWNLOAD_DIS)."""
        return bool(self.first("DIS_DOWNLOAD_MODE", "UART_DOWNLOAD_DIS"))

    @property
    def manual_encrypt_disabled(self) -> bool:
        """Encrypted writes from download mode off (ESP32: DISABLE_DL_ENCRYPT)."""
        return bool(self.first("DIS_DOWNLOAD_MANUAL_ENCRYPT", "DISABLE_DL_ENCRYPT"))

    def security_flags(self) -> int:
        flags = 0
        for bit, names in SECURITY_FLAG_FIELDS:
            value = self.first(*names)
            # JTAG is soft-disabled by an odd number of set bits (ESP-IDF docs, JTAG
            # re-enable via HMAC); how the ROM folds it into the flag is our reading
            odd = bin(value).count("1") % 2 == 1
            if odd if names[0] == "SOFT_DIS_JTAG" else value != 0:
                flags |= 1 << bit
        return flags

    def security_info(self, chip_id: int, length: int) -> bytes:
        """The GET_SECURITY_INFO payload: flags, crypt count, 7 key purposes[, chip id,
        api version] (esptool docs serial-protocol.rst; loader.get_security_info)."""
        head = (self.security_flags().to_bytes(4, "little")
                + bytes([self.crypt_cnt & 0xFF]) + self.key_purpose_bytes())
        if length == 12:
            return head
        return head + chip_id.to_bytes(4, "little") + (0).to_bytes(4, "little")

    # -- files ------------------------------------------------------------------------

    @property
    def hidden_path(self) -> Path | None:
        return None if self.path is None else self.path.with_suffix(".keys")

    def save(self) -> None:
        """Write the file in the emulator's format (``EmulateEfuseControllerBase
        .save_to_file``: its memory as ``BitStream.tofile`` writes it)."""
        if self.path is None:
            return
        with open(self.path, "wb") as f:
            self.ctrl.mem.tofile(f)
        self._save_hidden()

    def _load(self) -> bool:
        """Read the file as the emulator's constructor would; False: none (a new chip)."""
        if self.path is None or not self.path.exists():
            return False
        raw = self.path.read_bytes()
        if len(raw) != self.size:
            return False
        bitstream = espefuse_module("efuse.bitstring").BitStream
        self.ctrl.mem = bitstream(bytes=raw, length=self.size * 8)
        self._load_hidden()
        return True

    def _save_hidden(self) -> None:
        target = self.hidden_path
        if target is None or not self.ctrl.hidden:
            return
        data = {str(k): bytes(v.bytes).hex() for k, v in self.ctrl.hidden.items()}
        tmp = target.with_suffix(".keys.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, target)

    def _load_hidden(self) -> None:
        source = self.hidden_path
        if source is None or not source.exists():
            return
        bitstream = espefuse_module("efuse.bitstring").BitStream
        for key, value in json.loads(source.read_text()).items():
            raw = bytes.fromhex(value)
            self.ctrl.hidden[int(key)] = bitstream(bytes=raw, length=len(raw) * 8)


def efuse_path(directory: Path, mac: bytes) -> Path:
    """Where a board's eFuses live beside its flash dump."""
    return directory / f"efuse-{mac.hex()}.bin"
