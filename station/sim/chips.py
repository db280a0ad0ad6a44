"""Per-chip facts of the virtual boards, read from esptool 5.6's target classes.

esptool identifies a chip, reads its MAC, flash id and revision entirely through
register reads and one command; a virtual board only has to return the values those
code paths expect. Every address and register layout is taken from the chip's class in
``esptool.targets.CHIP_DEFS`` at import time (one home for every fact): when the pinned
esptool moves, the boards move with it. Three kinds of fact are ours, because esptool
does not hold them and a board must choose: the silicon revision and package a board
reports (``_REVISIONS``: what a line buys today), the crystal on chips whose esptool
class measures it from the UART divider (40 MHz, 48 MHz on the ESP32-C5), and the eFuse
words of the classic ESP32 (its revision is a non-linear mix of three registers).

eFuse bit positions live in esptool's method bodies, not in class constants, so the
words are found by asking those methods: :func:`_solve_field` flips one bit at a time
in the registers a method reads and keeps the bits that move its result. Every address
nobody set reads as zero, which esptool reads as "eFuse not burned".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from types import SimpleNamespace
from typing import Any

from esptool.loader import ESPLoader
from esptool.targets import CHIP_DEFS

ChipName = str
# Every ESP32-family target esptool 5.6 knows (the ESP8266 speaks another protocol).
CHIP_NAMES: tuple[str, ...] = tuple(n for n in CHIP_DEFS if n.startswith("esp32"))

CHIP_DETECT_MAGIC_REG = ESPLoader.CHIP_DETECT_MAGIC_REG_ADDR

# Chosen silicon per chip: (major, minor) revision. C2 must be >= v1.0, because
# esptool disables the stub on ECO0 (targets/esp32c2.py, _post_connect); P4 below v3.0
# gets the "esp32p4-rev1.json" stub (ESP32P4StubLoader.stub_json_name).
_REVISIONS: dict[str, tuple[int, int]] = {
    "esp32": (3, 0), "esp32s2": (1, 0), "esp32s3": (0, 2), "esp32c3": (0, 4),
    "esp32c2": (1, 0), "esp32c6": (0, 1), "esp32c5": (1, 0), "esp32c61": (1, 0),
    "esp32h2": (0, 1), "esp32p4": (1, 0),
}
# Other eFuse fields where zero makes esptool print "Unknown ...": the ESP32-H4 (a
# preview target) names its temperature grade, and only "H" (1) is known.
_FIELDS: dict[str, dict[str, int]] = {"esp32h4": {"get_temp": 1}}
# Crystal where the chip's class derives it from the UART divider (get_crystal_freq
# falls back to ESPLoader's). The C5's ROM also reports it in PCR_SYSCLK_CONF; esptool
# says 48 MHz is "the only one supported in mass production" (ESP32C5ROM.change_baud).
_UART_MEASURED_XTAL_MHZ = {"esp32c5": 48}
DEFAULT_XTAL_MHZ = 40

# esp-flasher-stub's start-up per chip (esptool 5.6 ships v1.4.1, targets/stub_flasher/2/
# README.md). Its src/main.c (v1.1.0, the newest release in our mirror) raises the clocks
# on ESP32, -S2 and -P4 and then reprograms UART0's divider for the ROM's stored rate
# (stub_lib_uart_rominit_get_baudrate(): UartDev.baud_rate, esp-stub-lib src/uart.c);
# every other chip keeps the UART as the ROM left it (transport.c attaches to it). Later
# releases extend the clock raise to -S3, -C6, -S31, -H21 and -H4 (read by an earlier
# session in the newer main.c; v1.4.1's source is not in the mirror to re-check): those
# are modelled as reprogramming too, the conservative reading. That the ROM's
# CHANGE_BAUDRATE leaves UartDev.baud_rate at 115200 is an assumption (closed ROM).
STUB_RESETS_UART = frozenset({"esp32", "esp32s2", "esp32p4", "esp32s3", "esp32c6",
                              "esp32s31", "esp32h21", "esp32h4"})

# ESP32 CHANGE_BAUDRATE correction (targets/esp32.py, get_rom_cal_crystal_freq):
#   rom_freq = cali_val * 15625 * ck8m / 40;  rate sent = baud * rom_freq // 40 MHz.
# cali_val * ck8m = 102400 makes rom_freq exactly 40 MHz, so the rate the ROM receives
# equals the rate esptool switches the host to.
_ESP32_CK8M = 200
_ESP32_CALI_VAL = 512
assert _ESP32_CALI_VAL * 15625 * _ESP32_CK8M // 40 == 40_000_000

# RTC watchdog (TRM "RTC Watchdog Timer"): WDTCONFIG0 bit 31 enables it; esptool's
# watchdog_reset writes (1 << 31) | ... after unlocking WDTWPROTECT with the WKEY, and a
# timeout in RTC slow-clock cycles to WDTCONFIG1 (~150 kHz RC oscillator).
WDT_EN = 1 << 31
EUI64_EXT = 0xFFFE
RTC_SLOW_CLK_HZ = 150_000


@dataclass(frozen=True)
class SpiRegs:
    """Addresses of the SPI0/1 "user command" registers esptool drives."""

    base: int
    usr: int
    usr1: int
    usr2: int
    mosi_dlen: int | None
    miso_dlen: int | None
    w0: int
    addr_msb: bool  # ESP32 left-aligns the address in SPI_ADDR, later chips do not

    @property
    def cmd(self) -> int:
        return self.base

    @property
    def addr(self) -> int:
        return self.base + 4


@dataclass(frozen=True)
class Watchdog:
    """The RTC watchdog registers esptool's ``watchdog_reset`` writes."""

    wprotect: int
    config0: int
    config1: int
    wkey: int


