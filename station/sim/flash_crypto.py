"""The chip's flash encryption: what the hardware does with the key in eFuse.

Two schemes, both exactly as espsecure computes them (``espsecure/__init__.py``), so
``espsecure encrypt-flash-data`` / ``decrypt-flash-data`` with the burned key file
agree with the virtual chip (the tests check both directions):

* **AES-XTS** (every chip but the classic ESP32; ``_flash_encryption_operation_aes_xts``):
  1024-bit (0x80-byte) data units, tweak = the unit's flash address (little-endian,
  12 zero bytes), each unit byte-reversed before and after the cipher. A 256-bit key
  (XTS_AES_128_KEY) is AES-128-XTS, a 512-bit one (XTS_AES_256_KEY_1 + _2) AES-256-XTS.
* **ESP32** (``_flash_encryption_operation_esp32``): AES-256 with the key "tweaked" per
  32-byte block from its flash offset under FLASH_CRYPT_CONFIG, used inverted (flash
  encryption runs the AES *decrypt* primitive), each 16-byte block byte-reversed.

espsecure's entry points read a key file and print ("Using 256-bit key.") to stdout,
which is the simulator's event stream, so the loops are restated here over
espsecure's own tweak helpers and ``cryptography``.

The key file relation: espefuse reverses the bytes of an XTS key (``need_reverse``,
purpose rows marked "Reverse") and of the ESP32 ``flash_encryption`` key before
burning, so the key file is the eFuse block read in register order, reversed.
"""

from __future__ import annotations

import struct
from typing import Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from espsecure import (  # type: ignore[import-untyped]
    _flash_encryption_tweak_key,
    _flash_encryption_tweak_range_bits,
)

from .efuse import EfuseArray

Scheme = Literal["xts", "esp32"]
UNIT = 0x80  # XTS data unit
ALIGN = 16  # encrypted writes and reads are in 16-byte blocks
_GF128 = 0x87


def _reverse_units(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size][::-1] for i in range(0, len(data), size)]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(16, "little")


def _xts_unit(key: bytes, tweak: bytes, unit: bytes, decrypt: bool) -> bytes:
    """IEEE 1619 XTS of one data unit (``cryptography``, as espsecure uses it)."""
    half = len(key) // 2
    if key[:half] != key[half:]:
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        actor = cipher.decryptor() if decrypt else cipher.encryptor()
        return actor.update(unit)
    # ``cryptography`` refuses equal key halves (an all-zero key: nothing burned yet);
    # the hardware does not, so the same standard is computed block by block.
    k1 = Cipher(algorithms.AES(key[:half]), modes.ECB())
    t = int.from_bytes(Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor()
                       .update(tweak), "little")
    out = bytearray()
    for i in range(0, len(unit), 16):
        mask = t.to_bytes(16, "little")
        block = _xor(unit[i:i + 16], mask)
        actor = k1.decryptor() if decrypt else k1.encryptor()
        out += _xor(actor.update(block), mask)
        t = (t << 1) ^ _GF128 if t >> 127 else t << 1
        t &= (1 << 128) - 1
    return bytes(out)


class FlashCipher:
    """The flash encryption block of one chip, keyed from its eFuses."""

    def __init__(self, scheme: Scheme, key_file: bytes, crypt_config: int = 0xF) -> None:
        self.scheme = scheme
        self.key_file = key_file  # as ``espsecure --keyfile`` would read it
        self.crypt_config = crypt_config

    def encrypt(self, addr: int, data: bytes) -> bytes:
        return self._run(addr, data, decrypt=False)

    def decrypt(self, addr: int, data: bytes) -> bytes:
        return self._run(addr, data, decrypt=True)

    def _run(self, addr: int, data: bytes, decrypt: bool) -> bytes:
        if addr % ALIGN or len(data) % ALIGN:
            raise ValueError(f"flash encryption works on 16-byte blocks: {addr:#x}+{len(data)}")
        if not data:
            return b""
        if self.scheme == "esp32":
            return self._esp32(addr, data, decrypt)
        return self._xts(addr, data, decrypt)

    def _xts(self, addr: int, data: bytes, decrypt: bool) -> bytes:
        key = self.key_file
        pad_left = addr % UNIT
        padded = b"\x00" * pad_left + data
        padded += b"\x00" * (-len(padded) % UNIT)
        out = bytearray()
        unit_addr = addr - pad_left
        for unit in _reverse_units(padded, UNIT):
            tweak = struct.pack("<I", unit_addr & ~0x7F) + b"\x00" * 12
            out += _xts_unit(key, tweak, unit, decrypt)[::-1]
            unit_addr += UNIT
        return bytes(out[pad_left:pad_left + len(data)])

    def _esp32(self, addr: int, data: bytes, decrypt: bool) -> bytes:
        key = self.key_file
        if len(key) == 24:  # 3/4 coding: the hardware extends a 192-bit key
            key = key + key[8:16]
        key_int = int.from_bytes(key, "big")
        tweak_range = _flash_encryption_tweak_range_bits(self.crypt_config)
        out = bytearray()
        for i, block in enumerate(_reverse_units(data, ALIGN)):
            block_key = _flash_encryption_tweak_key(key_int, addr + i * ALIGN, tweak_range)
            cipher = Cipher(algorithms.AES(block_key), modes.ECB())
            # "AES is used inverted for flash encryption" (espsecure)
            actor = cipher.encryptor() if decrypt else cipher.decryptor()
            out += actor.update(block)[::-1]
        return bytes(out)


def key_blocks(efuses: EfuseArray) -> list[int]:
    """The eFuse blocks holding the flash-encryption key, in key-file order."""
    if efuses.chip == "esp32":
        return [1]  # BLOCK1, alias flash_encryption
    blocks = efuses.blocks_with_purpose("XTS_AES_128_KEY")
    if blocks:
        return blocks[:1]
    first = efuses.blocks_with_purpose("XTS_AES_256_KEY_1")
    second = efuses.blocks_with_purpose("XTS_AES_256_KEY_2")
    if first and second:
        return [first[0], second[0]]
    return []


def chip_cipher(efuses: EfuseArray) -> FlashCipher:
    """The cipher the chip's hardware uses now (a zero key where none is burned)."""
    if efuses.chip == "esp32":
        block = efuses.block_bytes(1)  # 24 bytes under the 3/4 coding scheme
        return FlashCipher("esp32", block[::-1], efuses.field("FLASH_CRYPT_CONFIG"))
    blocks = key_blocks(efuses)
    key = b"".join(efuses.block_bytes(b)[::-1] for b in blocks) if blocks else bytes(32)
    return FlashCipher("xts", key)


def has_key(efuses: EfuseArray) -> bool:
    """A key the bootloader would use: ESP32 BLOCK1 burned, or an XTS key purpose set."""
    if efuses.chip == "esp32":
        return any(efuses.block_bytes(1))
    return bool(key_blocks(efuses))
