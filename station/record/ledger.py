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

This module is the journal's machinery (the thread, the connection, the commits); the SQL
it runs is _tables.py's (jobs, events, registrations) and _slots.py's (slot flags, runs),
and its exports are export.py's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from station.errors import LedgerError, LedgerLockedError
from station.events import (
    Event,
    Progress,
    RegistrationStep,
    RegistryStep,
    SlotFlagged,
    Throttled,
)
from station.record import _tables as tables
from station.record._slots import all_flags, close_flag, open_flags, run_started, run_stopped
from station.record.export import export_csv, export_row, table

log = logging.getLogger("station.ledger")

T = TypeVar("T")
FILENAME = "ledger.sqlite3"
_BATCH = 256  # tasks committed together at most; bounds a transaction's size


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
            version = tables.schema_version(conn)
            if version is None:  # a new file (the other write an opening may do: migrate)
                conn.execute("BEGIN IMMEDIATE")
                for statement in tables.SCHEMA:
                    conn.execute(statement)
                tables.migrate(conn, 1)
                conn.execute("COMMIT")
            elif version < tables.SCHEMA_VERSION:  # an older station's ledger: add what it lacks
                conn.execute("BEGIN IMMEDIATE")
                tables.migrate(conn, version)
                conn.execute("COMMIT")
            elif version > tables.SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: written by a newer station (schema "
                                  f"{version} > {tables.SCHEMA_VERSION}); upgrade this station")
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
        await self._acall(lambda conn: tables.write_event(conn, event), write=True)

    def note(self, event: Event) -> None:
        """A display consumer: journal a Throttled event (notified, not emitted) without
        waiting for it, so the morning report can count the cloud's throttles."""
        if isinstance(event, Throttled):
            self._submit(lambda conn: tables.write_event(conn, event), write=True)

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
        return self._call(lambda conn: tables.close_interrupted(conn, reason, time.time()), True)

    def caught_in_first_boot(self, job_ids: list[str]) -> list[str]:
        """Slots and ports of interrupted jobs stopped during a board's first boot."""
        return self._call(lambda conn: tables.caught_in_first_boot(conn, job_ids))

    # -- reads ------------------------------------------------------------------------

    def done_with(self, mac: str, firmware_hash: str) -> bool:
        """The board was already flashed `done` with this firmware (skip unless --reflash)."""
        return self._call(lambda conn: tables.done_with(conn, mac, firmware_hash))

    async def done_with_async(self, mac: str, firmware_hash: str) -> bool:
        return await self._acall(lambda conn: tables.done_with(conn, mac, firmware_hash))

    async def security_journal_async(self, mac: str) -> list[dict[str, Any]]:
        """This station's security steps for one board, oldest first (station/security)."""
        return await self._acall(lambda conn: tables.security_journal(conn, mac))

    def registration_steps(self) -> list[RegistrationStep]:
        """Every registration breadcrumb in order, as events, for the registrar's reconcile."""
        return self._call(tables.registration_steps)

    async def registration_steps_async(self) -> list[RegistrationStep]:
        return await self._acall(tables.registration_steps)

    def registry_steps(self) -> list[RegistryStep]:
        """Every device registry step in order ([registry]), for its reconcile."""
        return self._call(tables.registry_steps)

    def jobs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs oldest first (the last `limit` of them); `timings` decoded to a dict."""
        return self._call(lambda conn: tables.jobs(conn, limit))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The journaled events of one job, in order (what happened to a board, and when)."""
        return self._call(lambda conn: tables.events(conn, job_id))

    def summary(self) -> dict[str, int]:
        """Counts by result: done, failed, removed, skipped, in_progress, total."""
        return self._call(tables.summary)

    def export(self, fmt: Literal["table", "csv", "json"]) -> str:
        """All jobs for `station ledger --format`: a rich table as text, CSV or JSON."""
        rows = [export_row(job) for job in self.jobs()]
        if fmt == "json":
            return json.dumps(rows, indent=2)
        if fmt == "csv":
            return export_csv(rows)
        if fmt == "table":
            return table(rows, self.summary())
        raise ValueError(f"unknown export format {fmt!r} (table, csv or json)")


