"""The ledger's tables and what it writes to them: jobs, events, registrations.

The schema and its migrations, how each event lands in the rows, and the queries the
ledger answers. Slot flags and station runs are _slots.py's. These functions run on the
ledger's writer thread (ledger.py), inside its transactions; they only know SQL.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from station.events import (
    BootChecked,
    CloudChecked,
    CredentialsOnBoard,
    Event,
    Identified,
    JobFinished,
    JobStarted,
    LineRate,
    Registered,
    RegistrationStep,
    RegistryStep,
    SecurityStep,
    SlotCleared,
    SlotFlagged,
    Stage,
)
from station.record._slots import SCHEMA_2, write_slot_event
from station.record.eventlog import event_fields

SCHEMA_VERSION = 7  # 2: slot_flags and runs (_slots.py); 3: line rates;
# 4: the boot check (flash/bootcheck.py); 5: the device registry and the cloud check;
# 6: the security journal (station/security); 7: the credentials' format and key block

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY, station TEXT, port TEXT, slot TEXT, mac TEXT, chip TEXT,
        thing_name TEXT, firmware_hash TEXT, registrar TEXT, certificate_id TEXT,
        stage TEXT, result TEXT, failed_stage TEXT, error TEXT,
        started_at REAL, finished_at REAL, timings TEXT)""",
    "CREATE INDEX IF NOT EXISTS jobs_mac ON jobs (mac, firmware_hash, result)",
    "CREATE INDEX IF NOT EXISTS jobs_open ON jobs (result) WHERE result IS NULL",
    """CREATE TABLE IF NOT EXISTS events (
        job_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL, stage TEXT,
        attempt INTEGER, detail TEXT)""",
    "CREATE INDEX IF NOT EXISTS events_job ON events (job_id)",
    """CREATE TABLE IF NOT EXISTS registrations (
        job_id TEXT NOT NULL, port TEXT, slot TEXT, at REAL NOT NULL, mac TEXT NOT NULL,
        thing_name TEXT NOT NULL, step TEXT NOT NULL, certificate_id TEXT,
        certificate_arn TEXT)""",
)
# Schema changes since version 1, applied in order to older ledgers when they are opened
# (and to a new one after SCHEMA): tables and columns are only ever added, so the rows
# of an older station stay as they are.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: SCHEMA_2,  # slot flags and station runs (_slots.py)
    # the line rate a board ran at, and every step down the ladder (ports/baud.py)
    3: ("ALTER TABLE jobs ADD COLUMN baud INTEGER",
        "ALTER TABLE jobs ADD COLUMN baud_steps TEXT"),
    # [verify] boot: the verdict, what the board said it runs, its last console lines
    4: ("ALTER TABLE jobs ADD COLUMN boot TEXT",
        "ALTER TABLE jobs ADD COLUMN booted_project TEXT",
        "ALTER TABLE jobs ADD COLUMN booted_version TEXT",
        "ALTER TABLE jobs ADD COLUMN boot_log TEXT"),
    # [registry]: each request journaled before it leaves and after its answer
    # (identity/registry.py); the job's outcome and the registry's id; [verify] cloud
    5: ("""CREATE TABLE IF NOT EXISTS registry_steps (
            job_id TEXT NOT NULL, port TEXT, slot TEXT, at REAL NOT NULL, mac TEXT NOT NULL,
            thing_name TEXT NOT NULL, step TEXT NOT NULL, method TEXT, url TEXT, body TEXT,
            device_id TEXT, status INTEGER, detail TEXT)""",
        "CREATE INDEX IF NOT EXISTS registry_steps_thing ON registry_steps (thing_name)",
        "ALTER TABLE jobs ADD COLUMN registry TEXT",
        "ALTER TABLE jobs ADD COLUMN registry_id TEXT",
        "ALTER TABLE jobs ADD COLUMN cloud TEXT",
        "ALTER TABLE jobs ADD COLUMN cloud_detail TEXT"),
    # [security]: each eFuse batch before and after; the board's state on its job row
    6: ("""CREATE TABLE IF NOT EXISTS security (
            job_id TEXT NOT NULL, at REAL NOT NULL, mac TEXT NOT NULL, step TEXT NOT NULL,
            phase TEXT NOT NULL, fingerprint TEXT, digest TEXT, detail TEXT)""",
        "CREATE INDEX IF NOT EXISTS security_mac ON security (mac)",
        "ALTER TABLE jobs ADD COLUMN security TEXT",
        "ALTER TABLE jobs ADD COLUMN key_fingerprint TEXT",
        "ALTER TABLE jobs ADD COLUMN signing_digest TEXT",
        "ALTER TABLE jobs ADD COLUMN efuses TEXT",
        "ALTER TABLE jobs ADD COLUMN lockdown INTEGER"),
    # [credentials]: the format the board's credentials are in, and with ds = true the
    # eFuse key block of its HMAC key (a CredentialsOnBoard event, once verified)
    7: ("ALTER TABLE jobs ADD COLUMN credentials TEXT",
        "ALTER TABLE jobs ADD COLUMN efuse_key_block TEXT"),
}


