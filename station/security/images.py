"""The firmware as a locked board gets it: signed once at start, encrypted per board.

At start (`secure_firmware`): the images are checked for what a locked board needs
before a single eFuse is burned, because a board locked with the wrong images is a
brick: a bootloader and an app built for the features (ESP-IDF compiles its log format
strings into the images at the default log level, so a bootloader built with
CONFIG_SECURE_FLASH_ENC_ENABLED contains `flash encryption is enabled (%d plaintext
flashes left)`, `flash_encrypt.c`; one built with CONFIG_SECURE_BOOT_V2_ENABLED
contains `secure boot v2 is already enabled, continuing..`, `secure_boot_v2/
secure_boot.c`; an app built for flash encryption `Flash encryption mode is
DEVELOPMENT (not secure)`), the bootloader and apps signed with the configured key
(espsecure `sign_data --version 2`; signatures are randomised, so the signed images are
kept in the state folder and reused on every start: a board resumed after a crash gets
the very bytes it was verified with), an ESP32 bootloader asking for silicon v3.0.

Per board (`BoardImages`): what is written encrypted and how. ESP-IDF encrypts the
bootloader, the partition table, every app partition, otadata (v5.5
`esp_partition/partition.c`) and partitions flagged `encrypted`; NVS is never flash-
encrypted (it has its own scheme). The ciphertext is espsecure's
`encrypt_flash_data` with the board's key at the region's address; its MD5 is what the
flash must show (esptool itself skips the verify of encrypted writes). A board's own
esp_secure_cert partition (flagged `encrypted` in esp_secure_cert_mgr's row, read through
`esp_partition_read`, which decrypts) is encrypted the same way; NVS credentials are not.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import espsecure  # type: ignore[import-untyped]

from station import chips
from station.config import SecuritySection
from station.errors import FirmwareError
from station.parts import Region
from station.security.signer import Signer, SignError

log = logging.getLogger("station.security")

BOOTLOADER_FE = b"flash encryption is enabled (%d plaintext flashes left)"
BOOTLOADER_SB = b"secure boot v2 is already enabled, continuing.."
APP_FE = b"Flash encryption mode is DEVELOPMENT (not secure)"
BOOTLOADER_RELEASE = b"Setting CRYPT_CNT for permanent encryption"
"""In a bootloader built for release mode only (CONFIG_SECURE_FLASH_ENCRYPTION_MODE_RELEASE,
`flash_encrypt.c` `esp_flash_encrypt_enable`): with key = "device" the bootloader itself
sets the counter, so its mode is the build's."""
SECTOR = 0x1000
SIG_MAGIC = 0xE7
ALIGN = 16  # encrypted writes go in 16-byte blocks (esptool FLASH_ENCRYPTED_WRITE_ALIGN)
PART_ENCRYPTED = 1  # esp_partition_info_t flags bit 0


