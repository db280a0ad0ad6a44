"""The memory-mapped registers esptool reads and writes over READ_REG/WRITE_REG.

Besides plain storage (eFuses, magic values, anything esptool writes), two pieces of
hardware are emulated because esptool drives them register by register:

* the SPI0/1 controller's "user command" mode, which esptool uses to send raw SPI
  flash commands (RDID 0x9F, RDSR 0x05/0x35/0x15, SFDP 0x5A, resets). Writing the USR
  bit to SPI_CMD runs the command against the flash model; the bit reads back as 0
  (done) and W0 receives exactly the bits the command clocked in: esptool does not mask
  8-bit status reads, so stale upper bits would corrupt them;
* the UART clock divider, which esptool multiplies by the baud rate to guess the
  crystal: it is derived from the rate the host actually uses.

The eFuse controller's window is not stored here: every access in it goes to the
board's :class:`~.efuse.EfuseArray` (espefuse's own emulator), which outlives resets
and holds the MAC and revision words the chip spec seeded it with.
"""

from __future__ import annotations

from collections.abc import Callable

from .chips import CHIP_DETECT_MAGIC_REG, RTC_SLOW_CLK_HZ, WDT_EN, ChipSpec
from .efuse import EfuseArray

SPI_CMD_USR = 1 << 18
SPI_USR_COMMAND = 1 << 31
SPI_USR_ADDR = 1 << 30
SPI_USR_MISO = 1 << 28
SPI_USR_ADDR_LEN_SHIFT = 26

# GigaDevice GD25Q-series: what most ESP32 modules carry.
FLASH_MANUFACTURER = 0xC8
FLASH_MEMORY_TYPE = 0x40


def sfdp_table(manufacturer: int) -> bytes:
    """A minimal JESD216 SFDP area: header, basic parameter header, vendor header.

    esptool reads the "SFDP" signature at 0 to check the flash answers at all, and the
    byte at 0x10 (second parameter header's ID) to detect XMC chips that need a wake-up
    sequence; we are not XMC (0x20), so that sequence is skipped, as on a GD chip.
    """
    header = b"SFDP" + bytes([0x06, 0x01, 0x01, 0xFF])
    basic = bytes([0x00, 0x06, 0x01, 0x10, 0x30, 0x00, 0x00, 0xFF])
    vendor = bytes([manufacturer, 0x00, 0x01, 0x03, 0x70, 0x00, 0x00, 0xFF])
    return (header + basic + vendor).ljust(0x80, b"\xff")


class Registers:
    """Register file of one board. Reset re-creates it: WRITE_REGs do not survive."""

    def __init__(self, spec: ChipSpec, mac: bytes, flash_size: int,
                 baud: Callable[[], int], efuses: EfuseArray) -> None:
        self.spec = spec
        self._baud = baud
        self.efuses = efuses
        self._values: dict[int, int] = {a: v for a, v in spec.registers(mac).items()
                                        if not efuses.covers(a)}
        self._capacity_code = flash_size.bit_length() - 1  # 4 MB -> 0x16
        self._sfdp = sfdp_table(FLASH_MANUFACTURER)
        self.spi_commands: list[int] = []  # opcodes run, for tests and debugging
        # Seconds until the RTC watchdog resets the chip, once something armed it.
        self.watchdog_timeout: float | None = None

    def read(self, addr: int) -> int:
        if self.efuses.covers(addr):
            return self.efuses.read(addr)
        if addr == CHIP_DETECT_MAGIC_REG:
            return self.spec.magic
        if addr == self.spec.uart_clkdiv_reg:
            # The ROM runs the UART from the crystal (times XTAL_CLK_DIVIDER, as esptool
            # divides it back out); integer part in bits 19:0.
            clock = self.spec.xtal_hz * self.spec.xtal_divider
            return round(clock / self._baud()) & 0xFFFFF
        return self._values.get(addr, 0)

    def write(self, addr: int, value: int, mask: int = 0xFFFFFFFF) -> None:
        if self.efuses.covers(addr):
            self.efuses.write(addr, value, mask)
            return
        old = self.read(addr)
        new = (old & ~mask | value & mask) & 0xFFFFFFFF
        spi = self.spec.spi
        if addr == spi.cmd and new & SPI_CMD_USR:
            self._run_spi_command()
            new &= ~SPI_CMD_USR  # the controller clears USR when the command is done
        wdt = self.spec.watchdog
        if wdt is not None and addr == wdt.config0 and new & WDT_EN \
                and self._values.get(wdt.wprotect) == wdt.wkey:
            # Enabled while unlocked: it fires after WDTCONFIG1 slow-clock cycles.
            cycles = self._values.get(wdt.config1, 0) or 1
            self.watchdog_timeout = cycles / RTC_SLOW_CLK_HZ
        self._values[addr] = new

    def _run_spi_command(self) -> None:
        spi = self.spec.spi
        usr = self._values.get(spi.base + spi.usr, 0)
        usr1 = self._values.get(spi.base + spi.usr1, 0)
        opcode = self._values.get(spi.base + spi.usr2, 0) & 0xFF
        self.spi_commands.append(opcode)
        addr = 0
        if usr & SPI_USR_ADDR:
            addr_len = ((usr1 >> SPI_USR_ADDR_LEN_SHIFT) & 0x3F) + 1
            addr = self._values.get(spi.addr, 0)
            if spi.addr_msb:
                addr >>= 32 - addr_len
        if not usr & SPI_USR_MISO:
            return
        dlen = self._values.get(spi.base + spi.miso_dlen, 0) if spi.miso_dlen is not None else 0
        miso_bits = min((dlen & 0x3FF) + 1, 32)
        reply = self._flash_reply(opcode, addr, (miso_bits + 7) // 8)
        word = int.from_bytes(reply, "little") & ((1 << miso_bits) - 1)
        self._values[spi.base + spi.w0] = word

    def _flash_reply(self, opcode: int, addr: int, nbytes: int) -> bytes:
        """What the flash chip clocks out for a command (unknown commands: bus high)."""
        if opcode == 0x9F:  # RDID: manufacturer, memory type, capacity
            reply = bytes([FLASH_MANUFACTURER, FLASH_MEMORY_TYPE, self._capacity_code])
        elif opcode in (0x05, 0x35, 0x15):  # RDSR/RDSR2/RDSR3: idle, unprotected
            reply = b"\x00"
        elif opcode == 0x5A:  # RDSFDP
            reply = self._sfdp[addr : addr + nbytes]
        else:
            reply = b""
        return reply.ljust(nbytes, b"\xff")[:nbytes]
