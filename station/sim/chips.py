"""Per-chip constants of the virtual boards, taken from esptool 5.6's ``targets/``.

Only what esptool actually reads is modelled: the chip-detect magic register, the
GET_SECURITY_INFO reply, the eFuse words behind ``read_mac``/chip description, the SPI
peripheral's register block (for ``run_spiflash_command``), the UART clock divider and,
on the ESP32, the two values esptool uses to correct CHANGE_BAUDRATE for CK8M drift.
Every other address reads as zero, which esptool interprets as "feature not burned".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Literal

ChipName = Literal["esp32", "esp32s3", "esp32c3"]
CHIP_NAMES: tuple[ChipName, ...] = ("esp32", "esp32s3", "esp32c3")

CHIP_DETECT_MAGIC_REG = 0x40001000
XTAL_HZ = 40_000_000

# ESP32 CHANGE_BAUDRATE correction (targets/esp32.py, get_rom_cal_crystal_freq):
#   rom_freq = cali_val * 15625 * ck8m / 40;  rate sent = baud * rom_freq // 40 MHz.
# cali_val * ck8m = 102400 makes rom_freq exactly 40 MHz, so the rate the ROM receives
# equals the rate esptool switches the host to.
_ESP32_CK8M = 200
_ESP32_CALI_VAL = 512
assert _ESP32_CALI_VAL * 15625 * _ESP32_CK8M // 40 == XTAL_HZ


@dataclass(frozen=True)
class SpiRegs:
    """Addresses of the SPI0/1 "user command" registers esptool drives."""

    base: int
    usr: int
    usr1: int
    usr2: int
    mosi_dlen: int
    miso_dlen: int
    w0: int
    addr_msb: bool  # ESP32 left-aligns the address in SPI_ADDR, S3/C3 do not

    @property
    def cmd(self) -> int:
        return self.base

    @property
    def addr(self) -> int:
        return self.base + 4


@dataclass(frozen=True)
class ChipSpec:
    """Everything chip-specific a virtual board needs."""

    name: ChipName
    esptool_name: str  # what esptool prints ("ESP32-S3")
    magic: int  # value at CHIP_DETECT_MAGIC_REG
    chip_id: int | None  # GET_SECURITY_INFO chip id; None: the ROM lacks the command
    api_version: int
    spi: SpiRegs
    uart_clkdiv_reg: int
    bootloader_offset: int
    rom_flash_begin_lens: frozenset[int]  # accepted FLASH_BEGIN payload sizes (ROM)
    efuse_base: int
    static_regs: dict[int, int] = field(default_factory=dict)

    def mac_regs(self, mac: bytes) -> dict[int, int]:
        """eFuse words that make esptool's ``read_mac`` return ``mac``."""
        if self.name == "esp32":
            # read_mac: pack(">II", efuse[2], efuse[1])[2:8]; efuse[2] bits 23:16 = CRC8
            word1 = int.from_bytes(mac[2:6], "big")
            word2 = int.from_bytes(mac[0:2], "big") | (mac_crc8(mac) << 16)
            return {self.efuse_base + 4: word1, self.efuse_base + 8: word2}
        # S3/C3: pack(">II", mac1, mac0)[2:] with mac0 at MAC_EFUSE_REG = base + 0x44
        mac0 = int.from_bytes(mac[2:6], "big")
        mac1 = int.from_bytes(mac[0:2], "big")
        reg = self.efuse_base + 0x44
        return {reg: mac0, reg + 4: mac1}

    def security_info(self) -> bytes:
        """The 20-byte GET_SECURITY_INFO payload: flags, crypt count, purposes, id, api."""
        assert self.chip_id is not None
        return struct.pack("<IBBBBBBBBII", 0, 0, 0, 0, 0, 0, 0, 0, 0, self.chip_id,
                           self.api_version)


def mac_crc8(mac: bytes) -> int:
    """CRC-8 (poly 0x07 reflected = 0x8C, init 0) the ESP32 stores next to its MAC."""
    crc = 0
    for byte in mac:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


_ESP32_EFUSE = 0x3FF5A000
_S3_EFUSE = 0x60007000
_C3_EFUSE = 0x60008800

CHIPS: dict[ChipName, ChipSpec] = {
    "esp32": ChipSpec(
        name="esp32",
        esptool_name="ESP32",
        magic=0x00F01D83,
        chip_id=None,
        api_version=0,
        spi=SpiRegs(0x3FF42000, 0x1C, 0x20, 0x24, 0x28, 0x2C, 0x80, addr_msb=True),
        uart_clkdiv_reg=0x3FF40014,
        bootloader_offset=0x1000,
        rom_flash_begin_lens=frozenset({16}),
        efuse_base=_ESP32_EFUSE,
        static_regs={
            # word3: package 1 (D0WD), rev bit0; word5: rev bit1 -> with APB_CTL_DATE
            # bit 31 this is an ESP32-D0WD-V3 revision v3.0, as sold today.
            _ESP32_EFUSE + 0x0C: (1 << 9) | (1 << 15),
            _ESP32_EFUSE + 0x10: _ESP32_CK8M,
            _ESP32_EFUSE + 0x14: 1 << 20,
            0x3FF6607C: 1 << 31,  # APB_CTL_DATE
            0x3FF5F06C: _ESP32_CALI_VAL << 7,  # RTCCALICFG1
        },
    ),
    "esp32s3": ChipSpec(
        name="esp32s3",
        esptool_name="ESP32-S3",
        magic=0x00000009,
        chip_id=9,
        api_version=0,
        spi=SpiRegs(0x60002000, 0x18, 0x1C, 0x20, 0x24, 0x28, 0x58, addr_msb=False),
        uart_clkdiv_reg=0x60000014,
        bootloader_offset=0x0,
        rom_flash_begin_lens=frozenset({16, 20}),
        efuse_base=_S3_EFUSE,
        static_regs={
            # BLOCK1 word3 (+0x50): minor rev 2, blk version minor 1; word5: major 0
            # BLOCK2 word4 (+0x6C): blk version major 1 -> "revision v0.2"
            _S3_EFUSE + 0x50: (2 << 18) | (1 << 24),
            _S3_EFUSE + 0x6C: 1,
        },
    ),
    "esp32c3": ChipSpec(
        name="esp32c3",
        esptool_name="ESP32-C3",
        magic=0x1B31506F,
        chip_id=5,
        api_version=0,
        spi=SpiRegs(0x60002000, 0x18, 0x1C, 0x20, 0x24, 0x28, 0x58, addr_msb=False),
        uart_clkdiv_reg=0x60000014,
        bootloader_offset=0x0,
        rom_flash_begin_lens=frozenset({16, 20}),
        efuse_base=_C3_EFUSE,
        static_regs={
            _C3_EFUSE + 0x50: 4 << 18,  # BLOCK1 word3: minor rev 4 -> "revision v0.4"
        },
    ),
}


def chip_spec(name: str) -> ChipSpec:
    """Look a chip up by its esptool ``--chip`` name, failing with the valid choices."""
    for chip in CHIP_NAMES:
        if chip == name:
            return CHIPS[chip]
    raise ValueError(f"unknown chip {name!r}; choose one of {', '.join(CHIP_NAMES)}")
