"""The central ledger in PostgreSQL: its schema, its migrations, and the fleet's queries.

Why it looks like this:
- Many stations write one database, each through its own store-and-forward replicator
  (station/fleet/replicator.py). A row is keyed by (station, seq): `seq` is the local ledger's
  event number, so shipping the same events twice (after a crash between COMMIT and the
  next read) changes nothing, and `stations.shipped_seq`, written in the same
  transaction as the rows, is where PostgreSQL says a station is: the replicator resumes
  from it after an outage or a restart.
- `jobs` holds each job's latest state (the local row, upserted whole), `events` and
  `registrations` every step, so the MES can ask by MAC, thing, station, firmware hash
  or time with an index each (docs/central.md lists the queries).
- The station creates and migrates the schema (versioned in `station_schema`), under an
  advisory lock so two stations starting together do not race. A database whose schema
  is newer than this station is refused with one clear line: an old station must not
  write rows a newer schema means differently.
- libpq does the talking (psycopg 3): URL, service file, .pgpass and PGPASSWORD all work
  as everywhere else; a password is never in station.toml (config/reader.py refuses one).
- Connection errors are sorted in two: the server said no (wrong password, no such
  database or role: fatal at start, a person must act) or it could not be reached
  (buffer locally and retry: boards never wait on PostgreSQL).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from station.errors import CentralError, CentralUnreachableError
from station.parts import BoardHistory

SCHEMA_VERSION = 7  # 2: slot_flags and runs (station/fleet/_slots.py); 3: line rates;
# 4: the boot check (station/flash/bootcheck.py); 5: the device registry, the cloud check;
# 6: each board's security state (station/security); 7: its credentials' format and
# eFuse key block ([credentials], the local ledger's schema 7 columns)
LOCK_ID = 0x5747_4E01  # pg_advisory_xact_lock key for migrations ("STN" + 1)

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE stations (
            station text PRIMARY KEY,
            shipped_seq bigint NOT NULL DEFAULT 0,
            shipped_at timestamptz,
            host text)""",
        """CREATE TABLE jobs (
            station text NOT NULL, job_id text NOT NULL, seq bigint NOT NULL,
            port text, slot text, mac text, chip text, thing_name text, firmware_hash text,
            registrar text, certificate_id text, stage text, result text, failed_stage text,
            error text, started_at timestamptz, finished_at timestamptz, timings jsonb,
            PRIMARY KEY (station, job_id))""",
        "CREATE INDEX jobs_mac ON jobs (mac, finished_at)",
        "CREATE INDEX jobs_thing ON jobs (thing_name)",
        "CREATE INDEX jobs_firmware ON jobs (firmware_hash, finished_at)",
        "CREATE INDEX jobs_started ON jobs (started_at)",
        "CREATE INDEX jobs_station_started ON jobs (station, started_at)",
        "CREATE INDEX jobs_certificate ON jobs (certificate_id)",
        """CREATE TABLE events (
            station text NOT NULL, seq bigint NOT NULL, job_id text NOT NULL,
            at timestamptz NOT NULL, kind text NOT NULL, stage text, attempt integer,
            detail jsonb, PRIMARY KEY (station, seq))""",
        "CREATE INDEX events_job ON events (station, job_id)",
        "CREATE INDEX events_at ON events (at)",
        """CREATE TABLE registrations (
            station text NOT NULL, seq bigint NOT NULL, job_id text NOT NULL,
            at timestamptz NOT NULL, mac text, thing_name text, step text NOT NULL,
            certificate_id text, certificate_arn text, PRIMARY KEY (station, seq))""",
        "CREATE INDEX registrations_mac ON registrations (mac, at)",
        "CREATE INDEX registrations_certificate ON registrations (certificate_id)",
    ),
    2: (  # the local ledger's slot_flags and runs, keyed by the local rowid
        """CREATE TABLE slot_flags (
            station text NOT NULL, flag_id bigint NOT NULL, slot text NOT NULL, port text,
            job_id text, flagged_at timestamptz NOT NULL, stage text NOT NULL, reason text,
            hint text, parked boolean NOT NULL, cleared_at timestamptz, cleared_by text,
            PRIMARY KEY (station, flag_id))""",
        "CREATE INDEX slot_flags_at ON slot_flags (flagged_at)",
        """CREATE TABLE runs (
            station text NOT NULL, run_id bigint NOT NULL, pid integer,
            started_at timestamptz NOT NULL, stopped_at timestamptz,
            PRIMARY KEY (station, run_id))""",
    ),
    3: (  # the line rate each board ran at and its step-downs (station/ports/baud.py)
        "ALTER TABLE jobs ADD COLUMN baud integer",
        "ALTER TABLE jobs ADD COLUMN baud_steps text",
    ),
    4: (  # [verify] boot: the verdict, what the board said it runs, its last console lines
        "ALTER TABLE jobs ADD COLUMN boot text",
        "ALTER TABLE jobs ADD COLUMN booted_project text",
        "ALTER TABLE jobs ADD COLUMN booted_version text",
        "ALTER TABLE jobs ADD COLUMN boot_log text",
    ),
    5: (  # [registry]: the registry's answer and id; [verify] cloud: the broker's verdict
        "ALTER TABLE jobs ADD COLUMN registry text",
        "ALTER TABLE jobs ADD COLUMN registry_id text",
        "ALTER TABLE jobs ADD COLUMN cloud text",
        "ALTER TABLE jobs ADD COLUMN cloud_detail text",
        "CREATE INDEX jobs_registry_id ON jobs (registry_id)",
    ),
    6: (  # [security]: mode, the key's hash (never the key), the signing key's digest,
        # the eFuse batches done, lock-down done (the local ledger's schema 6 columns)
        "ALTER TABLE jobs ADD COLUMN security text",
        "ALTER TABLE jobs ADD COLUMN key_fingerprint text",
        "ALTER TABLE jobs ADD COLUMN signing_digest text",
        "ALTER TABLE jobs ADD COLUMN efuses text",
        "ALTER TABLE jobs ADD COLUMN lockdown integer",
        "CREATE INDEX jobs_key_fingerprint ON jobs (key_fingerprint)",
    ),
    7: (  # [credentials]: "nvs" or "esp_secure_cert"; with ds = true the HMAC key's block
        "ALTER TABLE jobs ADD COLUMN credentials text",
        "ALTER TABLE jobs ADD COLUMN efuse_key_block text",
    ),
}