def schema_version(conn: sqlite3.Connection) -> int | None:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
        version: int | None = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        return version
    return None


def migrate(conn: sqlite3.Connection, version: int) -> None:
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS.get(step, ()):
            conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))


def _line_rate_note(event: LineRate) -> str | None:
    """One entry of a job's baud_steps: a step down, or a start at the slot's lower rate."""
    if event.stepped_from is not None:
        return f"{event.stepped_from}->{event.baud}: {event.reason or 'line failed'}"
    if event.remembered:
        return f"started at {event.baud}: {event.reason or 'the slot stepped down before'}"
    return None


def write_event(conn: sqlite3.Connection, event: Event) -> None:
    if isinstance(event, SlotFlagged | SlotCleared):  # about a slot, not a job
        write_slot_event(conn, event)
        return
    fields = event_fields(event)
    stage = fields.pop("stage", None)
    attempt = fields.pop("attempt", None)
    for key in ("job_id", "port", "slot", "at"):
        fields.pop(key)
    conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                  (event.job_id, event.at, type(event).__name__, stage, attempt,
                   json.dumps(fields, sort_keys=True) if fields else None))
    if not isinstance(event, RegistrationStep | RegistryStep | JobStarted):
        # A job row even if its JobStarted was never recorded: no final result is lost.
        conn.execute("INSERT INTO jobs (job_id, port, slot, stage, started_at) VALUES "
                     "(?, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
                     (event.job_id, event.port, event.slot, Stage.CONNECT.value, event.at))
    if isinstance(event, JobStarted):
        conn.execute(
            """INSERT INTO jobs (job_id, station, port, slot, firmware_hash, stage, started_at)
               VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET
               station = excluded.station, port = excluded.port, slot = excluded.slot,
               firmware_hash = excluded.firmware_hash, started_at = excluded.started_at""",
            (event.job_id, event.station, event.port, event.slot, event.firmware_hash,
             Stage.CONNECT.value, event.at))
    elif isinstance(event, Identified):
        # With several firmwares, the one picked for this chip is known only now.
        conn.execute("UPDATE jobs SET mac = ?, chip = ?, thing_name = ?, "
                     "firmware_hash = COALESCE(?, firmware_hash) WHERE job_id = ?",
                     (event.mac, event.chip, event.thing_name, event.firmware_hash,
                      event.job_id))
    elif isinstance(event, Registered):
        conn.execute("UPDATE jobs SET thing_name = ?, certificate_id = ?, registrar = ? "
                     "WHERE job_id = ?",
                     (event.thing_name, event.certificate_id, event.registrar, event.job_id))
    elif isinstance(event, RegistrationStep):
        conn.execute("INSERT INTO registrations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (event.job_id, event.port, event.slot, event.at, event.mac,
                      event.thing_name, event.step, event.certificate_id,
                      event.certificate_arn))
        # The job shows its certificate from the moment it exists, not only once done.
        conn.execute("UPDATE jobs SET certificate_id = coalesce(?, certificate_id) "
                     "WHERE job_id = ?", (event.certificate_id, event.job_id))
    elif isinstance(event, RegistryStep):
        _write_registry_step(conn, event)
    elif isinstance(event, CloudChecked):
        conn.execute("UPDATE jobs SET cloud = ?, cloud_detail = ? WHERE job_id = ?",
                     (event.result, event.detail or None, event.job_id))
    elif isinstance(event, JobFinished):
        conn.execute(
            """UPDATE jobs SET result = ?, error = ?, failed_stage = ?, finished_at = ?,
               timings = ?, stage = ? WHERE job_id = ?""",
            (event.result.value, event.error,
             event.failed_stage.value if event.failed_stage else None, event.at,
             json.dumps(event.timings), event.result.value, event.job_id))
    elif isinstance(event, BootChecked):
        conn.execute("UPDATE jobs SET boot = ?, booted_project = ?, booted_version = ?, "
                     "boot_log = ? WHERE job_id = ?",
                     (event.result, event.project, event.version, event.tail, event.job_id))
    elif isinstance(event, SecurityStep):
        write_security_step(conn, event)
    elif isinstance(event, CredentialsOnBoard):
        conn.execute("UPDATE jobs SET credentials = ?, efuse_key_block = ? WHERE job_id = ?",
                     (event.format, event.key_block, event.job_id))
    elif isinstance(event, LineRate):
        note = _line_rate_note(event)
        conn.execute("UPDATE jobs SET baud = ?, baud_steps = CASE WHEN ? IS NULL THEN "
                     "baud_steps ELSE coalesce(baud_steps || '; ', '') || ? END "
                     "WHERE job_id = ?", (event.baud, note, note, event.job_id))
    elif stage is not None:  # StageChanged, Retrying: where the job is now
        conn.execute("UPDATE jobs SET stage = ? WHERE job_id = ? AND result IS NULL",
                     (stage, event.job_id))


