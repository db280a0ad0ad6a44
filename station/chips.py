"""Chip facts, read from esptool's target classes rather than copied.

esptool 5.6 knows 14 ESP32-family targets (`esptool.targets.CHIP_DEFS`); each class
holds the facts the station needs before it meets a board: the chip id an image built
for it carries (`IMAGE_CHIP_ID`), where its ROM loads the second-stage bootloader from
(`BOOTLOADER_FLASH_OFFSET`: 0x1000, 0x2000 or 0x0), its display name (`CHIP_NAME`) and
the flash-size codes of its image header (`FLASH_SIZES`). A table of our own would drift
when the pinned esptool moves; this module is the one place that reads them.

ESP8266 is in CHIP_DEFS too, but its images have no extended header (no chip id) and the
station's flash layout does not apply: it is not a chip this station supports, and
saying so at config load is better than a confusing failure at the first board.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache

from esptool.targets import CHIP_DEFS
from esptool.util import flash_size_bytes

NOT_SUPPORTED = {"esp8266": "ESP8266 images have no chip id and another flash layout"}


@dataclass(frozen=True)
class ChipFacts:
    """What esptool says about one chip."""

    name: str  # esptool's --chip spelling: "esp32s3"
    display: str  # "ESP32-S3"
    image_chip_id: int
    bootloader_offset: int
    flash_sizes: dict[int, int]  # header byte 3 & 0xF0 -> bytes


def normalise(name: str) -> str:
    """esptool's "ESP32-S3" (CHIP_NAME) or "ESP32-S3" typed by a person -> "esp32s3"."""
    return name.strip().lower().replace("-", "").replace("_", "")


@cache
def _all() -> dict[str, ChipFacts]:
    facts: dict[str, ChipFacts] = {}
    for name, rom in CHIP_DEFS.items():
        if name in NOT_SUPPORTED or not hasattr(rom, "IMAGE_CHIP_ID"):
            continue
        sizes: dict[int, int] = {}
        for text, code in rom.FLASH_SIZES.items():
            size = flash_size_bytes(text)
            if size is not None:
                sizes[code] = size
        facts[name] = ChipFacts(name=name, display=rom.CHIP_NAME,
                                image_chip_id=rom.IMAGE_CHIP_ID,
                                bootloader_offset=rom.BOOTLOADER_FLASH_OFFSET,
                                flash_sizes=sizes)
    return facts


def supported() -> tuple[str, ...]:
    """Every chip the station can flash, in esptool's order."""
    return tuple(_all())


def facts(chip: str) -> ChipFacts:
    """The facts of a supported chip; KeyError for anything else."""
    return _all()[chip]


def by_image_id(chip_id: int) -> str | None:
    """The chip an image's extended header names, or None if esptool knows none."""
    return next((f.name for f in _all().values() if f.image_chip_id == chip_id), None)


def unsupported_reason(name: str) -> str:
    """Why `name` is not a chip of this station, with the chips that are (for messages)."""
    choices = ", ".join(supported())
    if name in _all():
        return ""
    key = normalise(name)
    if key in NOT_SUPPORTED:
        return f"{name!r} is not supported: {NOT_SUPPORTED[key]} (one of {choices})"
    close = [key] if key in _all() else \
        difflib.get_close_matches(key, supported(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{name!r} is not an ESP32-family chip esptool knows{hint} (one of {choices})"


DS_PURPOSE = "HMAC_DOWN_DIGITAL_SIGNATURE"


@cache
def ds_chips() -> tuple[str, ...]:
    """The chips whose private key can live as Digital Signature ciphertext: espefuse
    knows the eFuse key purpose HMAC_DOWN_DIGITAL_SIGNATURE for them (its per-chip
    `EfuseKeyPurposeField.KEY_PURPOSES`), and esp-secure-cert-tool can make the RSA DS
    parameters for them (`configure_ds.supported_targets_rsa_ds`). Both must hold: a chip
    with the purpose but no DS parameters in the tool (ESP32-H21, -H4) cannot be
    provisioned this way; classic ESP32 and ESP32-C2 have neither."""
    import importlib
    import warnings

    from esp_secure_cert.configure_ds import supported_targets_rsa_ds

    found: list[str] = []
    for name in supported():
        try:
            with warnings.catch_warnings():  # espefuse's cli_util imports click's old parser
                warnings.simplefilter("ignore", DeprecationWarning)
                fields = importlib.import_module(f"espefuse.efuse.{name}.fields")
        except ImportError:
            continue
        purposes = getattr(getattr(fields, "EfuseKeyPurposeField", None), "KEY_PURPOSES", ())
        if any(p[0] == DS_PURPOSE for p in purposes) and name in supported_targets_rsa_ds:
            found.append(name)
    return tuple(found)