JOB_COLUMNS = ("job_id", "port", "slot", "mac", "chip", "thing_name", "firmware_hash",
               "registrar", "certificate_id", "stage", "result", "failed_stage", "error",
               "started_at", "finished_at", "timings", "baud", "baud_steps", "boot",
               "booted_project", "booted_version", "boot_log", "registry", "registry_id",
               "cloud", "cloud_detail", "security", "key_fingerprint", "signing_digest",
               "efuses", "lockdown", "credentials", "efuse_key_block")
"""The local ledger's job columns that are shipped (station is the row's own key)."""


def describe(conninfo: str) -> str:
    """Where the central ledger is, for messages: host:port/db or the service name."""
    from psycopg.conninfo import conninfo_to_dict

    p = conninfo_to_dict(conninfo)
    if "service" in p:
        return f"service {p['service']}"
    host = p.get("host") or p.get("hostaddr") or "localhost"
    return f"{host}:{p.get('port', 5432)}/{p.get('dbname', p.get('user', ''))}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def connect(conninfo: str, timeout: float, *, application: str = "station") -> psycopg.Connection:
    """A connection, or CentralError (the server refused: fix something) or
    CentralUnreachableError (cannot reach it now: buffer and retry)."""
    where = describe(conninfo)
    try:
        return psycopg.connect(conninfo, connect_timeout=max(1, round(timeout)),
                               application_name=application, autocommit=False)
    except psycopg.Error as e:
        text = _one_line(str(e))
        if "FATAL:" in text or "no password supplied" in text or "SSL" in text:
            reason = text.split("FATAL:", 1)[-1].strip()
            hint = ""
            if "password" in reason:
                hint = ("; check PGPASSWORD, ~/.pgpass or the service file (passwords "
                        "never go in station.toml)")
            elif "does not exist" in reason:
                hint = "; create it, or fix [ledger] central"
            raise CentralError(f"[ledger] central {where}: {reason}{hint}") from None
        raise CentralUnreachableError(f"[ledger] central {where}: cannot reach PostgreSQL "
                                      f"({text.removeprefix('connection failed: ')})") from None


