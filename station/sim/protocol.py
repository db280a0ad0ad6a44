"""The ESP serial bootloader protocol's numbers: opcodes, error codes, checksum.

From esptool 5.6 ``loader.py`` (``ESP_CMDS``), Espressif's serial-protocol docs (ROM
error codes) and the stubs' headers (``stub_flasher.h``; esp-flasher-stub
``commands.h`` sends the same codes shifted into a 16-bit big-endian word).
"""

from __future__ import annotations

# Opcodes (esptool loader.py ESP_CMDS)
FLASH_BEGIN, FLASH_DATA, FLASH_END = 0x02, 0x03, 0x04
MEM_BEGIN, MEM_END, MEM_DATA = 0x05, 0x06, 0x07
SYNC, WRITE_REG, READ_REG = 0x08, 0x09, 0x0A
SPI_SET_PARAMS, SPI_ATTACH, READ_FLASH_SLOW, CHANGE_BAUDRATE = 0x0B, 0x0D, 0x0E, 0x0F
FLASH_DEFL_BEGIN, FLASH_DEFL_DATA, FLASH_DEFL_END = 0x10, 0x11, 0x12
SPI_FLASH_MD5, GET_SECURITY_INFO = 0x13, 0x14
ERASE_FLASH, ERASE_REGION, READ_FLASH, RUN_USER_CODE = 0xD0, 0xD1, 0xD2, 0xD3

SYNC_PAYLOAD = b"\x07\x07\x12\x20" + 32 * b"\x55"
ROM_SYNC_VALUE = 0x20120707  # any non-zero value: esptool reads 0 as "stub running"

# Error codes: ROM (serial protocol docs) and stub (stub_flasher.h)
ROM_INVALID_MESSAGE, ROM_FAILED, ROM_BAD_CRC, ROM_DEFLATE_ERROR = 0x05, 0x06, 0x07, 0x0B
STUB_BAD_DATA_LEN, STUB_BAD_CHECKSUM, STUB_INVALID_COMMAND = 0xC0, 0xC1, 0xC3
STUB_NOT_IN_FLASH_MODE, STUB_INFLATE_ERROR = 0xC6, 0xC7


# Secure Download Mode: "It only allows a limited set of commands" (esptool docs,
# serial-protocol.rst "Supported in Secure Download Mode"): SYNC, SPI_ATTACH,
# SPI_SET_PARAMS, CHANGE_BAUDRATE, FLASH_BEGIN/DATA/END, GET_SECURITY_INFO.
SDM_ALLOWED = frozenset({SYNC, SPI_ATTACH, SPI_SET_PARAMS, CHANGE_BAUDRATE, FLASH_BEGIN,
                         FLASH_DATA, FLASH_END, GET_SECURITY_INFO})
# How the ROM refuses the others: esptool raises UnsupportedCommandError ("This command
# (0xa) is not supported in Secure Download Mode", seen on an ESP32-C2, esptool#895) only
# for a reply whose opcode differs from the request's, status non-zero and reason 0x05,
# and drains it: "Unsupported command response is sent 8 times and has 14 bytes length"
# (loader.command). Which opcode the ROM puts there is not published; 0 is ours.
SDM_REFUSAL_OPCODE = 0x00
SDM_REFUSAL_REPEATS = 8
# The classic ESP32's ROM answers a command it does not implement (GET_SECURITY_INFO,
# cmds.detect_chip: "cmd not supported on ESP8266 and ESP32") the same repeated way:
# esptool-js#263/#264 ("fix devkitc security info": "the ROM repeats unsupported command
# responses multiple times and flushing alone is insufficient", on an ESP32 DevKitC).
# esptool 5.6 then drains 0.2 s per refusal, twice in get_security_info (20-, then
# 12-byte attempt). Later ROMs implement GET_SECURITY_INFO; their refusals of unknown
# commands are not modelled this way (no source).
REPEATS_UNSUPPORTED = frozenset({"esp32"})


class Unsupported(Exception):  # noqa: N818 (a refusal, not an error of ours)
    """A command the ROM does not implement, refused as SDM refuses (repeated)."""


class CommandError(Exception):
    """A command failed; the board answers with status 1 and this reason code."""

    def __init__(self, rom_code: int, stub_code: int) -> None:
        super().__init__(f"rom={rom_code:#x} stub={stub_code:#x}")
        self.rom_code = rom_code
        self.stub_code = stub_code


def checksum(data: bytes, seed: int = 0xEF) -> int:
    """The ROM's XOR checksum, folded with big-int XORs instead of a per-byte loop."""
    if not data:
        return seed
    x = int.from_bytes(data, "little")
    width = 1 << (len(data) - 1).bit_length()
    while width > 1:
        width //= 2
        x = (x >> (8 * width)) ^ (x & ((1 << (8 * width)) - 1))
    return (x ^ seed) & 0xFF
