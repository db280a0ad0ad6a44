"""The board's loader as espefuse sees it: the same commands, fewer round trips.

espefuse programs a block with one serial command per register access (espefuse
5.6 `efuse/base_fields.py` `EfuseBlockBase.burn_words`, lines 386-430; the chips'
`fields.py` `efuse_controller_setup`, `efuse_program`, `efuse_read`,
`get_coding_scheme_warnings`): about 250 READ_REG/WRITE_REG round trips per block
program on an ESP32-C3, each a full request and answer on the serial line. Everything
espefuse asks of the chip still reaches it, in its order; two things change how:

- **Writes travel together, on the stub.** Consecutive `write_reg` calls go as one
  WRITE_REG command whose payload holds each write as the 16-byte entry esptool would
  have sent alone (`loader.py` `write_reg`: address, value, mask, delay). The stubs run
  every entry in order: esp-flasher-stub's `s_write_reg` loops over them, the legacy
  stub's `handle_write_reg` takes "multiple write operations in a sequence". Pending
  writes go out before any other command (a read, or anything else asked of the
  loader), so the chip sees the same sequence; espefuse only ever reads after the
  writes that matter (it polls the command register after triggering a program or a
  read: `wait_efuse_idle`). On a ROM loader (a chip whose stub esptool refuses, e.g.
  under secure boot) each write goes alone, as espefuse sends it: esptool's own
  two-entry writes (`delay_after_us`, `loader.py` lines 1015-1026) are all that is
  known to work there.
- **A status register is read once per controller command.** The eFuse read
  registers and the error registers (`REGS.ERRORS`, the same list espefuse's
  `check-error` and its emulator read) change only when the controller reloads the
  eFuses, which only a host write to its command register starts. Between two writes,
  a second read of such a register returns what the first did, so the value is kept
  until the next write (any write: the simplest sound rule). This drops espefuse's
  repeats within one reload: the ESP32-C3's `get_coding_scheme_warnings` reads
  EFUSE_RD_RS_ERR0_REG once per block (`esp32c3/fields.py` lines 222-256, 20 reads of 2
  registers per call, six calls per block program); `burn_words` reads the block back
  (line 416) and `burn` reads it again at once (line 441); `burn_all`'s final
  `read_blocks` (line 737) reads the last programmed block a third time. Every reload
  espefuse starts still reads fresh values: its five re-checks after a program
  (`burn_words` lines 406-415) each follow a write (`efuse_read`), so a weak bit that
  shows on any of them is seen as before.

The command register itself is never kept (espefuse reads it twice on purpose: a
hardware erratum, `esp32c3/fields.py` `wait_efuse_idle`). The crystal frequency and
the chip revision are fixed for the session and asked once.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable
from typing import Any

from esptool.loader import DEFAULT_TIMEOUT
from esptool.util import mask_to_shift

WRITE_ENTRY = "<IIII"  # address, value, mask, delay (esptool loader.write_reg)
MAX_WRITES = 16
"""Entries per WRITE_REG command: 256 bytes of payload, far under the ROM's command
buffer (it takes 0x400-byte FLASH_DATA blocks); espefuse's longest run is a block's
write registers (8 to 11) after clearing them (8)."""


class EfuseLink:
    """Stands in for the loader in espefuse (`init_commands(esp=...)`)."""

    def __init__(self, esp: Any) -> None:
        self.esp = esp
        self.stable: frozenset[int] = frozenset()
        """Registers kept between writes (`keep`); none until espefuse's view exists."""
        self._seen: dict[int, int] = {}
        self._writes: list[bytes] = []
        self._together = bool(getattr(esp, "IS_STUB", False))
        self._crystal: int | None = None
        self._revision: int | None = None

    def __repr__(self) -> str:
        return f"EfuseLink({self.esp!r})"

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.esp, name)
        if callable(value):
            self.flush()  # whatever else is asked of the loader comes after the writes
        return value

    def keep(self, efuses: Any) -> None:
        """Keep espefuse's read and error registers of `efuses` (its EspEfuses) between
        writes: the block read words (`EfuseBlockBase.get_words`) and `REGS.ERRORS`."""
        addresses: set[int] = set(_words(efuses.blocks))
        addresses.update(efuses.REGS.ERRORS)
        self.stable = frozenset(addresses)

    def read_reg(self, addr: int, timeout: float = DEFAULT_TIMEOUT) -> int:
        if addr in self._seen:
            return self._seen[addr]
        self.flush()
        value = int(self.esp.read_reg(addr, timeout))
        if addr in self.stable:
            self._seen[addr] = value
        return value

    def write_reg(self, addr: int, value: int, mask: int = 0xFFFFFFFF, delay_us: int = 0,
                  delay_after_us: int = 0) -> None:
        self._seen.clear()
        self._writes.append(struct.pack(WRITE_ENTRY, addr, value, mask, delay_us))
        if delay_after_us > 0:  # esptool's own way: a dummy write that carries the delay
            self._writes.append(struct.pack(WRITE_ENTRY, self.esp.UART_DATE_REG_ADDR, 0, 0,
                                            delay_after_us))
        if not self._together or len(self._writes) >= MAX_WRITES:
            self.flush()

    def update_reg(self, addr: int, mask: int, new_val: int) -> int:
        """esptool `loader.update_reg` (read, modify, write), through this link."""
        value = self.read_reg(addr) & ~mask | (new_val << mask_to_shift(mask)) & mask
        self.write_reg(addr, value)
        return value

    def flush(self) -> None:
        """Send the pending writes as one WRITE_REG command."""
        if not self._writes:
            return
        data, self._writes = b"".join(self._writes), []
        self.esp.check_command("write target memory", self.esp.ESP_CMDS["WRITE_REG"], data)

    def flush_quietly(self) -> None:
        """After espefuse failed: its writes still go out, as they would have; a link
        that died with the failure is not a second error."""
        with contextlib.suppress(Exception):
            self.flush()
        self._writes = []

    def get_crystal_freq(self) -> int:
        if self._crystal is None:
            self._crystal = int(self.__getattr__("get_crystal_freq")())
        return self._crystal

    def get_chip_revision(self) -> int:
        if self._revision is None:
            self._revision = int(self.__getattr__("get_chip_revision")())
        return self._revision


def _words(blocks: Iterable[Any]) -> Iterable[int]:
    for block in blocks:
        yield from range(block.rd_addr, block.rd_addr + block.get_block_len(), 4)
