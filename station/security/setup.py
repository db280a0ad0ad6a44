"""[security] at start: the per-chip plans and the secured firmware, or a refusal.

Everything that would brick a board or leave it open is refused here, before the first
board, with the file, the key and the fix: a purpose or field the chip lacks (from
espefuse's tables), images not built for the features, unsigned images where the
station may not sign, credentials that would sit in plain NVS (a table without the
nvs_keys partition NVS encryption needs) or in an esp_secure_cert partition not flagged
encrypted on an encrypted board,
a lock-down nothing would prove (no boot check).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from station.config import SECURE_CERT_LABEL, Config
from station.errors import ConfigError
from station.parts import Region
from station.security.images import (
    PART_ENCRYPTED,
    PartitionRow,
    SecuredFirmware,
    secure_firmware,
)
from station.security.nvskeys import NVS_KEYS_PAGE, NVS_KEYS_ROW, nvs_keys_partition
from station.security.plan import ChipPlan, PlanError, chip_plan
from station.security.signer import signer_for


class FirmwareFacts(Protocol):
    """One chip's firmware as the wiring hands it over (flash/'s FirmwareBundle)."""

    @property
    def chip(self) -> str: ...

    @property
    def regions(self) -> tuple[Region, ...]: ...

    @property
    def partitions(self) -> Sequence[PartitionRow]: ...

    @property
    def source(self) -> str: ...


@dataclass(frozen=True)
class StationSecurity:
    """The plans and secured images of every chip the station has firmware for."""

    plans: dict[str, ChipPlan]
    firmware: dict[str, SecuredFirmware]
    mode: str  # "release+sbv2+lockdown" ...
    signing_key_pem: bytes | None  # the signing key's public part (its digest is burned)
    escrow_pem: bytes | None = None  # [security] escrow_public_key: wraps each host key

    def lines(self) -> list[str]:
        out = [f"security    {self.mode}"]
        for chip, plan in self.plans.items():
            fw = self.firmware[chip]
            enc = ", ".join(f"0x{o:x}" for o in sorted(fw.encrypted)) or "none"
            out += [f"            {line}" for line in plan.lines()]
            out.append(f"            {chip}: encrypted at {enc}"
                       + (f"; signing key digest {fw.digest[:16]}" if fw.digest else ""))
            if fw.nvs_keys_at is not None:
                out.append(f"            {chip}: NVS credentials encrypted, keys in nvs_keys "
                           f"at 0x{fw.nvs_keys_at[0]:x} (a pair per board, flash-encrypted)")
        return out


def describe_mode(config: Config) -> str:
    s = config.security
    parts = []
    if s.flash_encryption != "off":
        parts.append(f"flash encryption {s.flash_encryption} ({s.key} key"
                     + (f", AES-{s.xts_aes}-XTS" if s.xts_aes != 128 else "") + ")")
    if s.secure_boot != "off":
        parts.append("secure boot v2" + (" (HSM)" if s.hsm_config is not None else ""))
    if s.lockdown:
        parts.append("lock-down")
    return ", ".join(parts) or "off"


def secure_line(config: Config, firmwares: Sequence[FirmwareFacts]) -> StationSecurity | None:
    """The station's security, checked; None when [security] is off."""
    s = config.security
    if not s.enabled:
        return None
    path = str(config.path)
    if config.verify.boot != "app":
        raise ConfigError(path, "verify.boot", "a locked board must prove it boots in the "
                          "mode it was locked in (release mode, secure boot): set "
                          "[verify] boot = \"app\"")
    if s.flash_encryption != "off" and config.registrar.kind != "none":
        for fw in firmwares:
            _credentials_encrypted(config, fw, path)
    plans: dict[str, ChipPlan] = {}
    secured: dict[str, SecuredFirmware] = {}
    cache = config.station.state_dir / "signed"
    signer = None
    if s.secure_boot == "v2":  # a token that refuses its PIN is refused here
        signer = signer_for(s.signing_key, s.hsm_config, path)
    for fw in firmwares:
        try:
            plans[fw.chip] = chip_plan(fw.chip, s)
        except PlanError as e:
            raise ConfigError(path, "security", str(e)) from None
        secured[fw.chip] = secure_firmware(s, fw.chip, fw.regions, fw.partitions, fw.source,
                                           Path(cache), signer, _nvs_keys_at(config, fw))
    if s.key == "device":
        _first_boot_time(config, secured.values())
    return StationSecurity(plans=plans, firmware=secured, mode=describe_mode(config),
                           signing_key_pem=signer.public_pem if signer else None,
                           escrow_pem=s.escrow_public_key.read_bytes()
                           if s.escrow_public_key is not None else None)


