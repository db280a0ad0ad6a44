"""NVS encryption for the credentials on an encrypted line: the board's `nvs_keys` partition.

Flash encryption does not cover NVS: nvs_flash writes its pages in place, entry by
entry, which the flash-encryption blocks cannot follow, so ESP-IDF forbids flagging an
NVS partition `encrypted` and gives NVS its own XTS-AES encryption instead (ESP-IDF
`docs/en/api-reference/storage/nvs_encryption.rst`, "NVS Encryption: Flash
Encryption-Based Scheme"). There the XTS key pair lives in a partition of subtype
`nvs_keys` (`nvs_key, data, nvs_keys, , 0x1000, encrypted`), which flash encryption
protects like the app: ESP-IDF treats it as encrypted whatever its flag says
(`esp_partition/partition.c`; the bootloader's `encrypt_partition` encrypts it
unconditionally). nvs_flash reads it at `nvs_flash_init` (`nvs_flash_read_security_cfg`:
the data key, the tweak key, 32 bytes each, then a CRC32 of the 64 bytes; all 0xFF means
"not initialised" and the app would make fresh keys, with which the station's
credentials could never be read).

So a board's credentials go as: fresh NVS keys per board (os.urandom; esp-idf-nvs-
partition-gen's own `generate_key` draws them from `random`, not a CSPRNG), its
nvs_keys partition (that layout, `generate_key`'s) written flash-encrypted with the
board's flash key like the other encrypted partitions, and its NVS credentials made
by esp-idf-nvs-partition-gen with the encryption on (identity's `nvs_region`).

The keys are held per MAC while this station runs, so a retry rewrites the credentials
with the keys already on the board; a station stopped after the images were verified
has lost them: the chip then encrypts a fresh keys partition while it still allows
manual encryption (until the lock-down; esptool checks DIS_DOWNLOAD_MANUAL_ENCRYPT, not
the counter), else the board needs rework.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence

from station.parts import Region
from station.security.images import PartitionRow

NVS_KEYS_SUBTYPE = 0x04  # data partition subtype nvs_keys (esp_partition.h)
NVS_KEYS_LEN = 64  # XTS data key + tweak key (nvs_sec_cfg_t)
NVS_KEYS_PAGE = 0x1000  # the partition's size in ESP-IDF's docs: the minimum, 4 KB
NVS_KEYS_ROW = "nvs_key, data, nvs_keys, , 0x1000, encrypted"
"""The row of ESP-IDF's NVS-encryption partition tables (partitions_*_encr_nvs.csv)."""


def nvs_keys_partition(parts: Sequence[PartitionRow]) -> PartitionRow | None:
    """The firmware table's first nvs_keys partition (nvs_flash uses the first it finds)."""
    return next((p for p in parts if p.type == 1 and p.subtype == NVS_KEYS_SUBTYPE), None)


def fresh_keys() -> bytes:
    return os.urandom(NVS_KEYS_LEN)


def keys_image(keys: bytes, size: int) -> bytes:
    """The nvs_keys partition's plaintext: keys, CRC32 (ESP-IDF's crc32_le from
    0xffffffff, zlib's with that seed), erased flash to the partition's end."""
    if len(keys) != NVS_KEYS_LEN:
        raise ValueError(f"NVS keys are {NVS_KEYS_LEN} bytes, not {len(keys)}")
    crc = zlib.crc32(keys, 0xFFFFFFFF) & 0xFFFFFFFF
    body = keys + struct.pack("<I", crc)
    return body + b"\xff" * (size - len(body))


def keys_region(keys: bytes, offset: int, size: int) -> Region:
    return Region.build("nvs_keys", offset, keys_image(keys, size))
