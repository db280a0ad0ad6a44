"""What a board gets: the plan for its chip, built once at start and shared by workers.

A station may hold firmware for several chips (`[[firmware]]`); it learns a board's chip
only once connected, so the worker is handed `Plans` (one `Plan` per chip) and picks.
A plan is plain data and two callables: no esptool, no config, no cloud. `build_plans`
makes them at start from the config and the firmware bundles (`load_bundles`); the
credentials partition's image comes from whoever wires the station (identity's
`credentials_image`: NVS or esp_secure_cert), so flash/ never imports identity/.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from station.config import BoardCredentials, Config
from station.errors import FirmwareError, WrongChipError
from station.flash.bootcheck import BootCheck, app_of
from station.flash.firmware import FirmwareBundle, Partition, load_firmware
from station.parts import BoardIdentity, BootJudge, DeviceCredentials, Region

CredentialsImage = Callable[[DeviceCredentials, int, int, str, bytes | None], Region]
"""(credentials, partition offset, partition size, NVS namespace, NVS encryption keys or
None) -> the board's data partition with them (identity's `nvs_region`,
`secure_cert_region`)."""
CredentialsMaker = Callable[[BoardCredentials, str], CredentialsImage]
"""(a chip's credentials format, the chip) -> how its boards' credentials partition is
made (identity's `credentials_image`)."""
SECURE_CERT_MIN = 0x2000
"""esp-secure-cert-tool lays the TLV partition out in 0x2000 bytes (tlv_format.py)."""
SECURE_CERT_ROW = "esp_secure_cert, 0x3F, , 0xD000, 0x2000, encrypted"
"""The row esp_secure_cert_mgr's examples add to partitions.csv."""


@dataclass(frozen=True)
class Plan:
    """What every board gets; built once at start and shared by all workers."""

    chip: str
    regions: tuple[Region, ...]
    firmware_hash: str
    station: str
    thing_name: Callable[[BoardIdentity], str]
    credentials_region: Callable[[DeviceCredentials, bytes | None], Region] | None = None
    """Builds the per-board data partition (encrypted with the board's NVS keys when
    given); None when the registrar makes no credentials."""
    boot: BootJudge | None = None
    """[verify] boot: what the board must print after the reset (bootcheck.py)."""
    app_version: str = ""
    """The app's version (its esp_app_desc_t), "" if unknown: [registry] {firmware_version}."""
    ds_block: str | None = None
    """[credentials] ds: the eFuse key block of the board's HMAC key; the credentials
    partition is then made by the DS step (station/dsboard.py), not credentials_region."""
    credentials_at: tuple[int, int] | None = None
    """(offset, size) of the credentials partition, when the registrar makes credentials."""
    credentials_format: str = ""
    """[credentials] format for this chip ("nvs", "esp_secure_cert"), for the ledger."""

    @property
    def flash_end(self) -> int:
        """The highest byte the common images write."""
        return max((r.end for r in self.regions), default=0)


@dataclass(frozen=True)
class Plans:
    """The plan for each chip the station has firmware for: the worker picks one by the
    chip it finds on the board. One plan is the single-product line of old."""

    by_chip: Mapping[str, Plan]

    def __post_init__(self) -> None:
        if not self.by_chip:
            raise ValueError("a station needs at least one plan")

    @classmethod
    def one(cls, plan: Plan) -> Plans:
        return cls({plan.chip: plan})

    @property
    def any(self) -> Plan:
        """One of the plans, for what they share (station name, thing names)."""
        return next(iter(self.by_chip.values()))

    @property
    def station(self) -> str:
        return self.any.station

    @property
    def firmware_hash(self) -> str:
        """Known before the board is: with one firmware only (else set at identify)."""
        plans = list(self.by_chip.values())
        return plans[0].firmware_hash if len(plans) == 1 else ""

    def pick(self, chip: str) -> Plan:
        """The plan for `chip`; a board no firmware is for fails before any write."""
        plan = self.by_chip.get(chip)
        if plan is None:
            raise WrongChipError(chip, tuple(self.by_chip))
        return plan


def build_plan(config: Config, bundle: FirmwareBundle,
               credentials: CredentialsMaker | None) -> Plan:
    """The per-board recipe; the credentials partition is located once, from the table.
    `credentials`: how credentials become that partition; None when the registrar makes
    none (kind "none")."""
    credentials_region: Callable[[DeviceCredentials, bytes | None], Region] | None = None
    board = config.credentials_for(bundle.chip)
    at: tuple[int, int] | None = None
    if credentials is not None:
        image = credentials(board, bundle.chip)
        part = credentials_partition(config, bundle)
        at = (part.offset, part.size)
        namespace = config.credentials.namespace

        def credentials_region(creds: DeviceCredentials, nvs_keys: bytes | None) -> Region:
            return image(creds, part.offset, part.size, namespace, nvs_keys)

    def thing_name(identity: BoardIdentity) -> str:
        return config.identity.thing_for(identity.mac, identity.chip, config.station.name)

    verify = config.verify
    boot = None if verify.boot == "off" else \
        BootCheck.for_bundle(bundle, verify.boot, verify.marker, verify.boot_timeout)
    _, app = app_of(bundle)
    return Plan(chip=bundle.chip, regions=bundle.regions,
                firmware_hash=bundle.sha256, station=config.station.name,
                thing_name=thing_name, credentials_region=credentials_region, boot=boot,
                app_version=app.version if app else "", credentials_at=at,
                ds_block=board.efuse_key_block if board.ds and at else None,
                credentials_format=board.format if at else "")


def credentials_partition(config: Config, bundle: FirmwareBundle) -> Partition:
    """The partition of `bundle`'s table that gets its boards' credentials; a table
    without it (or one too small for esp_secure_cert) is refused naming the fix."""
    board = config.credentials_for(bundle.chip)
    label = config.partition_for(bundle.chip)
    own = next((f for f in config.firmwares if f.chip == bundle.chip
                and f.credentials is not None), None)
    key = f"{own.key}.credentials.format" if own else (
        "credentials.format" if board.format == "esp_secure_cert" else "credentials.partition")
    which = "" if len(config.firmwares) == 1 else f" in the {bundle.chip} firmware"
    try:
        part = bundle.partition(label)
    except FirmwareError as e:
        fix = "" if board.format == "nvs" else (
            f"; add the row \"{SECURE_CERT_ROW}\" to the build's partitions.csv (as "
            "esp_secure_cert_mgr's examples do) and rebuild, or set format = \"nvs\"")
        raise FirmwareError(str(config.path), key, e.reason + which + fix) from None
    if board.format == "esp_secure_cert" and part.size < SECURE_CERT_MIN:
        raise FirmwareError(str(config.path), key, f"the esp_secure_cert partition{which} is "
                            f"0x{part.size:x} bytes; esp-secure-cert-tool writes 0x"
                            f"{SECURE_CERT_MIN:x}: make it at least that in partitions.csv")
    return part


def load_bundles(config: Config) -> tuple[FirmwareBundle, ...]:
    """Every firmware of the station, each validated as a single one is."""
    return tuple(load_firmware(section) for section in config.firmwares)


def firmware_warnings(config: Config, bundles: Sequence[FirmwareBundle]) -> list[str]:
    """[firmware] image_checks = "warn": each image problem once, and, with no boot check,
    that nothing on the line will catch them."""
    lines = [line for bundle in bundles for line in bundle.warnings]
    if lines and config.verify.boot == "off":
        lines.append(f"{config.path}: verify.boot: \"off\": boards get these images and end "
                     "done without proof that they boot; set [verify] boot = \"app\"")
    return lines


def build_plans(config: Config, bundles: Sequence[FirmwareBundle],
                credentials: CredentialsMaker | None) -> Plans:
    """One plan per chip: the worker picks the board's by the chip it finds."""
    return Plans({b.chip: build_plan(config, b, credentials) for b in bundles})
