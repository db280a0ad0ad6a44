"""The ledger: a SQLite journal of every board job and its events.

Why it looks like this:
- Durability is the point. In the morning every plugged board must have a final row, even
  after SIGKILL or a power cut, so the database runs in WAL mode with `synchronous=FULL`
  (the WAL is fsynced at every commit). `NORMAL` survives a killed process but may lose the
  last commits on power loss, which is exactly the overnight failure we must survive.
- SQLite calls block, and the event loop must never wait on a disk, so ONE writer thread
  owns the ONE connection. Everything (writes and reads) is a task on its queue; tasks that
  queue up while a commit is in flight are committed together (group commit), so 16 boards
  emitting at once pay one fsync, not sixteen. `record` returns once its commit is done,
  which is what makes `EventSink.emit` durable.
- The station never deletes a ledger: a corrupt or locked file is a LedgerError that names
  the path and says what to do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import csv
import io
import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from station.errors import LedgerError, LedgerLockedError
from station.events import (
    BootChecked,
    Event,
    Identified,
    JobFinished,
    JobStarted,
    LineRate,
    Progress,
    Registered,
    RegistrationStep,
    SlotCleared,
    SlotFlagged,
    Stage,
    Throttled,
)
from station.record._slots import (
    SCHEMA_2,
    all_flags,
    close_flag,
    open_flags,
    run_started,
    run_stopped,
    write_slot_event,
)
from station.record.eventlog import event_fields, iso

log = logging.getLogger("station.ledger")

T = TypeVar("T")
SCHEMA_VERSION = 4  # 2: slot_flags and runs (station/ledgerslots.py); 3: line rates;
# 4: the boot check (station/bootcheck.py)
FILENAME = "ledger.sqlite3"
_BATCH = 256  # tasks committed together at most; bounds a transaction's size

_SCHEMA = (
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
# (and to a new one after _SCHEMA): tables and columns are only ever added, so the rows
# of an older station stay as they are.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: SCHEMA_2,  # slot flags and station runs (station/ledgerslots.py)
    # the line rate a board ran at, and every step down the ladder (station/baud.py)
    3: ("ALTER TABLE jobs ADD COLUMN baud INTEGER",
        "ALTER TABLE jobs ADD COLUMN baud_steps TEXT"),
    # [verify] boot: the verdict, what the board said it runs, its last console lines
    4: ("ALTER TABLE jobs ADD COLUMN boot TEXT",
        "ALTER TABLE jobs ADD COLUMN booted_project TEXT",
        "ALTER TABLE jobs ADD COLUMN booted_version TEXT",
        "ALTER TABLE jobs ADD COLUMN boot_log TEXT"),
}
EXPORT_COLUMNS = ("job_id", "slot", "port", "mac", "chip", "thing_name", "result",
                  "failed_stage", "error", "started", "finished", "seconds", "certificate_id",
                  "registrar", "firmware_hash", "station", "timings", "baud", "baud_steps",
                  "boot", "booted_project", "booted_version", "boot_log")


class _Task:
    __slots__ = ("fn", "future", "write")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], write: bool) -> None:
        self.fn = fn
        self.write = write
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class Ledger:
    """The journal of board jobs. Build it with `Ledger.open(state_dir)`; `close()` it."""

    def __init__(self, path: Path, busy_timeout: float, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed = False
        self._lock = threading.Lock()  # orders submits against close
        self._busy_timeout = busy_timeout
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)

    @classmethod
    def open(cls, state_dir: Path, *, busy_timeout: float = 5.0,
             synchronous: Literal["FULL", "NORMAL"] = "FULL") -> Ledger:
        """Open (or create) `state_dir/ledger.sqlite3`; LedgerError if it cannot be used.

        `synchronous="NORMAL"` is for benchmarks only: it may lose commits on power loss.
        """
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LedgerError(f"{state_dir}: cannot create the state directory "
                              f"({e.strerror}); check [station] state_dir and its "
                              "permissions") from e
        ledger = cls(state_dir / FILENAME, busy_timeout, synchronous)
        ledger._thread.start()
        try:
            ledger._started.result()
        except BaseException:
            ledger._thread.join()
            raise
        return ledger

    # -- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as e:
            self._started.set_exception(e)
            return
        self._started.set_result(None)
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < _BATCH:
                    try:
                        task = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if task is None:
                        stop = True
                        break
                    batch.append(task)
                self._commit(conn, batch)
        finally:
            conn.close()
            self._fail_pending()

    def _fail_pending(self) -> None:
        """If this thread ever dies, nobody may wait forever on a record it will not do."""
        with self._lock:
            self._closed = True
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                return
            if task is not None and task.future.set_running_or_notify_cancel():
                task.future.set_exception(LedgerError(f"{self.path}: the ledger is closed"))

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise self._error(e) from e
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")
            version = _schema_version(conn)
            if version is None:  # a new file (the other write an opening may do: migrate)
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                _migrate(conn, 1)
                conn.execute("COMMIT")
            elif version < SCHEMA_VERSION:  # an older station's ledger: add what it lacks
                conn.execute("BEGIN IMMEDIATE")
                _migrate(conn, version)
                conn.execute("COMMIT")
            elif version > SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: written by a newer station (schema "
                                  f"{version} > {SCHEMA_VERSION}); upgrade this station")
        except sqlite3.Error as e:
            conn.close()
            raise self._error(e) from e
        except BaseException:
            conn.close()
            raise
        return conn

    def _commit(self, conn: sqlite3.Connection, batch: list[_Task]) -> None:
        """Writes in one transaction (a savepoint each), resolved after COMMIT; then reads.

        Reads run outside any write transaction: in WAL they see a snapshot and take no
        write lock, so a long export never holds up the station's records.
        """
        batch = [t for t in batch if t.future.set_running_or_notify_cancel()]
        reads = [t for t in batch if not t.write]
        batch = [t for t in batch if t.write]
        if batch:
            self._write_batch(conn, batch)
        for task in reads:
            try:
                task.future.set_result(task.fn(conn))
            except sqlite3.Error as e:
                task.future.set_exception(self._error(e))
            except Exception as e:
                task.future.set_exception(e)

    def _write_batch(self, conn: sqlite3.Connection, batch: list[_Task]) -> None:
        outcomes: list[tuple[_Task, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for task in batch:
                conn.execute("SAVEPOINT task")
                try:
                    outcomes.append((task, task.fn(conn), None))
                except Exception as e:
                    conn.execute("ROLLBACK TO task")
                    outcomes.append((task, None, self._error(e) if isinstance(
                        e, sqlite3.Error) else e))
                conn.execute("RELEASE task")
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            error = self._error(e)
            # Every caller gets the error and reports it (the CLI on stderr, a worker in
            # its board's row); station.log keeps the moment without a second stderr line.
            log.info("commit failed: %s", error)
            for task in batch:
                task.future.set_exception(error)
            return
        for task, result, exc in outcomes:
            if exc is None:
                task.future.set_result(result)
            else:
                task.future.set_exception(exc)

    def _error(self, e: BaseException) -> LedgerError:
        text = str(e)
        if "locked" in text or "busy" in text:
            return LedgerLockedError(
                f"{self.path}: locked by another process ({text}); stop the other station "
                "or tool using it (e.g. an open sqlite3 shell), then start again")
        if "unable to open" in text or "readonly" in text or "disk I/O" in text:
            msg = (f"{self.path}: cannot be opened or written ({text}); check that "
                   f"{self.path.parent} exists, is writable by this user and has free space")
        elif "full" in text:
            msg = (f"{self.path}: the disk is full ({text}); free space on the disk holding "
                   f"{self.path.parent}; nothing committed is lost")
        elif "not a database" in text or "malformed" in text or "corrupt" in text:
            msg = (f"{self.path}: corrupt ({text}); move it aside together with its -wal "
                   f"and -shm files (e.g. mv {self.path} {self.path}.corrupt) and start "
                   "again; the station never deletes a ledger")
        else:
            msg = f"{self.path}: {text}"
        return LedgerError(msg)

    # -- submitting work ---------------------------------------------------------------

    def _submit(self, fn: Callable[[sqlite3.Connection], T],
                write: bool) -> concurrent.futures.Future[T]:
        task = _Task(fn, write)
        with self._lock:
            if self._closed:
                raise LedgerError(f"{self.path}: the ledger is closed")
            self._queue.put(task)
        return task.future

    def _call(self, fn: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        """Blocking: for the CLI, for start-up, and for `asyncio.to_thread`."""
        return self._submit(fn, write).result(timeout=120)

    async def _acall(self, fn: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        return await asyncio.wrap_future(self._submit(fn, write))

    def close(self) -> None:
        """Finish queued work, close the connection; idempotent."""
        with self._lock:
            if self._closed and not self._thread.is_alive():
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -----------------------------------------------------------------------

    async def record(self, event: Event) -> None:
        """Journal one event; returns once it is committed. Progress is not journaled."""
        if isinstance(event, Progress):
            return
        await self._acall(lambda conn: _write(conn, event), write=True)

    def note(self, event: Event) -> None:
        """A display consumer: journal a Throttled event (notified, not emitted) without
        waiting for it, so the morning report can count the cloud's throttles."""
        if isinstance(event, Throttled):
            self._submit(lambda conn: _write(conn, event), write=True)

    def clear_flag(self, slot: str, by: str) -> bool:
        """Clear `slot`'s open flag (`station slot clear`); False if it had none."""
        return self._call(lambda conn: close_flag(conn, slot, by, time.time()), True)

    def open_flags(self) -> list[SlotFlagged]:
        """The flags nobody has cleared yet, oldest first."""
        return self._call(open_flags)

    async def open_flags_async(self) -> list[SlotFlagged]:
        return await self._acall(open_flags)

    def flags(self) -> list[dict[str, Any]]:
        """Every flag ever raised, cleared or not, oldest first."""
        return self._call(all_flags)

    def run_started(self, station: str, pid: int) -> int:
        return self._call(lambda conn: run_started(conn, station, pid, time.time()), True)

    def run_stopped(self, run_id: int) -> None:
        self._call(lambda conn: run_stopped(conn, run_id, time.time()), True)

    def close_interrupted(self, reason: str) -> list[str]:
        """At start: give every job without a final result `failed`; returns their ids."""
        return self._call(lambda conn: _close_interrupted(conn, reason, time.time()), True)

    # -- reads ------------------------------------------------------------------------

    def done_with(self, mac: str, firmware_hash: str) -> bool:
        """The board was already flashed `done` with this firmware (skip unless --reflash)."""
        return self._call(lambda conn: _done_with(conn, mac, firmware_hash))

    async def done_with_async(self, mac: str, firmware_hash: str) -> bool:
        return await self._acall(lambda conn: _done_with(conn, mac, firmware_hash))

    def registration_steps(self) -> list[RegistrationStep]:
        """Every registration breadcrumb in order, as events, for the registrar's reconcile."""
        return self._call(_registration_steps)

    async def registration_steps_async(self) -> list[RegistrationStep]:
        return await self._acall(_registration_steps)

    def jobs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs oldest first (the last `limit` of them); `timings` decoded to a dict."""
        return self._call(lambda conn: _jobs(conn, limit))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The journaled events of one job, in order (what happened to a board, and when)."""
        return self._call(lambda conn: _events(conn, job_id))

    def summary(self) -> dict[str, int]:
        """Counts by result: done, failed, removed, skipped, in_progress, total."""
        return self._call(_summary)

    def export(self, fmt: Literal["table", "csv", "json"]) -> str:
        """All jobs for `station ledger --format`: a rich table as text, CSV or JSON."""
        rows = [export_row(job) for job in self.jobs()]
        if fmt == "json":
            return json.dumps(rows, indent=2)
        if fmt == "csv":
            return export_csv(rows)
        if fmt == "table":
            return _table(rows, self.summary())
        raise ValueError(f"unknown export format {fmt!r} (table, csv or json)")


