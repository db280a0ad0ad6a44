"""The per-chip plan: which eFuses, in which batches, in which order, and what each ends.

Every name here is checked against espefuse's own field definitions for the chip
(``espefuse/efuse/<chip>/mem_definition.py`` and its key purposes in ``fields.py``), so
a chip that lacks a field or purpose is refused at start instead of at the first board.
The order is Espressif's external workflow (ESP-IDF
``security-features-enablement-workflows.rst``): the flash-encryption key, then the
crypt counter once the images are written encrypted, then secure boot (which
write-protects RD_DIS: no key can be read-protected after it, esp-idf#11888), then the
release-mode eFuses with secure download mode last (espefuse burns it in the postponed
part of the same batch, so it lands only when the rest did).
Every step is irreversible; `lines()` says so, step by step, for `station check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from station.config import SecuritySection
from station.security.efuse_defs import espefuse_module

StepName = Literal["key", "encrypt", "secure_boot", "lockdown"]
STEPS: tuple[StepName, ...] = ("key", "encrypt", "secure_boot", "lockdown")
RELEASE_EFUSES = ("DIS_DOWNLOAD_ICACHE", "DIS_DOWNLOAD_DCACHE", "SPI_DOWNLOAD_MSPI_DIS",
                  "DIS_PAD_JTAG", "DIS_USB_JTAG", "DIS_DIRECT_BOOT",
                  "DIS_DOWNLOAD_MANUAL_ENCRYPT")
ESP32_RELEASE_EFUSES = ("DISABLE_DL_ENCRYPT", "DISABLE_DL_DECRYPT", "DISABLE_DL_CACHE",
                        "JTAG_DISABLE")
SB_REVISION_ESP32 = 300  # secure boot v2 needs ESP32 silicon v3.0 (ECO3)


class PlanError(ValueError):
    """The chip cannot be locked as configured (a field or purpose it lacks)."""


def _module(name: str) -> Any:
    return espefuse_module(f"efuse.{name}")


@cache
def efuse_names(chip: str) -> frozenset[str]:
    """Every eFuse name and alias espefuse defines for `chip`."""
    fields = _module(f"{chip}.mem_definition").EfuseDefineFields(None)
    names: set[str] = set()
    blocks = getattr(fields, "KEYBLOCKS", None) or getattr(fields, "KEYBLOCKS_256", [])
    for efuse in [*fields.EFUSES, *blocks]:
        names.add(efuse.name)
        names.update(efuse.alt_names or [])
    return frozenset(names)


@cache
def key_purposes(chip: str) -> frozenset[str]:
    """The key purposes espefuse knows for `chip` (none on the ESP32: fixed blocks)."""
    field = getattr(_module(f"{chip}.fields"), "EfuseKeyPurposeField", None)
    return frozenset(row[0] for row in getattr(field, "KEY_PURPOSES", None) or [])


@dataclass(frozen=True)
class Burn:
    """One thing a batch burns: an eFuse value, a key or digest in a block, a protection."""

    kind: Literal["efuse", "key", "digest", "write_protect"]
    name: str  # eFuse name; for key/digest: the purpose (ESP32: the block alias)
    value: int = 1

    def describe(self) -> str:
        if self.kind == "efuse":
            return f"{self.name} = {self.value:#x}" if self.value > 1 else self.name
        if self.kind == "key":
            return f"the board's own key -> {self.name} (read- and write-protected)"
        if self.kind == "digest":
            return f"signing key digest -> {self.name} (write-protected)"
        return f"write-protect {self.name}"


@dataclass(frozen=True)
class Step:
    """One espefuse batch, journaled before and after."""

    name: StepName
    burns: tuple[Burn, ...]
    ends: str  # what can never be done again once it is burned

    def efuse_values(self) -> dict[str, int]:
        return {b.name: b.value for b in self.burns if b.kind == "efuse"}


@dataclass(frozen=True)
class ChipPlan:
    chip: str
    mode: str  # "release", "development" or "off"
    key_purpose: str | None  # XTS_AES_128_KEY, XTS_AES_256_KEY, "flash_encryption" (ESP32)
    digest_purpose: str | None  # SECURE_BOOT_DIGEST0, "secure_boot_v2" (ESP32)
    counter: str | None  # SPI_BOOT_CRYPT_CNT / FLASH_CRYPT_CNT
    steps: tuple[Step, ...]

    def step(self, name: StepName) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def lines(self) -> list[str]:
        """The plan as `station check` prints it: every batch, in order, irreversible."""
        out = [f"{self.chip}: {len(self.steps)} eFuse batches, in this order "
               "(each one is IRREVERSIBLE):"]
        for n, step in enumerate(self.steps, 1):
            out.append(f"  {n}. {step.name}: " + "; ".join(b.describe() for b in step.burns))
            out.append(f"     after it: {step.ends}")
        return out


def _need(chip: str, name: str, what: str) -> str:
    if name not in efuse_names(chip):
        raise PlanError(f"{chip} has no {name} eFuse ({what}); espefuse's table for it "
                        "lacks the field")
    return name


def _present(chip: str, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n in efuse_names(chip)]


def chip_plan(chip: str, security: SecuritySection) -> ChipPlan:
    """The plan for one chip; PlanError names what the chip lacks."""
    esp32 = chip == "esp32"
    fe = security.flash_encryption
    purposes = key_purposes(chip)
    steps: list[Step] = []
    key_purpose = digest_purpose = counter = None
    if not esp32 and not purposes:
        raise PlanError(f"{chip}: espefuse knows no key purposes for it")
    if fe != "off":
        if esp32:
            key_purpose = "flash_encryption"
            if security.xts_aes != 128:
                raise PlanError("esp32 has no AES-XTS: its flash encryption is AES-256 with "
                                "its own key tweak; remove [security] xts_aes")
        else:
            key_purpose = "XTS_AES_128_KEY" if security.xts_aes == 128 else "XTS_AES_256_KEY"
            if key_purpose not in purposes:
                raise PlanError(f"{chip} has no {key_purpose} key purpose (it has "
                                f"{', '.join(p for p in sorted(purposes) if 'XTS' in p)}): "
                                "set [security] xts_aes = 128")
        if security.key == "host":
            key_burns = [Burn("key", key_purpose)]
            if esp32:  # the hardware tweaks the key by it from the first encrypted write
                key_burns.append(Burn("efuse", _need(chip, "FLASH_CRYPT_CONFIG", "key tweak"),
                                      0xF))
            steps.append(Step("key", tuple(key_burns), "the key can never be read or changed"))
        counter = _need(chip, "FLASH_CRYPT_CNT" if esp32 else "SPI_BOOT_CRYPT_CNT",
                        "the flash-encryption counter")
        full = (1 << (7 if esp32 else 3)) - 1
        burns = [Burn("efuse", counter, full if fe == "release" else 1)]
        if security.key == "host":
            steps.append(Step("encrypt", tuple(burns),
                              "the chip reads its flash through the key; plaintext images "
                              "no longer boot" + ("; no plaintext flash ever again"
                                                  if fe == "release" else "")))
    if security.secure_boot == "v2":
        if esp32:
            digest_purpose = "secure_boot_v2"
            burns = [Burn("digest", digest_purpose), Burn("efuse", _need(
                chip, "ABS_DONE_1", "secure boot v2 enable"))]
        else:
            digest_purpose = "SECURE_BOOT_DIGEST0"
            if digest_purpose not in purposes:
                raise PlanError(f"{chip} has no SECURE_BOOT_DIGEST0 key purpose")
            burns = [Burn("digest", digest_purpose),
                     Burn("efuse", _need(chip, "SECURE_BOOT_EN", "secure boot enable"))]
            burns += [Burn("efuse", _need(chip, f"SECURE_BOOT_KEY_REVOKE{i}", "unused slot"))
                      for i in (1, 2)]
            burns.append(Burn("write_protect", _need(chip, "RD_DIS", "read protection")))
        steps.append(Step("secure_boot", tuple(burns),
                          "only images signed with this signing key boot, forever"
                          + ("" if esp32 else "; the other two digest slots are revoked; "
                             "no key can be read-protected any more")))
    if security.lockdown:
        if esp32:
            burns = [Burn("efuse", n) for n in _present(chip, ESP32_RELEASE_EFUSES)]
            burns.append(Burn("efuse", _need(chip, "UART_DOWNLOAD_DIS", "download mode")))
            ends = ("no JTAG, no encrypted writes or flash reads over UART, and no UART "
                    "download mode at all: the board can never be reflashed over USB")
        else:
            burns = [Burn("efuse", n) for n in _present(chip, RELEASE_EFUSES)]
            if "DIS_ICACHE" in efuse_names(chip):
                burns.append(Burn("write_protect", "DIS_ICACHE"))
            burns.append(Burn("efuse", _need(chip, "ENABLE_SECURITY_DOWNLOAD",
                                             "secure download mode")))
            ends = ("no JTAG, no encrypted writes or cache reads in download mode; secure "
                    "download mode: espefuse can never read this chip again, esptool only "
                    "writes plaintext flash")
        steps.append(Step("lockdown", tuple(burns), ends))
    mode = "off" if fe == "off" else fe
    return ChipPlan(chip=chip, mode=mode, key_purpose=key_purpose,
                    digest_purpose=digest_purpose, counter=counter, steps=tuple(steps))
