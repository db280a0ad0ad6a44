"""The soak's audit and report: the invariant checker (benchmarks/invariants.py) run over
what the night left, then the JSON report: boards done, hit by a fault and recovered;
restarts, the fault windows, the station's memory, and every violation found.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.invariants import Plug, RssSample, Violation, check_all, read_jobs
from benchmarks.soak_pg import PASSWORD
from benchmarks.soak_plan import INTERRUPTED, PlugRecord, SoakConfig
from benchmarks.soak_station import REGION, StationProcess, count_events
from station.flash import FirmwareBundle


def audit(cfg: SoakConfig, records: list[PlugRecord], rss: list[RssSample],
          stuck: list[Violation], bundle: FirmwareBundle, *, aws_url: str,
          central: str) -> tuple[list[Violation], dict[str, Any]]:
    """Every invariant over the ledger, the flash dumps, certs_out and moto (and the
    central ledger against the local one, when there is one): violations and facts."""
    import boto3

    iot = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name=REGION).client("iot", endpoint_url=aws_url)
    try:
        found, facts = check_all(
            ledger=cfg.workdir / "state" / "ledger.sqlite3",
            dumps=cfg.workdir / "rig", certs_out=cfg.workdir / "certs_out",
            bundle=bundle, partition="nvs", namespace="station",
            plugs=[Plug(r.mac, r.port, r.plugged_at, r.unplugged_at) for r in records],
            iot=iot, stuck=stuck, rss=rss)
    finally:
        iot.close()
    if central:
        from benchmarks.invariants import check_central

        more, facts["central"] = check_central(
            cfg.workdir / "state" / "ledger.sqlite3", central, "soak", PASSWORD)
        found += more
    return found, facts


def build_report(cfg: SoakConfig, records: list[PlugRecord], rss: list[RssSample],
                 faults: Counter[str], windows: dict[str, dict[str, Any]], notes: list[str], *,
                 started: float, station: StationProcess, violations: list[Violation],
                 facts: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of a soak: what the harness saw, and what the checker found."""
    ended = time.time()
    jobs = read_jobs(cfg.workdir / "state" / "ledger.sqlite3")
    by_mac: dict[str, list[PlugRecord]] = {}
    for r in records:
        by_mac.setdefault(r.mac, []).append(r)
    done = {mac for mac, rs in by_mac.items() if rs[-1].result in ("done", "skipped")}
    hit = {mac for mac, rs in by_mac.items() if any(r.hit_by for r in rs)}
    failed_by_reason: Counter[str] = Counter()
    for mac, rs in by_mac.items():
        if mac not in done:
            last = rs[-1]
            failed_by_reason[failure_reason(last.result, last.failed_stage,
                                            last.error)] += 1
    fault_free_not_done = sorted(set(by_mac) - hit - done)
    hit_by: Counter[str] = Counter()
    for mac in hit:
        for kind in set().union(*(r.hit_by for r in by_mac[mac])):
            hit_by[kind] += 1
    recovered = {mac for mac, rs in by_mac.items() if mac in done and
                 any(j["mac"] == mac and j["result"] not in ("done", "skipped")
                     for j in jobs)}
    retries = count_events(cfg.workdir / "state" / "ledger.sqlite3", "Retrying")
    hours = (ended - started) / 3600
    curve = _thin([(s.boards_final, round(s.rss_kb / 1024, 1), s.pid) for s in rss],
                  60)
    report = {
        "passed": not violations and not fault_free_not_done,
        "config": {k: (str(v) if isinstance(v, Path) else v)
                   for k, v in asdict(cfg).items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(ended - started, 1),
        "boards": {
            "plugged": len(by_mac), "plugs": len(records), "done": len(done),
            "not_done": len(by_mac) - len(done), "hit_by_a_fault": len(hit),
            "hit_share": round(len(hit) / max(1, len(by_mac)), 3),
            "fault_free": len(set(by_mac) - hit),
            "fault_free_done": len((set(by_mac) - hit) & done),
            "hit_but_done": len(hit & done),
        },
        "boards_hit_by_kind": dict(sorted(hit_by.items())),
        "failed_by_reason": dict(failed_by_reason.most_common()),
        "faults_injected": dict(sorted(faults.items())),
        "fault_windows": {k: {kk: (round(vv, 1) if isinstance(vv, float) else vv)
                              for kk, vv in w.items() if kk not in ("start", "end")}
                          for k, w in windows.items()},
        "restarts": {"sigkill": station.kills,
                     "starts": station.generation,
                     "unexpected_exits": [e for e in station.exits if not e["expected"]]},
        "recoveries": {
            "boards_done_after_a_failed_or_interrupted_job": len(recovered),
            "interrupted_jobs_closed_at_restart": count_events(
                cfg.workdir / "state" / "ledger.sqlite3", "Interrupted"),
            "registrations_reconciled_at_restart": _reconciled(cfg.workdir / "state"),
            "worker_retries": retries,
        },
        "invariant_violations": len(violations),
        "violations": [v.as_dict() for v in violations],
        "fault_free_not_done": fault_free_not_done,
        "boards_per_hour": round(len(done) / hours, 1) if hours > 0 else None,
        "board_seconds": _board_seconds(jobs),
        "rss_check": facts.get("rss", {}),
        "rss_mb_curve": curve,
        "ledger": {"jobs": facts.get("jobs"), "registration_rows":
                   facts.get("registration_rows")},
        "central": facts.get("central", {}),
        "aws": facts.get("aws", {}),
        "notes": notes,
    }
    return report


def failure_reason(result: str | None, stage: str | None, error: str | None) -> str:
    """A stable bucket for the report: result@stage: what, without ids and numbers."""
    text = error or ""
    for pattern, name in (
            (r"No serial data received", "no serial data (mute)"),
            (r"Invalid head of packet|not an ESP|serial noise", "not an ESP"),
            (INTERRUPTED, "station killed; board gone before restart"),
            (r"cannot write|No space left|ENOSPC|cannot create", "certs_out not writable"),
            (r"cannot reach AWS|Unreachable", "AWS unreachable"),
            (r"[Tt]hrottl", "AWS throttling"),
            (r"timed out", "timeout"),
            (r"aborted", "aborted")):
        if re.search(pattern, text):
            what = name
            break
    else:
        text = re.sub(r"/\S+", "PATH", text)  # ports and files differ per board
        what = re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "#", text)[:80] or "-"
    return f"{result}@{stage or '-'}: {what}"


def _reconciled(state: Path) -> int:
    path = state / "station.log"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines()
               if "reconcile: " in line)


def _board_seconds(jobs: list[dict[str, Any]]) -> dict[str, float]:
    spans = sorted(j["finished_at"] - j["started_at"] for j in jobs
                   if j["result"] == "done" and j["finished_at"])
    if not spans:
        return {}
    return {"median": round(spans[len(spans) // 2], 1),
            "p95": round(spans[int(len(spans) * 0.95) - 1 if len(spans) > 1 else 0], 1),
            "max": round(spans[-1], 1)}


def _thin(points: list[tuple[int, float, int]], keep: int) -> list[list[Any]]:
    if len(points) <= keep:
        return [list(p) for p in points]
    step = len(points) / keep
    picked = [points[int(i * step)] for i in range(keep)] + [points[-1]]
    return [list(p) for p in picked]
