"""`station ledger --central` and `station board MAC`: the fleet as the central ledger has it.

Why it looks like this: the rows come from PostgreSQL (station/fleet/central.py) in the shape
of the local ledger's jobs plus their station, so the exports are the local ones with a
station column: the same CSV and JSON columns (EXPORT_COLUMNS already holds `station`),
a table that leads with the station. Reading needs only a connection, never the state
dir: a supervisor's laptop with the URL and a password can run it.
"""

from __future__ import annotations

import io
import json
import shutil
from typing import Any, Literal

from station.fleet import central
from station.record import export_csv, export_row, iso

Format = Literal["table", "csv", "json"]


def _console_text(renderable: Any) -> str:
    from rich.console import Console

    out = io.StringIO()
    width = max(100, shutil.get_terminal_size((160, 24)).columns)
    Console(file=out, width=width, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


def security_text(row: dict[str, Any]) -> str:
    """[security] of one job: its mode, whether the lock-down is done, the eFuse batches
    it saw, the key's hash and the signing key's digest (never a key)."""
    if not row.get("security"):
        return ""
    # the ledger keeps every journal line ("key before, key, ..."): the batches done,
    # and the one under way or failed where the job stopped in it
    lines = (row.get("efuses") or "").split(", ")
    shown = list(dict.fromkeys(x for x in lines if x and " " not in x))
    if " " in lines[-1]:
        shown.append(lines[-1])
    parts = [row["security"], "LOCKED" if row.get("lockdown") else "not locked down",
             f"eFuses: {', '.join(shown) or 'none'}"]
    if row.get("key_fingerprint"):
        parts.append(f"key {row['key_fingerprint']}")
    if row.get("signing_digest"):
        parts.append(f"signing digest {row['signing_digest'][:16]}")
    return "; ".join(parts)


def credentials_text(row: dict[str, Any]) -> str:
    """[credentials] of one job: the format its credentials are in on the board and, with
    the DS peripheral, the eFuse key block holding the HMAC key ("" before they are)."""
    if not row.get("credentials"):
        return ""
    block = row.get("efuse_key_block")
    return f"{row['credentials']}, DS key in {block}" if block else str(row["credentials"])


def _jobs_table(title: str, rows: list[dict[str, Any]], registry: bool = False) -> Any:
    """`registry`: a column with each job's device registry outcome and id ([registry]),
    one with its credentials' format and key block ([credentials]) and one with its
    security state ([security]), where any job has them."""
    from collections import Counter

    from rich.table import Table

    counts = Counter(r["result"] for r in rows)
    per_station = Counter(r["station"] for r in rows)
    caption = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + \
        f", total {len(rows)}; " + ", ".join(f"{s} {n}" for s, n in sorted(per_station.items()))
    table = Table(title=title, caption=caption)
    security = registry and any(r.get("security") for r in rows)
    credentials = registry and any(r.get("credentials") for r in rows)
    registry = registry and any(r.get("registry") for r in rows)
    for column in ("station", "slot", "mac", "thing", "result", "error", "finished", "s",
                   *(("registry",) if registry else ()),
                   *(("credentials",) if credentials else ()),
                   *(("security",) if security else ())):
        table.add_column(column, overflow="fold")
    for r in rows:
        error = r["error"] or ""
        if r["failed_stage"] and r["result"] != "done":
            error = f"at {r['failed_stage']}: {error}" if error else f"at {r['failed_stage']}"
        extra: list[str] = [" ".join(p for p in (r.get("registry"), r.get("registry_id"))
                                     if p)] if registry else []
        extra += [credentials_text(r)] if credentials else []
        extra += [security_text(r)] if security else []
        table.add_row(r["station"], r["slot"], r["mac"] or "", r["thing_name"] or "",
                      r["result"], error, r["finished"],
                      "" if r["seconds"] is None else f"{r['seconds']:.1f}", *extra)
    return table


def export_jobs(conninfo: str, fmt: Format, *, station: str | None = None,
                since: str | None = None, timeout: float = 10.0) -> str:
    after = central.parse_since(since) if since else None
    conn = central.connect(conninfo, timeout, application="station ledger --central")
    try:
        rows = [export_row(j) for j in central.jobs(conn, station=station, since=after)]
    finally:
        conn.close()
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        return export_csv(rows)
    where = central.describe(conninfo)
    return _console_text(_jobs_table(f"central ledger {where}", rows))


def export_board(conninfo: str, mac_text: str, fmt: Format, timeout: float = 10.0) -> str:
    """One board's history on every station: its jobs, then its certificate steps."""
    mac = central.normalise_mac(mac_text)
    conn = central.connect(conninfo, timeout, application="station board")
    try:
        history = central.board(conn, mac)
    finally:
        conn.close()
    jobs = [export_row(j) for j in history["jobs"]]
    steps = [{**s, "at": iso(s["at"])} for s in history["registrations"]]
    if fmt == "json":
        return json.dumps({"mac": mac, "jobs": jobs, "registrations": steps}, indent=2)
    if fmt == "csv":
        return export_csv(jobs)
    if not jobs and not steps:
        return f"board {mac}: not in the central ledger {central.describe(conninfo)}\n"
    from rich.console import Group
    from rich.table import Table

    parts: list[Any] = [_jobs_table(f"board {mac}", jobs, registry=True)]
    if steps:
        reg = Table(title="registration steps")
        for column in ("at", "station", "thing", "step", "certificate"):
            reg.add_column(column, overflow="fold")
        for s in steps:
            reg.add_row(s["at"], s["station"], s["thing_name"] or "", s["step"],
                        (s["certificate_id"] or "")[:16])
        parts.append(reg)
    return _console_text(Group(*parts))
