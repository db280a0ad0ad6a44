"""Slot flags and station runs in the central ledger (schema 2), shipped beside the events.

Why it looks like this:
- The night report of the fleet must show what a station's own report shows: the slots
  that were flagged and the station's restarts. Locally these are rows of their own
  (station/record/_slots.py), not events: a flag is cleared and a run is stopped by
  updating its row, so they cannot ride on the event cursor (central.ship).
- They are few (one run per `station run`, one flag per slot in trouble), so the
  replicator ships them whole, keyed by (station, local rowid): every local row PostgreSQL
  has not seen, and every row PostgreSQL still holds open (not cleared, not stopped)
  that is closed locally now. An upsert makes shipping a row twice change nothing.
- What PostgreSQL holds (the highest id, the open ones) is read at every (re)connection,
  like `shipped_seq`: after an outage or a restart the replicator sends exactly what
  changed, including a whole history of flags and runs the first time a station of
  schema 2 ships (its local ledger kept them all along).
- Each cycle ships the events first, then these rows: a flag raised by a board's failure
  is in PostgreSQL no earlier than that board's events.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

import psycopg

from station.fleet.central import ts

FLAG_COLUMNS = ("slot", "port", "job_id", "flagged_at", "stage", "reason", "hint", "parked",
                "cleared_at", "cleared_by")
RUN_COLUMNS = ("pid", "started_at", "stopped_at")
_TIMES = ("flagged_at", "cleared_at", "started_at", "stopped_at")


@dataclass
class Known:
    """What PostgreSQL holds of one table of one station: its highest id, its open ids."""

    last: int = 0
    open: set[int] = field(default_factory=set)


@dataclass
class Shipped:
    flags: Known = field(default_factory=Known)
    runs: Known = field(default_factory=Known)


# table: (central id column, local "closed" column, columns)
_TABLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "slot_flags": ("flag_id", "cleared_at", FLAG_COLUMNS),
    "runs": ("run_id", "stopped_at", RUN_COLUMNS),
}


def shipped(conn: psycopg.Connection, station: str) -> Shipped:
    """Where PostgreSQL says this station's flags and runs are."""
    out = Shipped()
    with conn.transaction():
        for table, known in (("slot_flags", out.flags), ("runs", out.runs)):
            key, closed, _ = _TABLES[table]
            row = conn.execute(
                f"SELECT coalesce(max({key}), 0), coalesce(array_agg({key}) FILTER "  # noqa: S608
                f"(WHERE {closed} IS NULL), '{{}}') FROM {table} WHERE station = %s",
                (station,)).fetchone()
            assert row is not None
            known.last, known.open = int(row[0]), {int(x) for x in row[1]}
    return out


@dataclass(frozen=True)
class Changes:
    """Local rows to ship: (rowid, *columns) of each table."""

    flags: list[tuple[Any, ...]]
    runs: list[tuple[Any, ...]]

    def __len__(self) -> int:
        return len(self.flags) + len(self.runs)


def read(db: sqlite3.Connection, known: Shipped) -> Changes:
    """The local rows PostgreSQL lacks or holds open while they are closed here."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for table, have in (("slot_flags", known.flags), ("runs", known.runs)):
        _, closed, columns = _TABLES[table]
        ids = sorted(have.open)
        try:
            rows[table] = db.execute(
                f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid > ? OR "  # noqa: S608
                f"({closed} IS NOT NULL AND rowid IN ({', '.join('?' * len(ids))})) "
                "ORDER BY rowid", (have.last, *ids)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            rows[table] = []  # a ledger of schema 1: nothing of the kind recorded
    return Changes(flags=rows["slot_flags"], runs=rows["runs"])


def ship(conn: psycopg.Connection, station: str, changes: Changes, known: Shipped) -> None:
    """One transaction of upserts; `known` follows once PostgreSQL has committed."""
    with conn.transaction(), conn.cursor() as cur:
        for table, rows in (("slot_flags", changes.flags), ("runs", changes.runs)):
            if not rows:
                continue
            key, _, columns = _TABLES[table]
            names = ", ".join(columns)
            marks = ", ".join(["%s"] * (len(columns) + 2))
            updates = ", ".join(f"{c} = excluded.{c}" for c in columns)
            cur.executemany(
                f"INSERT INTO {table} (station, {key}, {names}) VALUES ({marks}) "  # noqa: S608
                f"ON CONFLICT (station, {key}) DO UPDATE SET {updates}",
                [(station, row[0], *(_value(c, v) for c, v in zip(columns, row[1:],
                                                                     strict=True)))
                 for row in rows])
    for rows, have, at in ((changes.flags, known.flags, FLAG_COLUMNS.index("cleared_at")),
                           (changes.runs, known.runs, RUN_COLUMNS.index("stopped_at"))):
        for row in rows:
            have.last = max(have.last, int(row[0]))
            if row[1 + at] is None:
                have.open.add(int(row[0]))
            else:
                have.open.discard(int(row[0]))


def _value(column: str, value: Any) -> Any:
    if column in _TIMES:
        return ts(value)
    if column == "parked":
        return bool(value)
    return value