def _schema_version(conn: sqlite3.Connection) -> int | None:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
        version: int | None = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        return version
    return None


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in _MIGRATIONS.get(step, ()):
            conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))


def _line_rate_note(event: LineRate) -> str | None:
    """One entry of a job's baud_steps: a step down, or a start at the slot's lower rate."""
    if event.stepped_from is not None:
        return f"{event.stepped_from}->{event.baud}: {event.reason or 'line failed'}"
    if event.remembered:
        return f"started at {event.baud}: {event.reason or 'the slot stepped down before'}"
    return None


def _write(conn: sqlite3.Connection, event: Event) -> None:
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
    if not isinstance(event, RegistrationStep | JobStarted):
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
    elif isinstance(event, LineRate):
        note = _line_rate_note(event)
        conn.execute("UPDATE jobs SET baud = ?, baud_steps = CASE WHEN ? IS NULL THEN "
                     "baud_steps ELSE coalesce(baud_steps || '; ', '') || ? END "
                     "WHERE job_id = ?", (event.baud, note, note, event.job_id))
    elif stage is not None:  # StageChanged, Retrying: where the job is now
        conn.execute("UPDATE jobs SET stage = ? WHERE job_id = ? AND result IS NULL",
                     (stage, event.job_id))


def _close_interrupted(conn: sqlite3.Connection, reason: str, now: float) -> list[str]:
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