def _nvs_keys_at(config: Config, fw: FirmwareFacts) -> tuple[int, int] | None:
    """Where the board's NVS encryption keys go, when its credentials go to NVS on an
    encrypted line (security/nvskeys.py); a table without an nvs_keys partition is
    refused: plain NVS would leave the private key readable on a locked board."""
    if config.security.flash_encryption == "off" or config.registrar.kind == "none":
        return None
    path, board = str(config.path), config.credentials_for(fw.chip)
    which = "" if len(config.firmwares) == 1 else f" ({fw.chip})"
    if board.format != "nvs":
        return None  # esp_secure_cert: flagged encrypted, written encrypted (below)
    part = nvs_keys_partition(fw.partitions)
    table = f"the partition table of {fw.source}{which}"
    if part is None:
        raise ConfigError(path, "security.flash_encryption", f"{table} has no nvs_keys "
                          "partition: the credentials go to NVS, which flash encryption does "
                          "not cover, and NVS encryption keeps its keys in one; add the row "
                          f"\"{NVS_KEYS_ROW}\" to the build's partitions.csv (ESP-IDF's NVS "
                          "encryption, flash-encryption-based scheme) and rebuild, or set "
                          "[registrar] kind = \"none\"")
    if part.size < NVS_KEYS_PAGE:
        raise ConfigError(path, "security.flash_encryption", f"{table}: the nvs_keys "
                          f"partition is 0x{part.size:x} bytes; it must be at least "
                          f"0x{NVS_KEYS_PAGE:x} (4 KB) in partitions.csv")
    return part.offset, part.size


DS_SAFE_BLOCK = "BLOCK_KEY5"
"""The one key block an XTS key never takes (efuses.py `free_key_block(skip_last)`): the
DS key's block beside host-made flash encryption."""


def _credentials_encrypted(config: Config, fw: FirmwareFacts, path: str) -> None:
    """Credentials on an encrypted board go where flash encryption covers them: the
    esp_secure_cert partition flagged `encrypted` (esp_secure_cert_mgr's own row), which
    the station writes encrypted with the board's key; NVS only with NVS encryption
    (`_nvs_keys_at`), never plain."""
    board = config.credentials_for(fw.chip)
    if board.format == "nvs":
        return  # _nvs_keys_at refuses a table without nvs_keys
    if board.ds and config.security.key == "host" and board.efuse_key_block != DS_SAFE_BLOCK:
        raise ConfigError(path, "credentials.efuse_key_block", f"{fw.chip}: the flash-"
                          "encryption key is burned before the DS key, into the first free "
                          f"key block from BLOCK_KEY0 (two with AES-256), so "
                          f"{board.efuse_key_block} may be taken: set efuse_key_block = "
                          f"\"{DS_SAFE_BLOCK}\" (an XTS key never goes there)")
    part = next((p for p in fw.partitions if p.label == SECURE_CERT_LABEL), None)
    if part is not None and not part.flags & PART_ENCRYPTED:
        raise ConfigError(path, "credentials.format", f"{fw.chip}: the esp_secure_cert "
                          "partition is not flagged encrypted, so flash encryption would "
                          "leave it in the clear: end its row in partitions.csv with "
                          "\"encrypted\" (\"esp_secure_cert, 0x3F, , 0xD000, 0x2000, "
                          "encrypted\") and rebuild")


FIRST_BOOT_S_PER_MB = 15.0
"""ESP-IDF's sample logs: 1 MB encrypted in place in 10.9 s (S3) to 14.0 s (C3)."""


def _first_boot_time(config: Config, firmware: Iterable[SecuredFirmware]) -> None:
    """key = "device": the boot check waits through the first boot's encryption."""
    size = max(sum(len(r.data) for r in fw.regions) for fw in firmware)
    need = 2.0 + FIRST_BOOT_S_PER_MB * size / 1e6
    if config.verify.boot_timeout < need:
        raise ConfigError(str(config.path), "verify.boot_timeout",
                          f"{config.verify.boot_timeout:g} s is too short for a board to "
                          f"encrypt {size // 1024} KB on its first boot (about "
                          f"{FIRST_BOOT_S_PER_MB:g} s per MB) and boot again: set it to "
                          f"{need:.0f} or more")
