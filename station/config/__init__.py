"""station.toml -> frozen, typed objects, checked before any board is touched.

    sections.py   the typed objects the rest of the station reads (`Config` and its sections)
    reader.py     `load`: every table read and checked; an error names file, key and reason
    registry.py   [registry] (a device registry over HTTP, the Bodh preset) and [verify] cloud
    ports.py      the [ports] section: globs, line rates, slots, hub hosts, slot health
    _table.py     one table's typed getters (reader.py and ports.py)
    folders.py    `writable_folder`: a configured folder proven writable (check, run)
    security.py   the [security] section: flash encryption, secure boot, lock-down
    cliargs.py    checked numbers for command-line options, as strict as the config's
    botocore_data.py  one botocore model loader per process (region check, IoT client)
"""

from station.config.cliargs import at_least, positive, seconds
from station.config.folders import writable_folder
from station.config.ports import HealthSection, PortsSection
from station.config.reader import load, load_record
from station.config.registry import CloudSection, Header, RegistrySection
from station.config.sections import (
    AWS_DEFAULT_TPS,
    CHIPS,
    SECURE_CERT_LABEL,
    STAGE_TIMEOUTS,
    AwsSection,
    BoardCredentials,
    Config,
    CredentialsSection,
    FirmwareSection,
    IdentitySection,
    ImageSpec,
    LedgerSection,
    LocalCaSection,
    MetricsSection,
    RecordConfig,
    RegistrarSection,
    StationSection,
    VerifySection,
    WorkerSection,
)
from station.config.security import SecuritySection

__all__ = [
    "AWS_DEFAULT_TPS", "CHIPS", "SECURE_CERT_LABEL", "STAGE_TIMEOUTS", "AwsSection",
    "BoardCredentials", "CloudSection", "Config",
    "CredentialsSection", "FirmwareSection", "HealthSection", "Header", "IdentitySection",
    "ImageSpec", "LedgerSection", "LocalCaSection", "MetricsSection", "PortsSection",
    "RecordConfig", "RegistrarSection", "RegistrySection", "SecuritySection",
    "StationSection", "VerifySection", "WorkerSection", "at_least", "load", "load_record",
    "positive", "seconds", "writable_folder",
]
