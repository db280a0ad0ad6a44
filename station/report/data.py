"""The night report's one query layer: what a report needs from a ledger, and nothing more.

Why it looks like this:
- The report must work on the station's own SQLite ledger today and on the central
  PostgreSQL record of many stations later ("Many stations, one record"), without a second
  copy of its arithmetic. So the report asks a `ReportSource` for plain rows in a time
  window (jobs, slot flags, station runs, a count of cloud throttles) and does every sum,
  median and chart itself (station/report/stats.py). A central source implements these
  four small queries; everything above them is shared.
- The window selects jobs by when they *started*, flags by when they were raised and
  throttles by when they happened: each row belongs to exactly one window, so reports of
  consecutive nights add up.
- The SQLite source opens the ledger read-only (`mode=ro`), without the station's writer
  thread or lock: a report can be made while the station runs (WAL lets a reader see a
  consistent snapshot), and it can never change or create a ledger. A ledger of schema 1
  (before slot flags and runs) reads as having none.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from station.errors import LedgerError


@dataclass(frozen=True)
class Window:
    """[since, until) in seconds since the epoch; None is open. `station` filters by name."""

    since: float | None = None
    until: float | None = None
    station: str | None = None


@dataclass(frozen=True)
class JobRow:
    job_id: str
    station: str
    slot: str
    port: str
    mac: str | None  # None: the board failed before it was identified
    result: str | None  # done, failed, removed, skipped; None while in progress
    failed_stage: str | None
    error: str | None
    started_at: float
    finished_at: float | None
    timings: dict[str, float] = field(default_factory=dict)
    security: str | None = None  # [security]: the mode the board was locked in
    lockdown: bool = False  # [security]: the lock-down batch is burned


@dataclass(frozen=True)
class FlagRow:
    slot: str
    station: str
    flagged_at: float
    stage: str
    reason: str
    hint: str
    parked: bool
    cleared_at: float | None
    cleared_by: str | None


@dataclass(frozen=True)
class RunRow:
    station: str
    started_at: float
    stopped_at: float | None  # None: killed, crashed, or still running


class ReportSource(Protocol):
    """What a ledger (local SQLite, or central) gives the report."""

    def describe(self) -> str:
        """Where the rows come from, for the report's header (a path, a database)."""

    def jobs(self, window: Window) -> list[JobRow]:
        """Jobs that started in the window, oldest first."""

    def flags(self, window: Window) -> list[FlagRow]:
        """Slot flags raised in the window, oldest first."""

    def runs(self, window: Window) -> list[RunRow]:
        """Every station run of the window's station(s), oldest first (restarts are
        judged against the run before, which may be older than the window)."""

    def throttles(self, window: Window) -> int:
        """Times a board waited because the cloud throttled the station."""

    def checks(self, window: Window) -> dict[str, int]:
        """Outcomes of the device registry's requests and of the cloud checks, by name:
        "registry registered", "registry already", "registry failed", "cloud ok", ..."""


def _where(window: Window, time_column: str, station_column: str = "station",
           ) -> tuple[str, list[Any]]:
    clauses: list[str] = ["1"]
    params: list[Any] = []
    if window.since is not None:
        clauses.append(f"{time_column} >= ?")
        params.append(window.since)
    if window.until is not None:
        clauses.append(f"{time_column} < ?")
        params.append(window.until)
    if window.station is not None:
        clauses.append(f"{station_column} = ?")
        params.append(window.station)
    return " AND ".join(clauses), params


class SqliteLedgerSource:
    """The station's ledger.sqlite3, read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise LedgerError(f"{path}: no ledger here; has a station run with this "
                              "[station] state_dir? (check --config)")

    def describe(self) -> str:
        return str(self.path)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                   timeout=10)
        except sqlite3.Error as e:
            raise LedgerError(f"{self.path}: cannot be opened ({e})") from e
        try:
            yield conn
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):  # schema 1: no flags or runs recorded yet
                raise _NoTable() from e
            raise LedgerError(f"{self.path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path}: corrupt or not a ledger ({e})") from e
        finally:
            conn.close()

    def jobs(self, window: Window) -> list[JobRow]:
        where, params = _where(window, "started_at")
        with self._conn() as conn:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
            mac = "mac" if "mac" in columns else "NULL"  # a ledger from before MACs
            # a ledger from before schema 6 has no security columns
            security = "security, lockdown" if "security" in columns else "NULL, NULL"
            rows = conn.execute(
                "SELECT job_id, station, slot, port, result, failed_stage, error, started_at, "
                f"finished_at, timings, {mac}, {security} FROM jobs WHERE {where} "
                "ORDER BY started_at, rowid", params).fetchall()
        return [JobRow(job_id=r[0], station=r[1] or "", slot=r[2] or "", port=r[3] or "",
                       result=r[4], failed_stage=r[5], error=r[6], started_at=r[7],
                       finished_at=r[8], timings=json.loads(r[9]) if r[9] else {},
                       mac=r[10] or None, security=r[11] or None, lockdown=bool(r[12]))
                for r in rows]

    def flags(self, window: Window) -> list[FlagRow]:
        where, params = _where(window, "flagged_at")
        try:
            with self._conn() as conn:
                rows = conn.execute(
                    "SELECT slot, station, flagged_at, stage, reason, hint, parked, "
                    f"cleared_at, cleared_by FROM slot_flags WHERE {where} "
                    "ORDER BY flagged_at, rowid", params).fetchall()
        except _NoTable:
            return []
        return [FlagRow(slot=r[0], station=r[1] or "", flagged_at=r[2], stage=r[3],
                        reason=r[4] or "", hint=r[5] or "", parked=bool(r[6]),
                        cleared_at=r[7], cleared_by=r[8]) for r in rows]

    def runs(self, window: Window) -> list[RunRow]:
        where, params = _where(Window(station=window.station), "started_at")
        try:
            with self._conn() as conn:
                rows = conn.execute(f"SELECT station, started_at, stopped_at FROM runs "
                                    f"WHERE {where} ORDER BY started_at, rowid",
                                    params).fetchall()
        except _NoTable:
            return []
        return [RunRow(station=r[0] or "", started_at=r[1], stopped_at=r[2]) for r in rows]

    def throttles(self, window: Window) -> int:
        where, params = _where(window, "e.at", "j.station")
        with self._conn() as conn:
            row = conn.execute("SELECT count(*) FROM events e LEFT JOIN jobs j USING (job_id) "
                               f"WHERE e.kind = 'Throttled' AND {where}", params).fetchone()
        return int(row[0])


    def checks(self, window: Window) -> dict[str, int]:
        where, params = _where(window, "e.at", "j.station")
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT e.kind, coalesce(json_extract(e.detail, '$.step'), "
                "json_extract(e.detail, '$.result')), count(*) FROM events e LEFT JOIN jobs j "
                f"USING (job_id) WHERE e.kind IN ('RegistryStep', 'CloudChecked') AND {where} "
                "GROUP BY 1, 2", params).fetchall()
        return check_counts(rows)


CHECK_NAMES = {"RegistryStep": "registry", "CloudChecked": "cloud"}


def check_counts(rows: list[tuple[Any, ...]]) -> dict[str, int]:
    """(event kind, step or result, count) -> {"registry registered": n, ...}; a request's
    "pending" row is not an outcome."""
    return {f"{CHECK_NAMES[kind]} {what}": int(n) for kind, what, n in rows
            if what and what != "pending"}


class _NoTable(Exception):
    """A table of a newer schema is missing: the ledger predates it."""
