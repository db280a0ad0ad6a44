"""station.toml -> frozen, typed objects (sections.py), validated at start.

Everything a user can get wrong in the file fails here, before any board is touched,
with one line naming the file, the key and the reason. Unknown keys are errors too: a
misspelt key silently ignored is a rig that does something else overnight.
Relative paths are taken from the config file's folder, so the station can be started
from anywhere.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Literal, cast

from station import chips
from station.config._table import Table
from station.config.credentials import (
    board_credentials,
    check_credentials,
    credentials_section,
)
from station.config.ports import ports_section
from station.config.registry import cloud_section, registry_section
from station.config.sections import (
    AWS_DEFAULT_TPS,
    CHIPS,
    STAGE_TIMEOUTS,
    AwsSection,
    Config,
    FirmwareSection,
    IdentitySection,
    ImageSpec,
    KeySource,
    LedgerSection,
    LocalCaSection,
    MetricsSection,
    OnKnownBoard,
    RecordConfig,
    RegistrarKind,
    RegistrarSection,
    StationSection,
    VerifySection,
    WorkerSection,
)
from station.config.security import security_section
from station.errors import ConfigError


def _read(path: str | Path) -> Table:
    file = Path(path)
    try:
        with file.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(file), None, "no such file (pass --config PATH)") from None
    except PermissionError:
        raise ConfigError(str(file), None, "not readable (check its permissions)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(file), None, f"not valid TOML: {e}") from None
    return Table(file.resolve(), "", raw)


def load_record(path: str | Path) -> RecordConfig:
    """[station] and [ledger] of station.toml, validated; the other sections unread."""
    root = _read(path)
    return RecordConfig(path=root.file, station=_station(root.sub("station")),
                        ledger=_ledger(root.sub("ledger")))


def load(path: str | Path) -> Config:
    """Read and validate station.toml; raises ConfigError naming file, key and reason."""
    root = _read(path)
    firmwares = _firmwares(root)
    registrar = _registrar(root.sub("registrar"))
    registry = registry_section(root.sub("registry"))
    if "certificate_id" in registry.fields and registrar.kind == "none":
        raise ConfigError(str(root.file), "registry", "names {certificate_id}, but [registrar] "
                          "kind is \"none\": no certificate is made")
    credentials = credentials_section(root.sub("credentials"))
    check_credentials(root.file, credentials, firmwares, registrar,
                      "keep_private_keys" in root.data.get("credentials", {}))
    config = Config(
        path=root.file,
        station=_station(root.sub("station")),
        ports=ports_section(root.sub("ports")),
        firmware=firmwares[0],
        identity=_identity(root.sub("identity")),
        worker=_worker(root.sub("worker")),
        registrar=registrar,
        credentials=credentials,
        ledger=_ledger(root.sub("ledger")),
        metrics=_metrics(root.sub("metrics")),
        verify=_verify(root.sub("verify"), registrar.kind),
        registry=registry,
        security=security_section(root.sub("security")),
        firmwares=firmwares,
    )
    root.done()
    return config


def _station(t: Table) -> StationSection:
    name = t.get("name", str, "station")
    if not name.strip():
        raise t.error("name", "must not be empty")
    s = StationSection(
        name=name,
        state_dir=t.path("state_dir", Path("state")),
        max_parallel=t.integer("max_parallel", 16, minimum=1),
    )
    t.done()
    return s


def _verify(t: Table, registrar_kind: str) -> VerifySection:
    boot = t.get("boot", str, "off")
    if boot not in ("off", "rom", "app"):
        raise t.error("boot", f"must be \"off\", \"rom\" or \"app\", not {boot!r}")
    marker = t.get("marker", str, "") or None
    if marker is not None:
        try:
            re.compile(marker)
        except re.error as e:
            raise t.error("marker", f"{marker!r} is not a valid regex ({e})") from None
        if boot != "app":
            raise t.error("marker", "the app prints it: needs [verify] boot = \"app\"")
    v = VerifySection(boot=cast(Literal["off", "rom", "app"], boot), marker=marker,
                      boot_timeout=t.number("boot_timeout", 10.0, minimum=0.5),
                      cloud=cloud_section(t, registrar_kind))
    t.done()
    return v


def _firmwares(root: Table) -> tuple[FirmwareSection, ...]:
    """A single [firmware] table, or [[firmware]] entries: one per chip."""
    root.seen.add("firmware")
    entries = root.data.get("firmware")
    if not isinstance(entries, list):
        return (_firmware(root.sub("firmware")),)
    if not entries:
        raise root.error("firmware", "[[firmware]] needs at least one entry")
    found: dict[str, str] = {}
    sections = []
    for i, entry in enumerate(entries):
        section = _firmware(Table(root.file, f"firmware[{i}]", entry), prefix=f"firmware[{i}]")
        if section.chip in found:
            raise ConfigError(str(root.file), f"firmware[{i}].chip",
                              f"{section.chip} already has {found[section.chip]}: one "
                              "firmware per chip")
        found[section.chip] = f"firmware[{i}]"
        sections.append(section)
    return tuple(sections)


def _firmware(t: Table, prefix: str = "firmware") -> FirmwareSection:
    if "chip" not in t.data:
        raise t.error("chip", f"is required (one of {', '.join(CHIPS)})")
    chip = t.get("chip", str, "")
    reason = chips.unsupported_reason(chip)
    if reason:
        raise t.error("chip", reason)
    flasher_args: Path | None = None
    if "flasher_args" in t.data:
        flasher_args = t.path("flasher_args", Path())
        _must_be_readable(t, "flasher_args", flasher_args)
    images: list[ImageSpec] = []
    for i, entry in enumerate(t.get("images", list, [])):
        key = f"images[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"offset", "file"}:
            raise t.error(key, "must be { offset = 0x..., file = \"...\" }")
        if not isinstance(entry["offset"], int) or isinstance(entry["offset"], bool) \
                or entry["offset"] < 0:
            raise t.error(f"{key}.offset", f"must be a non-negative integer, not "
                                           f"{entry['offset']!r}")
        if not isinstance(entry["file"], str):
            raise t.error(f"{key}.file", f"must be a path string, not {entry['file']!r}")
        file = t.resolve(entry["file"])
        _must_be_readable(t, f"{key}.file", file)
        images.append(ImageSpec(offset=entry["offset"], file=file))
    if flasher_args is None and not images:
        raise t.error("images", "name the firmware: flasher_args (an ESP-IDF build) or images")
    if flasher_args is not None and images:
        raise t.error("images", "give flasher_args or images, not both")
    image_checks = t.get("image_checks", str, "refuse")
    if image_checks not in ("refuse", "warn"):
        raise t.error("image_checks", f"must be \"refuse\" or \"warn\", not {image_checks!r}")
    own = None
    if "credentials" in t.data:
        sub = t.sub("credentials")
        own = board_credentials(sub)
        sub.done()
    if own is not None and prefix == "firmware":
        raise t.error("credentials", "a single [firmware] takes [credentials] format, ds and "
                      "efuse_key_block; per-chip credentials are for [[firmware]] entries")
    f = FirmwareSection(chip=chip, flasher_args=flasher_args, images=tuple(images), key=prefix,
                        image_checks=cast(Literal["refuse", "warn"], image_checks),
                        credentials=own)
    t.done()
    return f


def _must_be_readable(t: Table, key: str, path: Path) -> None:
    if not path.is_file():
        raise t.error(key, f"{path}: no such file")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise t.error(key, f"{path}: cannot be read ({e.strerror})") from None


def _identity(t: Table) -> IdentitySection:
    template = t.get("thing_name", str, "{mac}")
    try:
        sample = template.format(mac="0", MAC="0", chip="esp32", station="s")
    except (KeyError, IndexError, ValueError) as e:
        raise t.error("thing_name", f"{template!r}: unknown placeholder {e} "
                                    "(use {mac}, {MAC}, {chip}, {station})") from None
    if "{mac}" not in template and "{MAC}" not in template:
        raise t.error("thing_name", "must contain {mac} so every board gets its own name")
    if not re.fullmatch(r"[a-zA-Z0-9:_-]+", sample):
        raise t.error("thing_name", f"{template!r}: AWS IoT thing names allow only "
                                    "letters, digits, ':', '_' and '-'")
    i = IdentitySection(thing_name=template, on_known_board=cast(OnKnownBoard, t.choice(
        "on_known_board", ("reflash", "skip", "fail"), "reflash")))
    t.done()
    return i


def _worker(t: Table) -> WorkerSection:
    timeouts = dict(STAGE_TIMEOUTS)
    table = t.sub("timeouts")
    for stage, default in STAGE_TIMEOUTS.items():
        timeouts[stage] = table.number(stage, default, minimum=0.1)
    table.done()
    w = WorkerSection(
        retries=t.integer("retries", 2),
        retry_delay=t.number("retry_delay", 1.0),
        timeouts=timeouts,
        drain_timeout=t.number("drain_timeout", 120.0),
    )
    t.done()
    return w


def _registrar(t: Table) -> RegistrarSection:
    kind = cast(RegistrarKind, t.choice("kind", ("none", "aws-iot", "local-ca"), "none"))
    a = t.sub("aws")
    tps = dict(AWS_DEFAULT_TPS)
    tps_table = a.sub("tps")
    for api, default in AWS_DEFAULT_TPS.items():
        tps[api] = tps_table.number(api, default, minimum=0.01)
    tps_table.done()
    aws = AwsSection(
        region=a.get("region", str, "eu-west-1"),
        endpoint_url=a.get("endpoint_url", str, ""),
        profile=a.get("profile", str, ""),
        policy_name=a.get("policy_name", str, "station-device"),
        policy_document=a.path("policy_document", Path("config/aws-iot-policy.json")),
        thing_type=a.get("thing_type", str, ""),
        thing_group=a.get("thing_group", str, ""),
        key_source=cast(KeySource, a.choice("key_source", ("csr", "aws"), "csr")),
        retry_mode=cast(Literal["standard", "adaptive"],
                        a.choice("retry_mode", ("standard", "adaptive"), "standard")),
        max_attempts=a.integer("max_attempts", 10, minimum=1),
        tps=tps,
    )
    for secret in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        if secret in a.data:
            raise a.error(secret, "secrets never go in station.toml: use the AWS "
                                  "credential chain (environment, ~/.aws, instance role) "
                                  "or a named profile")
    a.done()
    if kind == "aws-iot":
        _check_policy(a, aws.policy_document)
        if not aws.endpoint_url:
            _check_region(a, aws.region)
    c = t.sub("local_ca")
    local_ca = LocalCaSection(
        dir=c.path("dir", Path("state/ca")),
        endpoint=c.get("endpoint", str, "localhost:8883"),
        validity_days=c.integer("validity_days", 3650, minimum=1),
    )
    c.done()
    r = RegistrarSection(kind=kind, aws=aws, local_ca=local_ca)
    t.done()
    return r


def _check_policy(t: Table, path: Path) -> None:
    _must_be_readable(t, "policy_document", path)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise t.error("policy_document", f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "Statement" not in doc:
        raise t.error("policy_document", f"{path}: not an IAM policy (no Statement)")


def _check_region(t: Table, region: str) -> None:
    """A mistyped region would otherwise surface as a DNS failure after every retry (~25 s
    of silence, then "cannot reach iot.eu-wset-1..."); botocore knows IoT's regions."""
    import difflib

    from station.config.botocore_data import aws_session

    session = aws_session()  # its loader is the registrar client's too
    known = {r for partition in session.get_available_partitions()
             for r in session.get_available_regions("iot", partition_name=partition)}
    if not known or region in known:
        return
    close = difflib.get_close_matches(region, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise t.error("region", f"{region!r} is not an AWS region with IoT Core{hint} (a region "
                            "newer than this boto3 needs `pip install -U boto3`, or set "
                            "endpoint_url)")


# -- [ledger] and [metrics] (issue 12: central ledger, Prometheus) ------------------------

PASSWORD_HELP = ("passwords never go in station.toml: set PGPASSWORD in the station's "
                 "environment, or use ~/.pgpass or a libpq service file (service=NAME)")


def _ledger(t: Table) -> LedgerSection:
    central = t.get("central", str, "").strip()
    if central:
        _check_conninfo(t, central)
    section = LedgerSection(central=central, batch=t.integer("batch", 500, minimum=1),
                            connect_timeout=t.number("connect_timeout", 5.0, minimum=0.5))
    t.done()
    return section


def _check_conninfo(t: Table, central: str) -> None:
    """A libpq URL (postgresql://user@host:port/db) or conninfo (service=factory)."""
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    if "://" in central and not central.startswith(("postgresql://", "postgres://")):
        raise t.error("central", f"{central.split('://')[0]}:// is not PostgreSQL: use "
                                 "postgresql://user@host:port/database or service=NAME")
    try:
        params = conninfo_to_dict(central)
    except Error as e:
        raise t.error("central", f"not a PostgreSQL URL or conninfo: "
                                 f"{' '.join(str(e).split())}") from None
    if "password" in params or "sslpassword" in params:
        raise t.error("central", PASSWORD_HELP)
    port = str(params.get("port", "5432"))
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
        raise t.error("central", f"port {port!r} is not a TCP port number")
    if not params.get("host") and not params.get("service") and "hostaddr" not in params:
        raise t.error("central", "names no host (postgresql://user@HOST/database) or "
                                 "service (service=NAME)")


def _metrics(t: Table) -> MetricsSection:
    listen = t.get("listen", str, "").strip()
    section = MetricsSection(listen=listen)
    if listen:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise t.error("listen", f"{listen!r} is not host:port (e.g. \"127.0.0.1:9464\")")
    t.done()
    return section