def as_error(e: psycopg.Error, where: str) -> CentralError:
    """A failure after connecting: a lost connection (buffer and retry) or the server
    refusing something (a person must act: privileges, a full disk, a foreign schema)."""
    text = _one_line(e.diag.message_primary or str(e))
    state = e.sqlstate or ""
    if not state or state.startswith(("08", "57P")):  # connection exception, shutdown
        return CentralUnreachableError(f"[ledger] central {where}: lost the connection "
                                       f"({text})")
    if state == "57014":  # statement_timeout, or cancelled at a stop
        return CentralUnreachableError(f"[ledger] central {where}: PostgreSQL did not "
                                       f"answer in time ({text})")
    hint = ""
    if state == "42501":
        hint = ("; the station's role needs CREATE on the database's public schema (e.g. "
                "make it the database's owner), or create the schema once as its owner")
    return CentralError(f"[ledger] central {where}: {text} (SQLSTATE {state}){hint}")


def migrate(conn: psycopg.Connection, station: str) -> int:
    """Create or upgrade the schema to SCHEMA_VERSION; returns the version found before.

    Raises CentralError if the database's schema is newer than this station knows."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        conn.execute("""CREATE TABLE IF NOT EXISTS station_schema (
            version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now(),
            applied_by text)""")
        row = conn.execute("SELECT max(version) FROM station_schema").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise CentralError(
                f"[ledger] central {describe_conn(conn)}: its schema is version {found}, "
                f"newer than this station's {SCHEMA_VERSION}; upgrade this station (it "
                "never writes to a schema it does not know)")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO station_schema (version, applied_by) VALUES (%s, %s)",
                         (version, station))
        conn.execute("INSERT INTO stations (station) VALUES (%s) ON CONFLICT DO NOTHING",
                     (station,))
    return found


def describe_conn(conn: psycopg.Connection) -> str:
    info = conn.info
    return f"{info.host}:{info.port}/{info.dbname}"


def shipped_seq(conn: psycopg.Connection, station: str) -> int:
    """Where PostgreSQL says this station is: the last local event number it holds."""
    with conn.transaction():
        row = conn.execute("SELECT shipped_seq FROM stations WHERE station = %s",
                           (station,)).fetchone()
    return int(row[0]) if row else 0


def ts(at: float | None) -> datetime | None:
    return None if at is None else datetime.fromtimestamp(at, UTC)


def epoch(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


@dataclass(frozen=True)
class Batch:
    """Local rows to ship: events in order (seq, job_id, at, kind, stage, attempt, detail)
    and the current job rows of the jobs they touch."""

    events: Sequence[tuple[int, str, float, str, str | None, int | None, str | None]]
    jobs: Sequence[dict[str, Any]]

    @property
    def last_seq(self) -> int:
        return self.events[-1][0]


def ship(conn: psycopg.Connection, station: str, batch: Batch) -> None:
    """One transaction: the events, the registrations among them, the jobs, the cursor.

    Idempotent: rows already there (keyed by station and seq) are left as they are; job
    rows are replaced by the newer local state; the cursor only moves forward."""
    last = batch.last_seq
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO events (station, seq, job_id, at, kind, stage, attempt, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [(station, seq, job, ts(at), kind, stage, attempt, detail)
             for seq, job, at, kind, stage, attempt, detail in batch.events])
        steps = []
        for seq, job, at, kind, _, _, detail in batch.events:
            if kind == "RegistrationStep" and detail:
                d = json.loads(detail)
                steps.append((station, seq, job, ts(at), d.get("mac"), d.get("thing_name"),
                              d.get("step"), d.get("certificate_id"),
                              d.get("certificate_arn")))
        if steps:
            cur.executemany(
                "INSERT INTO registrations (station, seq, job_id, at, mac, thing_name, step, "
                "certificate_id, certificate_arn) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                "%s) ON CONFLICT DO NOTHING", steps)
        if batch.jobs:
            names = ", ".join(JOB_COLUMNS)
            marks = ", ".join(["%s"] * (len(JOB_COLUMNS) + 2))
            updates = ", ".join(f"{c} = excluded.{c}" for c in ("seq", *JOB_COLUMNS))
            cur.executemany(
                f"INSERT INTO jobs (station, seq, {names}) VALUES ({marks}) "  # noqa: S608
                f"ON CONFLICT (station, job_id) DO UPDATE SET {updates} "
                "WHERE jobs.seq <= excluded.seq",
                [(station, last, *(_job_value(c, job[c]) for c in JOB_COLUMNS))
                 for job in batch.jobs])
        cur.execute("UPDATE stations SET shipped_seq = greatest(shipped_seq, %s), "
                    "shipped_at = now() WHERE station = %s", (last, station))
        if cur.rowcount == 0:
            cur.execute("INSERT INTO stations (station, shipped_seq, shipped_at) VALUES "
                        "(%s, %s, now())", (station, last))


def _job_value(column: str, value: Any) -> Any:
    if column in ("started_at", "finished_at"):
        return ts(value)
    return value  # timings: the local JSON text goes into jsonb as it is


# -- reading: the fleet view --------------------------------------------------------------


Format = Literal["table", "csv", "json"]
SINCE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """`24h`, `7d`, `90m` back from now, or an ISO date/time (UTC if no zone given)."""
    m = SINCE.match(text.strip())
    if m:
        return (now if now is not None else time.time()) - float(m[1]) * UNITS[m[2]]
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CentralError(f"--since {text!r}: give a duration (30m, 24h, 7d) or a date "
                           "(2026-11-27 or 2026-11-27T22:00)") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def _rows(conn: psycopg.Connection, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    conn.rollback()  # read-only: end the implicit transaction
    for row in rows:
        for key in ("started_at", "finished_at", "at"):
            if key in row:
                row[key] = epoch(row[key])
    return rows


def jobs(conn: psycopg.Connection, *, station: str | None = None,
         since: float | None = None) -> list[dict[str, Any]]:
    """Jobs of every station (or one), oldest first, as the local ledger's rows + station."""
    where: list[str] = ["true"]
    params: list[Any] = []
    if station:
        where.append("station = %s")
        params.append(station)
    if since is not None:
        where.append("started_at >= %s")
        params.append(ts(since))
    rows = _rows(conn, f"SELECT station, {', '.join(JOB_COLUMNS)} FROM jobs WHERE "  # noqa: S608
                 f"{' AND '.join(where)} ORDER BY started_at, station, job_id", params)
    for row in rows:
        row["timings"] = row["timings"] or {}
    return rows