def _write_registry_step(conn: sqlite3.Connection, event: RegistryStep) -> None:
    """The step, and the outcome on its job's row (an "already" answer without an id
    keeps the id the registry gave this thing before). A reconcile's outcome also lands
    on the interrupted jobs that left the request pending."""
    conn.execute("INSERT INTO registry_steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (event.job_id, event.port, event.slot, event.at, event.mac,
                  event.thing_name, event.step, event.method, event.url, event.body,
                  event.device_id, event.status, event.detail or None))
    known = None
    if event.step in ("registered", "already"):
        row = conn.execute("SELECT device_id FROM registry_steps WHERE thing_name = ? AND "
                           "device_id IS NOT NULL ORDER BY rowid DESC LIMIT 1",
                           (event.thing_name,)).fetchone()
        known = row[0] if row else None
    conn.execute("UPDATE jobs SET registry = ?, registry_id = coalesce(?, registry_id) "
                 "WHERE job_id = ?", (event.step, known, event.job_id))
    if event.job_id == "reconcile":
        conn.execute("UPDATE jobs SET registry = ?, registry_id = coalesce(?, registry_id) "
                     "WHERE thing_name = ? AND registry = 'pending'",
                     (event.step, known, event.thing_name))


def registry_steps(conn: sqlite3.Connection) -> list[RegistryStep]:
    rows = conn.execute("SELECT job_id, port, slot, at, mac, thing_name, step, method, url, "
                        "body, device_id, status, detail FROM registry_steps ORDER BY rowid")
    return [RegistryStep(job_id=r[0], port=r[1] or "", slot=r[2] or "", at=r[3], mac=r[4],
                         thing_name=r[5], step=r[6], method=r[7] or "", url=r[8] or "",
                         body=r[9] or "", device_id=r[10], status=r[11], detail=r[12] or "")
            for r in rows]


def write_security_step(conn: sqlite3.Connection, event: SecurityStep) -> None:
    """The journal line, and the job row's security state: mode, key fingerprint,
    digest, the batches done (and the one under way or failed), lock-down done."""
    conn.execute("INSERT INTO security VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (event.job_id, event.at, event.mac, event.step, event.phase,
                  event.fingerprint, event.digest, event.detail))
    note = f"{event.step} {event.phase}" if event.phase != "after" else event.step
    if event.step == "ds_key":  # [credentials] ds: its HMAC key is not [security]'s key
        conn.execute("UPDATE jobs SET efuses = CASE WHEN efuses IS NULL OR efuses = '' THEN ? "
                     "ELSE efuses || ', ' || ? END WHERE job_id = ?",
                     (note, note, event.job_id))
        return
    conn.execute(
        "UPDATE jobs SET security = ?, key_fingerprint = coalesce(?, key_fingerprint), "
        "signing_digest = coalesce(?, signing_digest), efuses = CASE WHEN efuses IS NULL "
        "OR efuses = '' THEN ? ELSE efuses || ', ' || ? END, lockdown = CASE WHEN ? "
        "THEN 1 ELSE coalesce(lockdown, 0) END WHERE job_id = ?",
        (event.mode, event.fingerprint, event.digest, note, note,
         event.step == "lockdown" and event.phase == "after", event.job_id))


