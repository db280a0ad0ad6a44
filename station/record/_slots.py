"""The ledger's record of slot flags and station runs (schema 2), kept apart from ledger.py.

Why it looks like this:
- A flag must outlive the process: a slot parked at 03:00 stays parked after a restart,
  and the morning report lists it. So flags are rows (`slot_flags`), cleared by setting
  `cleared_at`/`cleared_by`, never deleted.
- `station slot clear SLOT` runs in another process while the daemon holds the state
  dir's lock. The ledger is the one place both may write (SQLite's own locking, WAL),
  so the CLI clears the row and the daemon, which polls the open flags every second,
  sees the row closed and unparks the slot. No second channel (signal, socket, file) to
  get out of step with the record.
- `runs` has one row per `station run` (start, and stop when it ends cleanly), so the
  report can count restarts and tell the ones after a crash (no stop recorded).
- These functions run on the ledger's writer thread (ledger.py), inside its
  transactions; they only know SQL.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from station.events import SlotCleared, SlotFlagged, Stage

SCHEMA_2 = (
    """CREATE TABLE IF NOT EXISTS slot_flags (
        slot TEXT NOT NULL, port TEXT, station TEXT, job_id TEXT, flagged_at REAL NOT NULL,
        stage TEXT NOT NULL, reason TEXT, hint TEXT, parked INTEGER NOT NULL,
        cleared_at REAL, cleared_by TEXT)""",
    "CREATE INDEX IF NOT EXISTS slot_flags_open ON slot_flags (slot) WHERE cleared_at IS NULL",
    """CREATE TABLE IF NOT EXISTS runs (
        station TEXT, pid INTEGER, started_at REAL NOT NULL, stopped_at REAL)""",
)


def write_slot_event(conn: sqlite3.Connection, event: SlotFlagged | SlotCleared) -> None:
    if isinstance(event, SlotFlagged):
        close_flag(conn, event.slot, "reflagged", event.at)  # at most one open per slot
        conn.execute("INSERT INTO slot_flags VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                     (event.slot, event.port, event.station, event.job_id, event.at,
                      event.stage.value, event.reason, event.hint, int(event.parked)))
    else:
        close_flag(conn, event.slot, event.by, event.at)


def close_flag(conn: sqlite3.Connection, slot: str, by: str, at: float) -> bool:
    """Clear `slot`'s open flag; False if it had none (idempotent, so the daemon's echo
    of a CLI clear changes nothing)."""
    cursor = conn.execute("UPDATE slot_flags SET cleared_at = ?, cleared_by = ? "
                          "WHERE slot = ? AND cleared_at IS NULL", (at, by, slot))
    return cursor.rowcount > 0


def open_flags(conn: sqlite3.Connection) -> list[SlotFlagged]:
    rows = conn.execute("SELECT slot, port, station, job_id, flagged_at, stage, reason, hint, "
                        "parked FROM slot_flags WHERE cleared_at IS NULL ORDER BY flagged_at")
    return [SlotFlagged(slot=r[0], port=r[1] or "", station=r[2] or "", job_id=r[3] or "",
                        at=r[4], stage=Stage(r[5]), reason=r[6] or "", hint=r[7] or "",
                        parked=bool(r[8])) for r in rows]


def all_flags(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cursor = conn.execute("SELECT * FROM slot_flags ORDER BY flagged_at, rowid")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def run_started(conn: sqlite3.Connection, station: str, pid: int, at: float) -> int:
    cursor = conn.execute("INSERT INTO runs VALUES (?, ?, ?, NULL)", (station, pid, at))
    return int(cursor.lastrowid or 0)


def run_stopped(conn: sqlite3.Connection, run_id: int, at: float) -> None:
    conn.execute("UPDATE runs SET stopped_at = ? WHERE rowid = ?", (at, run_id))
