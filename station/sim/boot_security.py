"""Flash encryption and secure boot v2 in the boot story (:mod:`.boot_log`).

What the chip reads: with flash encryption on (an odd number of bits in the crypt
counter) the ROM and the bootloader read flash through the cache, which decrypts with
the eFuse key (:mod:`.flash_crypto`): the bootloader region, the partition table, every
app partition, every partition flagged ``encrypted`` and, since ESP-IDF v5.5, otadata
(``components/esp_partition/partition.c``). :func:`flash_view` is that decrypted view;
ciphertext written with the wrong key, or plaintext on an encrypted chip, reads as noise
and fails where a real chip fails (``invalid header`` in the ROM, bad partition table,
bad app magic).

What the code prints depends on how the bootloader and app were built, which the
simulator cannot see from a ``sdkconfig`` (it is not in the images). It reads the one
trace the build leaves in the binaries: ESP-IDF's log format strings are compiled into
the image (at the default log level), so a bootloader built with
``CONFIG_SECURE_FLASH_ENC_ENABLED`` contains ``flash encryption is enabled (%d plaintext
flashes left)`` (``flash_encrypt.c``), one built with ``CONFIG_SECURE_BOOT_V2_ENABLED``
contains ``secure boot v2 is already enabled, continuing..`` (``secure_boot_v2/
secure_boot.c``), and an app built for flash encryption contains ``Flash encryption mode
is DEVELOPMENT (not secure)`` (``flash_encrypt.c``, ``esp_flash_encryption_init_checks``).
A build with the bootloader log level lowered carries no such strings and is taken as
built without the feature. The signing scheme is the bootloader's own signature block's.

The lines, in ESP-IDF v5.5.1's order (``bootloader_utility.c`` ``load_image``,
``esp_image_format.c`` ``verify_secure_boot_signature``,
``secure_boot_v2/secure_boot_signatures_bootloader.c``): the app's segments, then
``Verifying image signature...`` / ``Verifying with RSA-PSS...`` / ``Signature verified
successfully!`` (or the failure lines and no app), ``Loaded app from partition``,
``enabling secure boot v2...`` / ``secure boot v2 is already enabled, continuing..``,
``Checking flash encryption...`` / ``flash encryption is enabled (N plaintext flashes
left)``, ``Disabling RNG early entropy source...``; in the app ``Flash encryption mode
is DEVELOPMENT (not secure)`` (warning level in v5.5) or ``... RELEASE``.

The ROM checks the bootloader's signature when SECURE_BOOT_EN is burned; its words are
from ESP32-S3 logs (esp-idf#13273: ``Valid secure boot key blocks: 0`` / ``secure boot
verification succeeded``; esp-idf#15959: ``No signature block magic byte found at
signature sector (found 0x61 not 0xe7). Image not V2 signed?`` / ``secure boot
verification failed`` / ``ets_main.c 329``); other chips are given the same words, the
ESP32 (V3) ``secure boot check fail`` (its V1 message, esp-idf#7421).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from esptool.bin_image import LoadFirmwareImage

from . import secure_boot as sb
from .boot_log import PARTITION_TABLE_OFFSET, spi_boot
from .chips import ChipSpec
from .device_key import FirstBoot, Step, first_boot
from .efuse import EfuseArray
from .flash import Flash, FlashTiming
from .flash_crypto import FlashCipher, chip_cipher

BOOTLOADER_FE = b"flash encryption is enabled (%d plaintext flashes left)"
BOOTLOADER_SB = b"secure boot v2 is already enabled, continuing.."
APP_FE = b"Flash encryption mode is DEVELOPMENT (not secure)"
_PART = struct.Struct("<HBBII16sI")
PART_ENCRYPTED = 1  # esp_partition_info_t flags bit 0 (PART_FLAG_ENCRYPTED)
APP_PEEK = 0x10000  # decrypted first to learn an app image's length


def _span(flash: bytes, start: int, limit: int, chip: str, cipher: FlashCipher) -> int:
    """How much of an image at ``start`` the bootloader reads: image, padding to 4 KB
    and a signature sector (what fits the partition). Like the bootloader
    (``esp_image_format.c`` ``process_segments``), it reads each segment's header
    through the cache, decrypted, to find the next: the first 64 KB are decrypted at
    once, segment headers beyond them one by one (an app of any size)."""
    limit = min(limit, len(flash) - start) // 16 * 16
    view = bytearray(cipher.decrypt(start, flash[start:start + min(APP_PEEK, limit)]))
    view += flash[start + len(view):start + limit]
    pos, count = 24, view[1] if view else 0  # image header + extended header
    for _ in range(count):
        if pos + 8 > limit:
            break
        if pos + 8 > APP_PEEK:  # decrypt the 16-byte blocks holding this header
            lo, hi = pos // 16 * 16, -(-(pos + 8) // 16) * 16
            view[lo:hi] = cipher.decrypt(start + lo, bytes(flash[start + lo:start + hi]))
        pos += 8 + struct.unpack_from("<I", view, pos + 4)[0]
    try:
        image = LoadFirmwareImage(chip, bytes(view) + bytes(APP_PEEK))
        end = sb.signature_sector_at(0, sb.image_length(image)) + sb.SECTOR
    except Exception:
        end = APP_PEEK
    return min(end, limit) // 16 * 16


def flash_view(spec: ChipSpec, efuses: EfuseArray, flash: bytes) -> bytes:
    """Flash as the ROM and the bootloader read it (decrypted where encryption is on)."""
    if not efuses.flash_encryption:
        return flash
    cipher = chip_cipher(efuses)
    view = bytearray(flash)

    def decrypt(start: int, length: int) -> None:
        length = max(0, min(length, len(flash) - start)) // 16 * 16
        view[start:start + length] = cipher.decrypt(start, flash[start:start + length])

    decrypt(spec.bootloader_offset, PARTITION_TABLE_OFFSET - spec.bootloader_offset)
    decrypt(PARTITION_TABLE_OFFSET, 0x1000)
    for pos in range(PARTITION_TABLE_OFFSET, PARTITION_TABLE_OFFSET + 0xC00, _PART.size):
        magic, ptype, sub, offset, size, _label, flags = _PART.unpack_from(view, pos)
        if magic != 0x50AA:
            break
        if ptype == 0:
            decrypt(offset, _span(flash, offset, size, spec.name, cipher))
        elif flags & PART_ENCRYPTED or (ptype, sub) in ((1, 0x00), (1, 0x04), (1, 0x90)):
            decrypt(offset, size)
    return bytes(view)


class BootSecurity:
    """The hooks :func:`.boot_log.spi_boot` calls on a chip with these eFuses."""

    def __init__(self, spec: ChipSpec, efuses: EfuseArray, flash: Flash) -> None:
        self.spec = spec
        self.efuses = efuses
        self.flash = flash
        self.first_boot: FirstBoot | None = None  # encryption enabled on this boot
        self.sb_on = sb.secure_boot_enabled(efuses)
        self.trusted = sb.trusted_digests(efuses)
        self.bootloader = b""
        self.scheme: int | None = None

    # -- ROM ---------------------------------------------------------------------------

    def rom(self, view: bytes, boot_at: int, image: Any) -> tuple[list[str], bool]:
        """The ROM's secure boot check of the bootloader (nothing when it is off)."""
        length = sb.image_length(image)
        self.bootloader = view[boot_at:boot_at + length]
        checks = sb.check_blocks(view, boot_at, length, self.trusted)
        self.scheme = sb.scheme_of(checks)
        if not self.sb_on:
            return [], True
        if self.spec.name == "esp32":
            return ([], True) if sb.verified(checks) else (["secure boot check fail"], False)
        slots = " ".join(str(i) for i, d in enumerate(self.trusted) if d)
        lines = [f"Valid secure boot key blocks: {slots}"]
        if sb.verified(checks):
            return lines + ["secure boot verification succeeded"], True
        magic = sb.first_magic(view, boot_at, length)
        if magic != sb.SIG_MAGIC:
            lines.append(f"No signature block magic byte found at signature sector (found "
                         f"0x{magic:02x} not 0xe7). Image not V2 signed?")
        return lines + ["secure boot verification failed", "ets_main.c 329"], False

    # -- bootloader --------------------------------------------------------------------

    @property
    def built_for_secure_boot(self) -> bool:
        return BOOTLOADER_SB in self.bootloader

    @property
    def built_for_encryption(self) -> bool:
        return BOOTLOADER_FE in self.bootloader

    def verify_app(self, log: Any, view: bytes, offset: int, image: Any) -> bool:
        """``verify_secure_boot_signature`` of a bootloader built for secure boot."""
        if not (self.built_for_secure_boot and self.sb_on):
            return True
        length = sb.image_length(image)
        checks = sb.check_blocks(view, offset, length, self.trusted)
        scheme = self.scheme or sb.VERSION_RSA
        name = sb.SCHEME_NAMES.get(scheme, "Unknown")
        log.i("esp_image", "Verifying image signature...")
        if self.spec.name != "esp32" and not any(c.valid and c.version == scheme
                                                 for c in checks):
            log.e("secure_boot_v2", "No signature block generated for valid scheme")
            log.e("secure_boot_v2", f"{name} signing scheme selected but no signature "
                  "block for the selected scheme")
        else:
            log.i("secure_boot_v2", "Verifying with RSA-PSS..." if scheme == sb.VERSION_RSA
                  else "Verifying with ECDSA...")
            if sb.verified(checks):
                log.i("secure_boot_v2", "Signature verified successfully!")
                return True
            log.e("secure_boot_v2", "Secure Boot V2 verification failed.")
        log.e("esp_image", "Secure boot signature verification failed")
        log.i("esp_image", "Calculating simple hash to check for corruption...")
        intact = not image.append_digest or image.stored_digest == image.calc_digest
        log.i("esp_image", "image valid, signature bad" if intact else
              "image corrupted on flash", "W")
        return False

    def after_load(self, log: Any) -> bool:
        """``load_image``: secure boot, then flash encryption, before the app starts.
        False: the bootloader is enabling flash encryption (:mod:`.device_key`)."""
        if self.built_for_secure_boot:
            log.i("secure_boot_v2", "enabling secure boot v2...")
            if self.sb_on:
                log.i("secure_boot_v2", "secure boot v2 is already enabled, continuing..")
        if self.built_for_encryption:
            log.i("boot", "Checking flash encryption...")
            if self.efuses.flash_encryption:
                log.i("flash_encrypt", "flash encryption is enabled "
                      f"({self.plaintext_flashes_left()} plaintext flashes left)")
            else:
                self.first_boot = first_boot(self.spec, self.efuses, self.flash,
                                             self.bootloader, log, self.built_for_secure_boot)
                return False
        return True

    def plaintext_flashes_left(self) -> int:
        """``esp_flash_encrypt_state``: (bits - set bits) / 2, 0 once write-protected."""
        if self.efuses.write_protected(self.efuses.crypt_cnt_name):
            return 0
        return (self.efuses.crypt_cnt_bits - bin(self.efuses.crypt_cnt).count("1")) // 2

    # -- app -----------------------------------------------------------------------------

    def app_start(self, log: Any, app: bytes) -> None:
        """``esp_flash_encryption_init_checks`` in an app built for flash encryption."""
        if APP_FE not in app or not self.efuses.flash_encryption:
            return
        if self.release_mode():
            log.i("flash_encrypt", "Flash encryption mode is RELEASE")
        else:
            log.i("flash_encrypt", "Flash encryption mode is DEVELOPMENT (not secure)", "W")

    def release_mode(self) -> bool:
        """``esp_get_flash_encryption_mode``: counter maxed or write-protected, and the
        download-mode eFuses of the chip (ESP32: DISABLE_DL_ENCRYPT/DECRYPT/CACHE; later:
        DIS_DOWNLOAD_MANUAL_ENCRYPT and whichever of DIS_DOWNLOAD_ICACHE,
        DIS_DOWNLOAD_DCACHE the chip has; SPI_DOWNLOAD_MSPI_DIS only on the P4:
        ESP-IDF v5.5 ``bootloader_support/src/flash_encrypt.c``, `#if
        CONFIG_IDF_TARGET_ESP32P4`, so a C6 is in release mode without it)."""
        e = self.efuses
        locked = (e.write_protected(e.crypt_cnt_name)
                  or e.crypt_cnt == (1 << e.crypt_cnt_bits) - 1)
        if not locked:
            return False
        if e.chip == "esp32":
            names = ["DISABLE_DL_CACHE", "DISABLE_DL_ENCRYPT", "DISABLE_DL_DECRYPT"]
        else:
            cache = ("SPI_DOWNLOAD_MSPI_DIS",) if e.chip == "esp32p4" else \
                ("DIS_DOWNLOAD_ICACHE", "DIS_DOWNLOAD_DCACHE")
            names = ["DIS_DOWNLOAD_MANUAL_ENCRYPT"] + [n for n in cache if e.has(n)]
        return all(e.field(n) for n in names)


class BootRun(NamedTuple):
    """One SPI boot: what is printed at once, whether the app came up, and the timed
    work that follows before the chip resets itself (first-boot encryption)."""

    text: str
    ok: bool
    steps: list[Step]


def boot_story(spec: ChipSpec, efuses: EfuseArray, flash: Flash | bytes,
               app_line: str | None = None) -> BootRun:
    """The console output of one SPI boot of this chip, security included."""
    if isinstance(flash, bytes):
        chip_flash = Flash(len(flash), FlashTiming(enabled=False))
        chip_flash.data[:] = flash
        flash = chip_flash
    security = BootSecurity(spec, efuses, flash)
    text, ok = spi_boot(spec, flash_view(spec, efuses, bytes(flash.data)), app_line, security)
    steps = security.first_boot.steps if security.first_boot else []
    return BootRun(text, ok, steps)