def board(conn: psycopg.Connection, mac: str) -> dict[str, Any]:
    """One board's whole history: its jobs on every station and its registration steps."""
    job_rows = _rows(conn, f"SELECT station, {', '.join(JOB_COLUMNS)} FROM jobs "  # noqa: S608
                     "WHERE mac = %s ORDER BY started_at, station", (mac,))
    for row in job_rows:
        row["timings"] = row["timings"] or {}
    steps = _rows(conn, "SELECT station, job_id, at, thing_name, step, certificate_id FROM "
                  "registrations WHERE mac = %s ORDER BY at, station, seq", (mac,))
    return {"mac": mac, "jobs": job_rows, "registrations": steps}


def known_board(conn: psycopg.Connection, mac: str, station: str) -> BoardHistory | None:
    """The board's latest done job anywhere, if another station did it (else None)."""
    rows = _rows(conn, "SELECT station, finished_at, thing_name, certificate_id, "
                 "firmware_hash FROM jobs WHERE mac = %s AND result = 'done' ORDER BY "
                 "finished_at DESC LIMIT 1", (mac,))
    if not rows or rows[0]["station"] == station:
        return None
    r = rows[0]
    return BoardHistory(station=r["station"], finished_at=r["finished_at"],
                      thing_name=r["thing_name"], certificate_id=r["certificate_id"],
                      firmware_hash=r["firmware_hash"])


def stations(conn: psycopg.Connection) -> list[dict[str, Any]]:
    rows = _rows(conn, "SELECT station, shipped_seq, shipped_at FROM stations ORDER BY "
                 "station", ())
    for row in rows:
        row["shipped_at"] = epoch(row["shipped_at"])
    return rows


def normalise_mac(text: str) -> str:
    """`24:0A:C4:12:34:56`, `240ac4-123456` -> `240ac4123456`; CentralError otherwise."""
    mac = re.sub(r"[^0-9a-fA-F]", "", text).lower()
    if len(mac) != 12 or re.search(r"[^0-9a-fA-F:.\-\s]", text):
        raise CentralError(f"{text!r} is not a MAC address (12 hex digits, e.g. "
                           "24:0a:c4:12:34:56)")
    return mac
