"""The ledger for people: a job as `station ledger` exports it, as CSV, as a table.

The central ledger's `station ledger --central` (fleet/view.py) exports the same rows.
"""

from __future__ import annotations

import csv
import io
import shutil
from typing import Any

from station.events import Stage
from station.record.eventlog import iso

EXPORT_COLUMNS = ("job_id", "slot", "port", "mac", "chip", "thing_name", "result",
                  "failed_stage", "error", "started", "finished", "seconds", "certificate_id",
                  "registrar", "firmware_hash", "station", "timings", "baud", "baud_steps",
                  "boot", "booted_project", "booted_version", "boot_log", "registry",
                  "registry_id", "cloud", "cloud_detail", "security",
                  "key_fingerprint", "signing_digest", "efuses", "lockdown", "credentials",
                  "efuse_key_block")


def export_row(job: dict[str, Any]) -> dict[str, Any]:
    """A job as `station ledger` exports it (also the central ledger's, fleet/view.py)."""
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


def table(rows: list[dict[str, Any]], summary: dict[str, int]) -> str:
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