def _done_with(conn: sqlite3.Connection, mac: str, firmware_hash: str) -> bool:
    row = conn.execute("SELECT 1 FROM jobs WHERE mac = ? AND firmware_hash = ? AND "
                       "result = ? LIMIT 1", (mac, firmware_hash, Stage.DONE.value))
    return row.fetchone() is not None


def _registration_steps(conn: sqlite3.Connection) -> list[RegistrationStep]:
    rows = conn.execute("SELECT job_id, port, slot, at, mac, thing_name, step, "
                        "certificate_id, certificate_arn FROM registrations ORDER BY rowid")
    return [RegistrationStep(job_id=r[0], port=r[1] or "", slot=r[2] or "", at=r[3], mac=r[4],
                             thing_name=r[5], step=r[6], certificate_id=r[7],
                             certificate_arn=r[8]) for r in rows]


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def _jobs(conn: sqlite3.Connection, limit: int | None) -> list[dict[str, Any]]:
    rows = _dicts(conn.execute(
        "SELECT * FROM jobs ORDER BY started_at DESC, rowid DESC LIMIT ?",
        (-1 if limit is None else limit,)))
    rows.reverse()
    for row in rows:
        row["timings"] = json.loads(row["timings"]) if row["timings"] else {}
    return rows


def _events(conn: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    rows = _dicts(conn.execute("SELECT * FROM events WHERE job_id = ? ORDER BY rowid",
                               (job_id,)))
    for row in rows:
        row["detail"] = json.loads(row["detail"]) if row["detail"] else {}
    return rows


def _summary(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {stage.value: 0 for stage in (Stage.DONE, Stage.FAILED, Stage.REMOVED,
                                           Stage.SKIPPED)}
    counts["in_progress"] = 0
    for result, n in conn.execute("SELECT result, count(*) FROM jobs GROUP BY result"):
        counts[result or "in_progress"] = n
    counts["total"] = sum(counts.values())
    return counts


def export_row(job: dict[str, Any]) -> dict[str, Any]:
    """A job as `station ledger` exports it (also the central ledger's, fleetview.py)."""
    seconds = None
    if job["started_at"] is not None and job["finished_at"] is not None:
        seconds = round(job["finished_at"] - job["started_at"], 1)
    row = {key: job.get(key) for key in EXPORT_COLUMNS}
    row.update(started=iso(job["started_at"]), finished=iso(job["finished_at"]),
               seconds=seconds, result=job["result"] or "in progress",
               timings=job["timings"] or {})
    return row


def export_csv(rows: list[dict[str, Any]]) -> str:
    """Exported rows as CSV; it has no nesting: seconds per stage as `connect=0.91 ...`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "timings": " ".join(f"{k}={v:.2f}" for k, v in
                                                row["timings"].items())} for row in rows)
    return out.getvalue()


def _table(rows: list[dict[str, Any]], summary: dict[str, int]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="station ledger", caption=", ".join(
        f"{k.replace('_', ' ')} {v}" for k, v in summary.items()))
    for column in ("slot", "port", "mac", "thing", "result", "error", "finished", "s"):
        table.add_column(column, overflow="fold")
    for r in rows:
        error = r["error"] or ""
        if r["failed_stage"] and r["result"] != Stage.DONE.value:
            error = f"at {r['failed_stage']}: {error}" if error else f"at {r['failed_stage']}"
        table.add_row(r["slot"], r["port"], r["mac"] or "", r["thing_name"] or "",
                      r["result"], error, r["finished"],
                      "" if r["seconds"] is None else f"{r['seconds']:.1f}")
    out = io.StringIO()
    width = max(100, shutil.get_terminal_size((160, 24)).columns)
    Console(file=out, width=width, color_system=None, force_terminal=False).print(table)
    return out.getvalue()
