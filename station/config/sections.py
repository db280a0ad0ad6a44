"""station.toml's sections as frozen, typed objects: what the rest of the station reads.

`reader.load` builds them and checks every value; nothing else makes a `Config` but
tests, which may build one section by section.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from station import chips
from station.config.ports import PortsSection
from station.config.registry import CloudSection, RegistrySection
from station.config.security import SecuritySection

CHIPS = chips.supported()  # every ESP32-family chip of the pinned esptool
Chip = str  # one of CHIPS: esptool's spelling, "esp32s3"
RegistrarKind = Literal["none", "aws-iot", "local-ca"]
KeySource = Literal["csr", "aws"]
OnKnownBoard = Literal["reflash", "skip", "fail"]
STAGE_TIMEOUTS = {
    "connect": 30.0,
    "identify": 15.0,
    "register": 180.0,
    "flash": 900.0,
    "verify": 120.0,
    "secure": 120.0,
    "reset": 15.0,
}
# AWS IoT Core's documented default quotas (requests per second) for the calls we make.
AWS_DEFAULT_TPS = {
    "CreateCertificateFromCsr": 15.0,
    "CreateKeysAndCertificate": 10.0,
    "AttachPolicy": 15.0,
    "CreateThing": 15.0,
    "DescribeThing": 350.0,
    "AttachThingPrincipal": 15.0,
    "DetachThingPrincipal": 15.0,
    "ListThingPrincipals": 10.0,
    "AddThingToThingGroup": 60.0,
    "UpdateCertificate": 10.0,
    "DeleteCertificate": 10.0,
    "DescribeCertificate": 10.0,
    "DetachPolicy": 15.0,
    "UpdateThing": 15.0,
    "DescribeEndpoint": 10.0,
    "GetPolicy": 15.0,
    "CreatePolicy": 10.0,
    "DescribeThingGroup": 100.0,
    "CreateThingGroup": 25.0,
    "DescribeThingType": 100.0,
    "CreateThingType": 15.0,
}


@dataclass(frozen=True)
class StationSection:
    name: str = "station"
    state_dir: Path = Path("state")
    max_parallel: int = 16


@dataclass(frozen=True)
class ImageSpec:
    offset: int
    file: Path


@dataclass(frozen=True)
class FirmwareSection:
    chip: Chip
    flasher_args: Path | None
    images: tuple[ImageSpec, ...]
    key: str = "firmware"  # "firmware[1]" for the second [[firmware]] entry, for messages
    image_checks: Literal["refuse", "warn"] = "refuse"
    """A bad image's content: refused at start, or a warning and flashed as given
    (station/flash/firmware.py); what cannot be flashed is refused either way."""
    credentials: BoardCredentials | None = None
    """This chip's own credentials format on a mixed line; None: [credentials]'."""


@dataclass(frozen=True)
class IdentitySection:
    thing_name: str = "{mac}"
    on_known_board: OnKnownBoard = "reflash"
    """What to do with a board the central ledger has done by another station."""

    def thing_for(self, mac: str, chip: str, station: str) -> str:
        return self.thing_name.format(mac=mac, MAC=mac.upper(), chip=chip, station=station)


@dataclass(frozen=True)
class WorkerSection:
    retries: int = 2
    retry_delay: float = 1.0
    timeouts: Mapping[str, float] = field(default_factory=lambda: dict(STAGE_TIMEOUTS))
    drain_timeout: float = 120.0


@dataclass(frozen=True)
class AwsSection:
    region: str = "eu-west-1"
    endpoint_url: str = ""
    profile: str = ""
    policy_name: str = "station-device"
    policy_document: Path = Path("config/aws-iot-policy.json")
    thing_type: str = ""
    thing_group: str = ""
    key_source: KeySource = "csr"
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = 10
    tps: Mapping[str, float] = field(default_factory=lambda: dict(AWS_DEFAULT_TPS))


@dataclass(frozen=True)
class LocalCaSection:
    dir: Path = Path("state/ca")
    endpoint: str = "localhost:8883"
    validity_days: int = 3650


@dataclass(frozen=True)
class RegistrarSection:
    kind: RegistrarKind = "none"
    aws: AwsSection = field(default_factory=AwsSection)
    local_ca: LocalCaSection = field(default_factory=LocalCaSection)


CredentialsFormat = Literal["nvs", "esp_secure_cert"]
SECURE_CERT_LABEL = "esp_secure_cert"
"""The label esp_secure_cert_mgr finds its partition by (ESP_SECURE_CERT_PARTITION_NAME)."""
KEY_BLOCKS = tuple(f"BLOCK_KEY{i}" for i in range(6))


@dataclass(frozen=True)
class BoardCredentials:
    """How one chip's boards hold their credentials: [credentials], or a [[firmware]]
    entry's `credentials = { ... }` on a mixed line."""

    format: CredentialsFormat = "nvs"
    ds: bool = False
    """esp_secure_cert only: the private key stored as Digital Signature ciphertext."""
    efuse_key_block: str = "BLOCK_KEY5"
    """With ds: the eFuse key block of the board's HMAC key (BLOCK_KEY5 holds no XTS key,
    so [security] never wants it for flash encryption)."""

    @property
    def key_id(self) -> int:
        """esp_secure_cert's efuse_key_id: BLOCK_KEYn -> n."""
        return int(self.efuse_key_block.removeprefix("BLOCK_KEY"))