@dataclass(frozen=True)
class ChipSpec:
    """Everything chip-specific a virtual board needs."""

    name: str
    esptool_name: str  # what esptool prints ("ESP32-S3")
    rom_class: type[ESPLoader]
    magic: int  # value at CHIP_DETECT_MAGIC_REG (0 on chips esptool knows by chip id)
    chip_id: int  # IMAGE_CHIP_ID: GET_SECURITY_INFO's id, and the USB-OTG product id
    security_info_len: int  # 0: the ROM lacks the command; 12 (ESP32-S2) or 20
    spi: SpiRegs
    uart_clkdiv_reg: int
    xtal_divider: int
    xtal_hz: int
    bootloader_offset: int
    rom_flash_begin_lens: frozenset[int]  # accepted FLASH_BEGIN payload sizes (ROM)
    usb_serial_jtag: bool
    usb_otg: bool
    watchdog: Watchdog | None
    mac_ext: bool  # IEEE 802.15.4 chips: read_mac also has an EUI-64 extension word
    static_regs: dict[int, int] = field(default_factory=dict)
    revision: str | None = None  # chosen by the plug; None: _REVISIONS
    stub_resets_uart: bool = False  # the flasher stub reprograms UART0 (STUB_RESETS_UART)

    def registers(self, mac: bytes) -> dict[int, int]:
        """The board's register values at reset: eFuses (with ``mac``) and friends.

        The MAC's upper word shares its eFuse word with other fields on some chips
        (ESP32: the MAC CRC; ESP32-C2: the chip revision), so the MAC is merged in.
        """
        values = dict(self.static_regs)
        for addr, (value, mask) in self._mac_words(mac).items():
            values[addr] = values.get(addr, 0) & ~mask | value
        return values

    def _mac_words(self, mac: bytes) -> dict[int, tuple[int, int]]:
        """eFuse (value, mask) per address that make esptool's ``read_mac`` return ``mac``."""
        if self.name == "esp32":
            # read_mac: pack(">II", efuse[2], efuse[1])[2:8]; efuse[2] bits 23:16 = CRC8
            base = self.rom_class.EFUSE_RD_REG_BASE
            word2 = int.from_bytes(mac[0:2], "big") | (mac_crc8(mac) << 16)
            return {base + 4: (int.from_bytes(mac[2:6], "big"), 0xFFFFFFFF),
                    base + 8: (word2, 0xFFFFFF)}
        # every later chip: pack(">II", mac1, mac0)[2:] from MAC_EFUSE_REG and the next
        # word, "only bottom 16 bits are MAC" in the second
        # word; 802.15.4 chips keep MAC_EXT (ff:fe, as esptool's read_mac comment shows,
        # making the EUI-64) in its top half
        reg = self.rom_class.MAC_EFUSE_REG
        high = int.from_bytes(mac[0:2], "big")
        if self.mac_ext:
            return {reg: (int.from_bytes(mac[2:6], "big"), 0xFFFFFFFF),
                    reg + 4: (EUI64_EXT << 16 | high, 0xFFFFFFFF)}
        return {reg: (int.from_bytes(mac[2:6], "big"), 0xFFFFFFFF), reg + 4: (high, 0xFFFF)}

    @property
    def usb_kinds(self) -> tuple[str, ...]:
        """USB link kinds a board of this chip can have ("bridge" always)."""
        kinds = ["bridge"]
        if self.usb_serial_jtag:
            kinds.append("jtag")
        if self.usb_otg:
            kinds.append("otg")
        return tuple(kinds)


