"""`station report --central`: the night report's rows from the central PostgreSQL ledger.

Why it looks like this:
- The report's arithmetic and pages are the local report's (station/report/stats.py,
  station/report/build.py); only the four queries of a ReportSource (station/report/data.py)
  differ. They read fleet/central.py's schema: jobs (each job's latest state), events (the
  Throttled events among them), and schema 2's slot_flags and runs, which the
  replicator ships beside the events (station/fleet/_slots.py). Rows come back in the
  local ledger's shape, times as seconds since the epoch.
- All four queries run in one read-only REPEATABLE READ transaction: stations keep
  shipping while the report is made, and its figures must agree with one another.
- It only reads: it never creates or migrates the schema. A database no station has
  shipped to yet is an empty ledger (a report that says so), and one of schema 1 (before
  flags and runs were shipped) reads as having none, like a local ledger of schema 1.
- Connection failures are fleet/central.py's one-line CentralError (refused) or
  CentralUnreachableError (cannot reach it), which the CLI prints as other central
  errors.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import IsolationLevel

from station.fleet import central
from station.report.data import FlagRow, JobRow, RunRow, Window, check_counts


class CentralSource:
    """The central ledger at `conninfo`, read-only; close() when done."""

    def __init__(self, conninfo: str, timeout: float) -> None:
        self.conninfo = conninfo
        self.timeout = timeout
        self.where = central.describe(conninfo)
        self._conn: psycopg.Connection | None = None
        self._tables: set[str] = set()
        self._security = False

    def describe(self) -> str:
        return f"central {self.where}"

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.rollback()
            self._conn.close()
            self._conn = None

    def __enter__(self) -> CentralSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, table: str, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        conn = self._connection()
        if table not in self._tables:
            return []  # no station has shipped this kind of row yet
        try:
            return conn.execute(sql, params).fetchall()
        except psycopg.Error as e:
            raise central.as_error(e, self.where) from None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None:
            conn = central.connect(self.conninfo, self.timeout, application="station report")
            try:
                conn.isolation_level = IsolationLevel.REPEATABLE_READ
                conn.read_only = True
                rows = conn.execute(  # the first statement takes the snapshot
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = "
                    "current_schema() AND table_name IN ('jobs', 'events', 'slot_flags', "
                    "'runs')").fetchall()
                columns = conn.execute(  # a schema before 6 has no security columns
                    "SELECT column_name FROM information_schema.columns WHERE table_schema "
                    "= current_schema() AND table_name = 'jobs' AND column_name = "
                    "'security'").fetchall()
            except psycopg.Error as e:
                conn.close()
                raise central.as_error(e, self.where) from None
            self._conn, self._tables = conn, {r[0] for r in rows}
            self._security = bool(columns)
        return self._conn

    def jobs(self, window: Window) -> list[JobRow]:
        where, params = _where(window, "started_at")
        self._connection()
        security = "security, lockdown" if self._security else "NULL, NULL"
        rows = self._query("jobs", "SELECT job_id, station, slot, port, result, failed_stage, "
                           f"error, started_at, finished_at, timings, mac, {security} FROM "  # noqa: S608
                           f"jobs WHERE {where} ORDER BY started_at, station, job_id", params)
        return [JobRow(job_id=r[0], station=r[1], slot=r[2] or "", port=r[3] or "",
                       result=r[4], failed_stage=r[5], error=r[6],
                       started_at=_epoch(r[7]), finished_at=central.epoch(r[8]),
                       timings=r[9] or {}, mac=r[10] or None, security=r[11] or None,
                       lockdown=bool(r[12])) for r in rows]

    def flags(self, window: Window) -> list[FlagRow]:
        where, params = _where(window, "flagged_at")
        rows = self._query("slot_flags", "SELECT slot, station, flagged_at, stage, reason, "
                           "hint, parked, cleared_at, cleared_by FROM slot_flags WHERE "  # noqa: S608
                           f"{where} ORDER BY flagged_at, station, flag_id", params)
        return [FlagRow(slot=r[0], station=r[1], flagged_at=_epoch(r[2]), stage=r[3],
                        reason=r[4] or "", hint=r[5] or "", parked=r[6],
                        cleared_at=central.epoch(r[7]), cleared_by=r[8]) for r in rows]

    def runs(self, window: Window) -> list[RunRow]:
        where, params = _where(Window(station=window.station), "started_at")
        rows = self._query("runs", "SELECT station, started_at, stopped_at FROM runs WHERE "  # noqa: S608
                           f"{where} ORDER BY started_at, station, run_id", params)
        return [RunRow(station=r[0], started_at=_epoch(r[1]),
                       stopped_at=central.epoch(r[2])) for r in rows]

    def throttles(self, window: Window) -> int:
        where, params = _where(window, "at")
        rows = self._query("events", "SELECT count(*) FROM events WHERE kind = 'Throttled' "  # noqa: S608
                           f"AND {where}", params)
        return int(rows[0][0]) if rows else 0

    def checks(self, window: Window) -> dict[str, int]:
        where, params = _where(window, "at")
        rows = self._query("events", "SELECT kind, coalesce(detail->>'step', "  # noqa: S608
                           "detail->>'result'), count(*) FROM events WHERE kind IN "
                           f"('RegistryStep', 'CloudChecked') AND {where} GROUP BY 1, 2",
                           params)
        return check_counts(rows)


def _where(window: Window, time_column: str) -> tuple[str, list[Any]]:
    clauses: list[str] = ["true"]
    params: list[Any] = []
    if window.since is not None:
        clauses.append(f"{time_column} >= %s")
        params.append(central.ts(window.since))
    if window.until is not None:
        clauses.append(f"{time_column} < %s")
        params.append(central.ts(window.until))
    if window.station is not None:
        clauses.append("station = %s")
        params.append(window.station)
    return " AND ".join(clauses), params


def _epoch(at: Any) -> float:
    value = central.epoch(at)
    assert value is not None  # NOT NULL columns
    return value
