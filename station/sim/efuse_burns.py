"""A chip burning its own eFuses: ESP-IDF's eFuse API as the bootloader uses it, and the
fault of a board another line has already burned. Mixed into :class:`.efuse.EfuseArray`.

These burns go straight into the read registers of espefuse's emulator (its
``update_reg``), the way a finished ``esp_efuse_write_field_*`` / ``esp_efuse_write_key``
leaves them: the bits ORed in, ``WR_DIS`` masking what it protects, then read protection
taking effect at :meth:`ChipBurns.commit`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from station.security.efuse_defs import espefuse_module


@cache
def key_purposes(chip: str) -> dict[str, int]:
    """Key purpose name -> number, from espefuse's table for the chip (empty: ESP32)."""
    module = espefuse_module(f"efuse.{chip}.fields")
    field = getattr(module, "EfuseKeyPurposeField", None)
    table = getattr(field, "KEY_PURPOSES", None) or []
    return {row[0]: row[1] for row in table if row[1] >= 0}


class ChipBurns:
    """The chip's own burns over an eFuse array (see :class:`.efuse.EfuseArray`)."""

    chip: str
    ctrl: Any
    _fields: dict[str, Any]

    # provided by the array
    def field(self, name: str) -> int:
        raise NotImplementedError

    def write_protected(self, name: str) -> bool:
        raise NotImplementedError

    def block_bytes(self, block_id: int) -> bytes:
        raise NotImplementedError

    def save(self) -> None:
        raise NotImplementedError

    def latch_rom(self) -> None:
        raise NotImplementedError

    @property
    def crypt_cnt_name(self) -> str:
        raise NotImplementedError

    def burn(self, name: str, value: int = 1) -> None:
        """OR ``value`` into an eFuse, as ``esp_efuse_write_field_*`` leaves it; a field
        whose WR_DIS bit is burned does not change (the controller masks it)."""
        efuse = self._fields[name]
        if self.write_protected(name) or not value:
            return
        blk = self.ctrl.Blocks.get(self.ctrl.Blocks.BLOCKS[efuse.block])
        for i in range(int(efuse.bit_len)):
            if value >> i & 1:
                bit = int(efuse.word) * 32 + int(efuse.pos) + i
                mask = 1 << bit % 32
                self.ctrl.update_reg(blk.rd_addr + 4 * (bit // 32), mask, mask)

    def burn_key(self, block_id: int, key: bytes, purpose: str | None,
                 read_protect: bool) -> None:
        """``esp_efuse_write_key``: the key as given, its purpose, and write protection of
        both (read protection for keys that need it)."""
        blk = self.ctrl.Blocks.get(self.ctrl.Blocks.BLOCKS[block_id])
        for i in range(0, len(key), 4):
            word = int.from_bytes(key[i:i + 4], "little")
            self.ctrl.update_reg(blk.rd_addr + i, 0xFFFFFFFF, word)
        if purpose is not None and blk.key_purpose:
            self.burn(blk.key_purpose, key_purposes(self.chip)[purpose])
            self.burn_write_protection(blk.key_purpose)
        if read_protect and blk.read_disable_bit is not None:
            self.burn("RD_DIS", self.ctrl.get_read_disable_mask(blk))
        if blk.write_disable_bit is not None:
            self.burn("WR_DIS", 1 << blk.write_disable_bit)

    def burn_write_protection(self, name: str) -> None:
        bit = self._fields[name].write_disable_bit
        if bit is not None:
            self.burn("WR_DIS", 1 << int(bit))

    def purpose_number(self, purpose: str) -> int:
        return key_purposes(self.chip)[purpose]

    def free_key_block(self) -> int | None:
        """The first key block with no purpose and no bits (``esp_efuse_find_unused_key_block``)."""
        for entry in self.ctrl.Blocks.BLOCKS:
            blk = self.ctrl.Blocks.get(entry)
            if blk.key_purpose and not self.field(blk.key_purpose) \
                    and not any(self.block_bytes(blk.id)):
                return int(blk.id)
        return None

    def commit(self) -> None:
        """After the chip's own burns: read protection takes effect, the file is saved."""
        self.ctrl.check_rd_protection_area()
        self.save()

    def lock(self, kind: str, secret: bytes) -> None:
        """A board another line has already burned (fault ``locked=KIND``); ``secret``
        seeds the foreign key or digest (nobody here knows it)."""
        esp32 = self.chip == "esp32"
        if kind == "sdm":
            if esp32:
                raise ValueError("the ESP32 has no secure download mode (locked=sdm)")
            self.burn("ENABLE_SECURITY_DOWNLOAD")
        elif kind in ("key", "encrypted"):
            block = 1 if esp32 else self.free_key_block()
            if block is not None:
                self.burn_key(block, secret, None if esp32 else "XTS_AES_128_KEY", True)
            if kind == "encrypted":
                self.burn(self.crypt_cnt_name, 1)
                if esp32:
                    self.burn("FLASH_CRYPT_CONFIG", 0xF)
        elif kind == "secure_boot":
            if esp32:
                self.burn_key(2, secret, None, read_protect=False)
                self.burn("ABS_DONE_1")
            else:
                block = self.free_key_block()
                if block is not None:
                    self.burn_key(block, secret, "SECURE_BOOT_DIGEST0", read_protect=False)
                self.burn("SECURE_BOOT_EN")
        else:
            raise ValueError(f"unknown lock {kind!r}")
        self.commit()
        self.latch_rom()