@dataclass(frozen=True)
class CredentialsSection:
    out_dir: Path = Path("certs_out")
    partition: str = "nvs"
    namespace: str = "station"
    keep_private_keys: bool = True
    board: BoardCredentials = field(default_factory=BoardCredentials)
    """format, ds, efuse_key_block of every chip without its own in [[firmware]]."""


@dataclass(frozen=True)
class LedgerSection:
    central: str = ""
    """libpq URL or conninfo of the central PostgreSQL ("" = none); never a password."""
    batch: int = 500
    connect_timeout: float = 5.0


@dataclass(frozen=True)
class MetricsSection:
    listen: str = ""
    """host:port of the Prometheus endpoint ("" = none)."""

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class VerifySection:
    """[verify]: the boot check after the reset (station/flash/bootcheck.py) and the
    credentials' proof on the broker (station/identity/cloudcheck.py)."""

    boot: Literal["off", "rom", "app"] = "off"
    marker: str | None = None
    """A regex the app must print after its app_init lines (e.g. "SELFTEST: PASS")."""
    boot_timeout: float = 10.0
    cloud: CloudSection = field(default_factory=CloudSection)
    """[verify] cloud: the board's own MQTT session before it leaves (config/registry.py)."""


@dataclass(frozen=True)
class Config:
    path: Path
    station: StationSection
    ports: PortsSection
    firmware: FirmwareSection
    identity: IdentitySection
    worker: WorkerSection
    registrar: RegistrarSection
    credentials: CredentialsSection
    ledger: LedgerSection = field(default_factory=LedgerSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    verify: VerifySection = field(default_factory=VerifySection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    """[registry]: a device registry over HTTP, beside the registrar (config/registry.py)."""
    security: SecuritySection = field(default_factory=SecuritySection)
    firmwares: tuple[FirmwareSection, ...] = ()
    """One per chip with [[firmware]]; `firmware` is the first (the only one with a
    single [firmware] table)."""

    def __post_init__(self) -> None:
        if not self.firmwares:
            object.__setattr__(self, "firmwares", (self.firmware,))

    def credentials_for(self, chip: str) -> BoardCredentials:
        """How boards of `chip` hold their credentials."""
        for f in self.firmwares:
            if f.chip == chip and f.credentials is not None:
                return f.credentials
        return self.credentials.board

    def partition_for(self, chip: str) -> str:
        """The label of the partition that gets `chip`'s credentials."""
        if self.credentials_for(chip).format == "esp_secure_cert":
            return SECURE_CERT_LABEL
        return self.credentials.partition

    def slot_for(self, location: str | None, port: str) -> str:
        """The operator's label for a port: by USB location, then by path, else the name."""
        for key in (location, port):
            if key and key in self.ports.slots:
                return self.ports.slots[key]
        return location or Path(port).name


@dataclass(frozen=True)
class RecordConfig:
    """What the commands that only read the record (`ledger`, `report`, `slot`, `board`)
    need: where the record is. They run on a station whose build was replaced, or on a
    copy of station.toml in the office, so the firmware, the registrar and the ports are
    neither read nor checked."""

    path: Path
    station: StationSection
    ledger: LedgerSection