class PartitionRow(Protocol):
    """A row of the firmware's partition table (flash/firmware.py's Partition)."""

    @property
    def type(self) -> int: ...

    @property
    def subtype(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def flags(self) -> int: ...

    @property
    def label(self) -> str: ...


def _encrypted_partition(p: PartitionRow) -> bool:
    """App partitions, otadata, nvs_keys and partitions flagged `encrypted`."""
    return p.type == 0 or (p.type, p.subtype) in ((1, 0x00), (1, 0x04)) \
        or bool(p.flags & PART_ENCRYPTED)


@dataclass(frozen=True)
class SecuredFirmware:
    """One chip's firmware as locked boards get it; plain data shared by workers."""

    chip: str
    regions: tuple[Region, ...]  # signed where secure boot is on; plaintext
    encrypted: frozenset[int]  # offsets of the regions written encrypted
    digest: str | None  # SHA-256 of the signing key's public part, as burned (hex)
    nvs_keys_at: tuple[int, int] | None = None
    """(offset, size) of the nvs_keys partition each board gets, when its credentials go
    to NVS with NVS encryption (security/nvskeys.py); None: no credentials in NVS."""

    def encrypt_for(self, key: bytes, region: Region) -> bytes:
        """The region's ciphertext under `key` at its address (espsecure's own code)."""
        data = region.data + b"\xff" * (-len(region.data) % ALIGN)
        out = io.BytesIO()
        espsecure.encrypt_flash_data(io.BytesIO(key), out, region.offset, 0xF,
                                     self.chip != "esp32", io.BytesIO(data))
        return out.getvalue()


def _is_signed(data: bytes) -> bool:
    return len(data) >= SECTOR and len(data) % SECTOR == 0 and data[-SECTOR] == SIG_MAGIC


def _check_signature(name: str, data: bytes, signer: Signer, where: str) -> None:
    try:
        signer.verify(data)
    except SignError as e:
        raise FirmwareError(where, signer.key, f"{name} is signed, but not with "
                            f"{signer.what}: {e}; sign it with this key or configure the key "
                            "it was signed with") from None


def _sign(name: str, data: bytes, signer: Signer, cache: Path, where: str) -> bytes:
    """Sign once per (image, key): the signature is randomised, the cache keeps it."""
    tag = hashlib.sha256(data + signer.digest.encode()).hexdigest()[:24]
    cached = cache / f"{tag}.bin"
    if cached.exists():
        return cached.read_bytes()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / name.replace("/", "_"), Path(tmp) / "signed.bin"
        src.write_bytes(data)
        try:
            signer.sign(src, out)
        except SignError as e:
            raise FirmwareError(where, signer.key, f"signing {name} with {signer.what} "
                                f"failed: {e}") from None
        signed = out.read_bytes()
        out.replace(cached)
    return signed


def secure_firmware(security: SecuritySection, chip: str, regions: Sequence[Region],
                    partitions: Sequence[PartitionRow], source: str,
                    cache: Path, signer: Signer | None,
                    nvs_keys_at: tuple[int, int] | None = None) -> SecuredFirmware:
    """Check (and sign) one chip's images for [security]; FirmwareError names the fix.
    `nvs_keys_at`: the nvs_keys partition the boards' NVS keys go to (flash-encrypted)."""
    boot_at = chips.facts(chip).bootloader_offset
    boot = next((r for r in regions if r.offset == boot_at), None)
    apps = {p.offset for p in partitions if p.type == 0}
    app_regions = [r for r in regions if r.offset in apps]
    if boot is None:
        raise FirmwareError(source, "security", f"no bootloader at 0x{boot_at:x}: a locked "
                            "board must get the bootloader built for its security")
    if not partitions:
        raise FirmwareError(source, "security", "no partition table: the station cannot "
                            "tell which partitions are encrypted")
    if not app_regions:
        raise FirmwareError(source, "security", "no app image in an app partition")
    fe = security.flash_encryption != "off"
    if fe and BOOTLOADER_FE not in boot.data:
        raise FirmwareError(source, "security.flash_encryption",
                            f"{boot.name} is not built for flash encryption (no "
                            "CONFIG_SECURE_FLASH_ENC_ENABLED: its \"flash encryption is "
                            "enabled\" log string is missing); rebuild it with flash "
                            "encryption on")
    if fe and security.key == "device":
        release = BOOTLOADER_RELEASE in boot.data
        if release != (security.flash_encryption == "release"):
            built = "release" if release else "development"
            raise FirmwareError(source, "security.flash_encryption",
                                f"with key = \"device\" the bootloader sets the mode on first "
                                f"boot, and {boot.name} is built for {built} mode "
                                f"(CONFIG_SECURE_FLASH_ENCRYPTION_MODE_"
                                f"{'RELEASE' if release else 'DEVELOPMENT'}); set "
                                f"flash_encryption = \"{built}\" or rebuild it")
    if fe and not all(APP_FE in r.data for r in app_regions):
        raise FirmwareError(source, "security.flash_encryption",
                            "the app is not built for flash encryption (no CONFIG_SECURE_"
                            "FLASH_ENC_ENABLED); it would not report its mode at boot")
    digest = None
    signed: dict[int, bytes] = {}
    if security.secure_boot == "v2":
        assert signer is not None
        if BOOTLOADER_SB not in boot.data:
            raise FirmwareError(source, "security.secure_boot",
                                f"{boot.name} is not built for secure boot v2 (no "
                                "CONFIG_SECURE_BOOT_V2_ENABLED); a board locked with it "
                                "would never boot again")
        if chip == "esp32":
            _esp32_revision(boot, source)
        digest = signer.digest
        for r in [boot, *app_regions]:
            if _is_signed(r.data):
                _check_signature(r.name, r.data, signer, source)
                signed[r.offset] = r.data
            elif not security.sign_images:
                raise FirmwareError(source, "security.sign_images",
                                    f"{r.name} is not signed (no signature sector) and "
                                    "sign_images = false: sign it with espsecure sign-data "
                                    "--version 2, or let the station sign it")
            else:
                signed[r.offset] = _sign(r.name, r.data, signer, cache, source)
    out = []
    for r in regions:
        data = signed.get(r.offset)
        out.append(r if data is None else Region.build(r.name, r.offset, data))
    table_at = min((r.offset for r in regions if r.offset > boot_at), default=None)
    if table_at is not None and signed.get(boot_at) is not None \
            and boot_at + len(signed[boot_at]) > table_at:
        raise FirmwareError(source, "security.secure_boot",
                            f"the signed bootloader ends at 0x{boot_at + len(signed[boot_at]):x}"
                            f", past the next image at 0x{table_at:x}: move the partition "
                            "table (CONFIG_PARTITION_TABLE_OFFSET)")
    encrypted: set[int] = set()
    if fe and security.key == "host":  # key = "device": plaintext, the chip encrypts
        encrypted.add(boot_at)
        encrypted.update(r.offset for r in regions if r.data[:2] == b"\xaa\x50")
        for p in partitions:
            if _encrypted_partition(p):
                encrypted.update(r.offset for r in regions
                                 if p.offset <= r.offset < p.offset + p.size)
                encrypted.add(p.offset)  # what the station writes there per board later:
                # the esp_secure_cert partition (flagged encrypted), nvs_keys; never NVS
        if nvs_keys_at is not None:
            encrypted.add(nvs_keys_at[0])
    return SecuredFirmware(chip=chip, regions=tuple(out), encrypted=frozenset(encrypted),
                           digest=digest, nvs_keys_at=nvs_keys_at)


def _esp32_revision(boot: Region, source: str) -> None:
    """An ESP32 bootloader built for secure boot v2 asks for v3.0 (CONFIG_ESP32_REV_MIN_3);
    ESP-IDF refuses the combination otherwise, and older silicon has no SBv2."""
    min_rev_full = struct.unpack_from("<H", boot.data, 15)[0]
    if min_rev_full < 300:
        raise FirmwareError(source, "security.secure_boot",
                            f"secure boot v2 needs ESP32 revision v3.0, but {boot.name} is "
                            f"built for v{min_rev_full // 100}.{min_rev_full % 100} and up "
                            "(set CONFIG_ESP32_REV_MIN_3 and rebuild)")


def key_fingerprint(key: bytes) -> str:
    """What the ledger keeps of a key: a hash that names it and reveals nothing."""
    return hashlib.sha256(b"station flash-encryption key v1" + key).hexdigest()[:16]


def encrypted_region(name: str, offset: int, plaintext: bytes, ciphertext: bytes | None,
                     chip_encrypts: bool) -> Region:
    """How an encrypted region goes to the board. `chip_encrypts`: compressed
    plaintext on the wire, the chip encrypts with its burned key (esptool's --encrypt);
    else the host's ciphertext, which does not compress. Either way the flash must read
    back as `ciphertext`; None: the key is not known here (the chip's alone), nothing to
    compare (md5 "")."""
    md5 = hashlib.md5(ciphertext).hexdigest() if ciphertext is not None else ""
    if chip_encrypts or ciphertext is None:
        return Region(name=name, offset=offset, data=plaintext,
                      compressed=zlib.compress(plaintext, 9), md5=md5, encrypted=True)
    return Region(name=name, offset=offset, data=ciphertext,
                  compressed=zlib.compress(ciphertext, 1), md5=md5)
