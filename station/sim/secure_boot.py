"""Secure boot v2 as the ROM and the ESP-IDF bootloader check it: signature sector,
signature blocks, public-key digests in eFuse.

The format is espsecure's (``sign_data --version 2``, ``validate_signature_block``,
``verify_signature_v2``, ``_digest_sbv2_public_key``): an image padded to a 4 KB
boundary, then a 4 KB signature sector of up to three 1216-byte blocks (magic 0xE7,
version 2 RSA-PSS / 3 ECDSA, the SHA-256 of everything before the sector, the public
key, the signature, a CRC32 over the first 1196 bytes). A block counts when its CRC and
image digest are right, the SHA-256 of its public key equals a digest burned in eFuse
(SECURE_BOOT_DIGEST0..2 purposes, not revoked; ESP32: BLOCK2), and the signature
verifies. The bootloader hashes the image up to the 4 KB boundary ("End of the image
needs to be padded all the way to a 4KB boundary", ``esp_image_format.c``).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from .efuse import EfuseArray

SECTOR = 0x1000
SIG_BLOCK_SIZE = 1216
SIG_MAGIC = 0xE7
VERSION_RSA, VERSION_ECDSA = 0x02, 0x03
SCHEME_NAMES = {VERSION_RSA: "RSA", VERSION_ECDSA: "ECDSA"}  # esp_secure_boot.h
_RSA_KEY = slice(36, 36 + 776)  # n (384, LE), e (4), rinv (384), m' (4)
_CURVES = {1: (ec.SECP192R1(), 24), 2: (ec.SECP256R1(), 32)}  # curve id, coordinate bytes


@dataclass(frozen=True)
class BlockCheck:
    """One signature block as the verifier sees it."""

    index: int
    valid: bool  # magic, known version and CRC
    version: int
    digest_ok: bool  # its image digest is the image's
    trusted: bool  # its key's digest is in eFuse
    signature_ok: bool


def image_length(image: Any) -> int:
    """Bytes an esptool image occupies: header, segments, checksum padding, SHA-256."""
    if image.append_digest and image.data_length is not None:
        return int(image.data_length) + 32
    length = 24 + sum(8 + len(seg.data) for seg in image.segments)
    return (length + 16) & ~15  # the checksum byte ends a 16-byte-aligned image


def signature_sector_at(start: int, length: int) -> int:
    """Where an image's signature sector starts: its end rounded up to 4 KB."""
    return -(-(start + length) // SECTOR) * SECTOR


def trusted_digests(efuses: EfuseArray) -> list[bytes | None]:
    """The three digest slots the ROM trusts (None: empty or revoked)."""
    if efuses.chip == "esp32":  # one slot: BLOCK2 (burn-key secure_boot_v2)
        digest = efuses.block_bytes(2)[:32]
        return [digest if any(digest) else None]
    slots: list[bytes | None] = []
    for i in range(3):
        blocks = efuses.blocks_with_purpose(f"SECURE_BOOT_DIGEST{i}")
        revoked = efuses.field(f"SECURE_BOOT_KEY_REVOKE{i}")
        slots.append(efuses.block_bytes(blocks[0])[:32] if blocks and not revoked else None)
    return slots


def secure_boot_enabled(efuses: EfuseArray) -> bool:
    """SECURE_BOOT_EN (ESP32 V3: ABS_DONE_1), as ``esp_secure_boot_enabled()`` reads it."""
    return bool(efuses.first("SECURE_BOOT_EN", "ABS_DONE_1"))


def _key_digest(block: bytes, version: int) -> bytes:
    if version == VERSION_RSA:
        return hashlib.sha256(block[_RSA_KEY]).digest()
    return hashlib.sha256(block[36:36 + 65]).digest()  # "<B64s": curve id, point


def _signature_ok(block: bytes, version: int, digest: bytes) -> bool:
    try:
        if version == VERSION_RSA:
            n_le, e, _rinv, _m, sig = struct.unpack_from("<384sI384sI384s", block, 36)
            key = rsa.RSAPublicNumbers(e, int.from_bytes(n_le, "little")).public_key()
            key.verify(sig[::-1], digest,
                       padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                       utils.Prehashed(hashes.SHA256()))
            return True
        # "<BBBx32sB64s64s": curve id, point (x, y little-endian), r and s alike
        curve, width = _CURVES[block[36]]
        point, rs = block[37:101], block[101:165]
        x = int.from_bytes(point[:width], "little")
        y = int.from_bytes(point[width:2 * width], "little")
        public = ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        signature = utils.encode_dss_signature(int.from_bytes(rs[:width], "little"),
                                               int.from_bytes(rs[width:2 * width], "little"))
        public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return True
    except (InvalidSignature, KeyError, ValueError):
        return False


def check_blocks(flash: bytes, start: int, length: int,
                 trusted: list[bytes | None]) -> list[BlockCheck]:
    """Every signature block of the image at ``start`` (``length`` bytes)."""
    sector = signature_sector_at(start, length)
    digest = hashlib.sha256(flash[start:sector]).digest()
    checks = []
    for i in range(3):
        block = flash[sector + i * SIG_BLOCK_SIZE:sector + (i + 1) * SIG_BLOCK_SIZE]
        if len(block) < SIG_BLOCK_SIZE:
            break
        magic, version = block[0], block[1]
        crc = struct.unpack_from("<I", block, 1196)[0]
        valid = (magic == SIG_MAGIC and version in SCHEME_NAMES
                 and crc == zlib.crc32(block[:1196]) & 0xFFFFFFFF)
        digest_ok = valid and block[4:36] == digest
        trusted_ok = valid and _key_digest(block, version) in [d for d in trusted if d]
        checks.append(BlockCheck(i, valid, version, digest_ok, trusted_ok,
                                 digest_ok and trusted_ok and _signature_ok(block, version,
                                                                            digest)))
    return checks


def verified(checks: list[BlockCheck]) -> bool:
    return any(c.signature_ok for c in checks)


def first_magic(flash: bytes, start: int, length: int) -> int:
    return flash[signature_sector_at(start, length)]


def scheme_of(checks: list[BlockCheck]) -> int | None:
    """The scheme an image was signed with (its first valid block's), if any."""
    return next((c.version for c in checks if c.valid), None)