def mac_crc8(mac: bytes) -> int:
    """CRC-8 (poly 0x07 reflected = 0x8C, init 0) the ESP32 stores next to its MAC."""
    crc = 0
    for byte in mac:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


# -- asking esptool's own methods ---------------------------------------------------


def probe(cls: type[ESPLoader], regs: dict[int, int], baud: int = 115200,
          reads: list[int] | None = None) -> Any:
    """An instance of esptool's ROM class whose ``read_reg`` reads ``regs``.

    No port is opened: only the methods that compute from registers are meant to be
    called (revisions, description, MAC, crystal). Tests use it to check a board
    against the very code esptool runs.
    """
    inst: Any = object.__new__(cls)

    def read_reg(addr: int, timeout: float = 0) -> int:
        if reads is not None:
            reads.append(addr)
        return regs.get(addr, 0)

    inst.read_reg = read_reg
    inst._port = SimpleNamespace(baudrate=baud)
    inst.cache = {"security_info": None, "usb_vid": None, "usb_pid": None}
    inst.secure_download_mode = False
    inst.IS_STUB = False
    return inst


def _solve_field(cls: type[ESPLoader], method: str, value: int,
                 regs: dict[int, int]) -> None:
    """Set bits in ``regs`` so that ``cls.<method>()`` returns ``value``.

    Works for fields made of bit slices (``(word >> s) & mask``, possibly two slices
    concatenated): each bit's weight is measured by flipping it alone.
    """
    def run(r: dict[int, int], reads: list[int] | None = None) -> int:
        return int(getattr(probe(cls, r, reads=reads), method)())

    reads: list[int] = []
    base = run(regs, reads)
    weights: list[tuple[int, int, int]] = []  # (weight, addr, bit)
    for addr in dict.fromkeys(reads):
        for bit in range(32):
            trial = dict(regs)
            trial[addr] = trial.get(addr, 0) ^ (1 << bit)
            delta = run(trial) - base
            if delta > 0:
                weights.append((delta, addr, bit))
    remaining = value - base
    for weight, addr, bit in sorted(weights, reverse=True):
        if weight <= remaining:
            regs[addr] = regs.get(addr, 0) | (1 << bit)
            remaining -= weight
    got = run(regs)
    if got != value:
        raise AssertionError(f"{cls.CHIP_NAME}: cannot make {method}() return {value} "
                             f"(got {got})")


# ESP32 major revision -> (rev bit0, rev bit1, rev bit2): get_major_chip_version maps
# 0b000 -> 0, 0b001 -> 1, 0b011 -> 2, 0b111 -> 3 (bit2 lives in APB_CTL_DATE, not eFuse)
_ESP32_REV_BITS = {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1)}


def _esp32_regs(cls: type[ESPLoader], major: int = 3, minor: int = 0) -> dict[int, int]:
    """The classic ESP32: D0WD package, revision vM.m, ROM-calibrated 40 MHz crystal.

    word3 bits 11:9 = 1 (package D0WD) and bit 15 (rev bit0); word5 bit 20 (rev bit1)
    and bits 25:24 (minor); APB_CTL_DATE bit 31 (rev bit2).
    """
    if major not in _ESP32_REV_BITS or not 0 <= minor <= 3:
        raise ValueError(f"esp32 has no revision v{major}.{minor}")
    bit0, bit1, bit2 = _ESP32_REV_BITS[major]
    efuse = cls.EFUSE_RD_REG_BASE
    return {
        efuse + 0x0C: (1 << 9) | (bit0 << 15),
        efuse + 0x10: _ESP32_CK8M,  # word4 bits 7:0: CK8M frequency, read by esptool
        efuse + 0x14: (bit1 << 20) | (minor << 24),
        cls.APB_CTL_DATE_ADDR: bit2 << cls.APB_CTL_DATE_S,
        cls.RTCCALICFG1: _ESP32_CALI_VAL << cls.TIMERS_RTC_CALI_VALUE_S,
    }


def parse_revision(text: str) -> tuple[int, int]:
    """``v1.0`` / ``1.0`` -> (1, 0), with a message naming the format otherwise."""
    t = text.strip().lower().removeprefix("v")
    major, sep, minor = t.partition(".")
    if not sep or not major.isdigit() or not minor.isdigit():
        raise ValueError(f"a chip revision looks like v3.0, got {text!r}")
    return int(major), int(minor)


