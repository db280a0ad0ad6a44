"""A ledger as schema 1 left it: for the migration tests of each later schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_1 = """
    CREATE TABLE schema_version (version INTEGER NOT NULL);
    INSERT INTO schema_version VALUES (1);
    CREATE TABLE jobs (job_id TEXT PRIMARY KEY, station TEXT, port TEXT, slot TEXT,
        mac TEXT, chip TEXT, thing_name TEXT, firmware_hash TEXT, registrar TEXT,
        certificate_id TEXT, stage TEXT, result TEXT, failed_stage TEXT, error TEXT,
        started_at REAL, finished_at REAL, timings TEXT);
    CREATE TABLE events (job_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
        stage TEXT, attempt INTEGER, detail TEXT);
    CREATE TABLE registrations (job_id TEXT NOT NULL, port TEXT, slot TEXT,
        at REAL NOT NULL, mac TEXT NOT NULL, thing_name TEXT NOT NULL, step TEXT NOT NULL,
        certificate_id TEXT, certificate_arn TEXT);
"""


def schema_1_ledger(state: Path, rows: str) -> None:
    """state/ledger.sqlite3 at schema 1, holding `rows` (SQL INSERTs)."""
    conn = sqlite3.connect(state / "ledger.sqlite3")
    try:
        conn.executescript(SCHEMA_1 + rows)
        conn.commit()
    finally:
        conn.close()