def security_journal(conn: sqlite3.Connection, mac: str) -> list[dict[str, Any]]:
    """Every security step this station journaled for `mac`, oldest first."""
    return _dicts(conn.execute("SELECT * FROM security WHERE mac = ? ORDER BY rowid", (mac,)))


def close_interrupted(conn: sqlite3.Connection, reason: str, now: float) -> list[str]:
    open_jobs = conn.execute(
        "SELECT job_id, stage FROM jobs WHERE result IS NULL ORDER BY started_at").fetchall()
    for job_id, stage in open_jobs:
        stage = stage or Stage.CONNECT.value
        error = f"station stopped during {stage}: {reason}"
        conn.execute("UPDATE jobs SET result = ?, failed_stage = ?, error = ?, "
                     "finished_at = ? WHERE job_id = ?",
                     (Stage.FAILED.value, stage, error, now, job_id))
        conn.execute("INSERT INTO events VALUES (?, ?, 'Interrupted', ?, NULL, ?)",
                     (job_id, now, stage, json.dumps({"error": error})))
    return [job_id for job_id, _ in open_jobs]


def caught_in_first_boot(conn: sqlite3.Connection, job_ids: list[str]) -> list[str]:
    """The slots and ports of `job_ids` whose last security line is ("first_boot",
    "before"): the station journals it right before the reset that starts a key =
    "device" board's first boot, and "after" once its boot check passed."""
    caught: list[str] = []
    for job_id in job_ids:
        last = conn.execute("SELECT step, phase FROM security WHERE job_id = ? ORDER BY "
                            "rowid DESC LIMIT 1", (job_id,)).fetchone()
        if last is not None and tuple(last) == ("first_boot", "before"):
            row = conn.execute("SELECT slot, port FROM jobs WHERE job_id = ?",
                               (job_id,)).fetchone()
            caught += [key for key in (row or ()) if key]
    return caught


def done_with(conn: sqlite3.Connection, mac: str, firmware_hash: str) -> bool:
    row = conn.execute("SELECT 1 FROM jobs WHERE mac = ? AND firmware_hash = ? AND "
                       "result = ? LIMIT 1", (mac, firmware_hash, Stage.DONE.value))
    return row.fetchone() is not None


def registration_steps(conn: sqlite3.Connection) -> list[RegistrationStep]:
    rows = conn.execute("SELECT job_id, port, slot, at, mac, thing_name, step, "
                        "certificate_id, certificate_arn FROM registrations ORDER BY rowid")
    return [RegistrationStep(job_id=r[0], port=r[1] or "", slot=r[2] or "", at=r[3], mac=r[4],
                             thing_name=r[5], step=r[6], certificate_id=r[7],
                             certificate_arn=r[8]) for r in rows]


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def jobs(conn: sqlite3.Connection, limit: int | None) -> list[dict[str, Any]]:
    rows = _dicts(conn.execute(
        "SELECT * FROM jobs ORDER BY started_at DESC, rowid DESC LIMIT ?",
        (-1 if limit is None else limit,)))
    rows.reverse()
    for row in rows:
        row["timings"] = json.loads(row["timings"]) if row["timings"] else {}
    return rows


def events(conn: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    rows = _dicts(conn.execute("SELECT * FROM events WHERE job_id = ? ORDER BY rowid",
                               (job_id,)))
    for row in rows:
        row["detail"] = json.loads(row["detail"]) if row["detail"] else {}
    return rows


def summary(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {stage.value: 0 for stage in (Stage.DONE, Stage.FAILED, Stage.REMOVED,
                                           Stage.SKIPPED)}
    counts["in_progress"] = 0
    for result, n in conn.execute("SELECT result, count(*) FROM jobs GROUP BY result"):
        counts[result or "in_progress"] = n
    counts["total"] = sum(counts.values())
    return counts