def _xtal_mhz(cls: type[ESPLoader], name: str) -> int:
    """The chip's crystal: esptool's fixed value where it has one, else our choice."""
    reads: list[int] = []
    clkdiv = {cls.UART_CLKDIV_REG: DEFAULT_XTAL_MHZ * 1_000_000 // 115200}
    fixed = probe(cls, clkdiv, reads=reads).get_crystal_freq()
    if reads:  # measured from the UART divider: the crystal is ours to choose
        return _UART_MEASURED_XTAL_MHZ.get(name, DEFAULT_XTAL_MHZ)
    return int(fixed)


@cache
def chip_spec(name: str, revision: str | None = None) -> ChipSpec:
    """The spec of chip ``name`` (esptool's ``--chip`` name), failing with the choices.

    ``revision`` ("v1.0") overrides the silicon revision a line buys today
    (``_REVISIONS``), e.g. an ESP32 older than v3.0, which has no secure boot v2.
    """
    if name not in CHIP_NAMES:
        raise ValueError(f"unknown chip {name!r}; choose one of {', '.join(CHIP_NAMES)}")
    cls: Any = CHIP_DEFS[name]
    xtal = _xtal_mhz(cls, name)
    chosen = parse_revision(revision) if revision else None
    if name == "esp32":
        regs = _esp32_regs(cls, *(chosen or (3, 0)))
    else:
        regs = {}
        major, minor = chosen or _REVISIONS.get(name, (0, 0))
        _solve_field(cls, "get_major_chip_version", major, regs)
        _solve_field(cls, "get_minor_chip_version", minor, regs)
        for method, value in _FIELDS.get(name, {}).items():
            _solve_field(cls, method, value, regs)
    if hasattr(cls, "PCR_SYSCLK_CONF_REG"):  # the crystal the ROM believes it has
        regs[cls.PCR_SYSCLK_CONF_REG] = xtal << cls.PCR_SYSCLK_XTAL_FREQ_S
    watchdog = None
    if getattr(cls, "RTC_CNTL_WDTCONFIG0_REG", None) is not None:
        watchdog = Watchdog(cls.RTC_CNTL_WDTWPROTECT_REG, cls.RTC_CNTL_WDTCONFIG0_REG,
                            cls.RTC_CNTL_WDTCONFIG1_REG,
                            getattr(cls, "RTC_CNTL_WDT_WKEY", 0x50D83AA1))
    return ChipSpec(
        name=name,
        esptool_name=cls.CHIP_NAME,
        rom_class=cls,
        magic=cls.MAGIC_VALUE if cls.USES_MAGIC_VALUE else 0,
        chip_id=cls.IMAGE_CHIP_ID,
        # The ESP32 ROM lacks GET_SECURITY_INFO; the S2's answers without a chip id
        # (loader.get_security_info's 12-byte fallback, cmds.detect_chip).
        security_info_len=0 if name == "esp32" else 12 if cls.USES_MAGIC_VALUE else 20,
        spi=SpiRegs(cls.SPI_REG_BASE, cls.SPI_USR_OFFS, cls.SPI_USR1_OFFS,
                    cls.SPI_USR2_OFFS, cls.SPI_MOSI_DLEN_OFFS, cls.SPI_MISO_DLEN_OFFS,
                    cls.SPI_W0_OFFS, addr_msb=cls.SPI_ADDR_REG_MSB),
        uart_clkdiv_reg=cls.UART_CLKDIV_REG,
        xtal_divider=cls.XTAL_CLK_DIVIDER,
        xtal_hz=xtal * 1_000_000,
        bootloader_offset=cls.BOOTLOADER_FLASH_OFFSET,
        # loader.flash_begin: "ESP32 and ESP8266 ROMs do not support extended parameter
        # format"; every other ROM takes the 5th (encrypted) word.
        rom_flash_begin_lens=frozenset({16}) if name == "esp32" else frozenset({16, 20}),
        usb_serial_jtag=bool(cls.USB_SERIAL_JTAG_SUPPORTED),
        usb_otg=bool(cls.USB_OTG_SUPPORTED),
        watchdog=watchdog,
        mac_ext=probe(cls, {}).read_mac("MAC_EXT") is not None,
        static_regs=regs,
        revision=revision,
        stub_resets_uart=name in STUB_RESETS_UART,
    )


def parse_chip_list(text: str) -> list[str]:
    """``esp32,esp32c3`` -> ["esp32", "esp32c3"], each checked against CHIP_NAMES."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("--chip needs at least one chip name")
    for name in names:
        chip_spec(name)
    return names
