"""The night report's numbers, from the rows of any ReportSource; no SQL, no drawing.

Why it looks like this: the HTML, the Markdown and every chart show the same figures, so
they are computed once here, as plain data, from the rows station/report/data.py returns
(local or central ledger alike). The definitions are the ones the report prints:
- a board is a physical board: one MAC. A job is one time the station took a port; one
  board can have several (a failure then a retry on another slot, a restart that saw it
  again: `skipped`). A job that failed before the MAC was read counts as a board of its
  own (nothing says which board it was). Each board has one outcome, the best of its
  jobs: done, else failed, else removed, else in progress, else skipped.
- yield = boards done / (boards done + boards failed): boards that ran to an end on the
  line. Removed (a hand pulled the board) and skipped (already done) say nothing about
  the process.
- boards per hour = boards done / hours from the first job's start to the last job's
  end: the line's pace while it worked, not diluted by an idle evening.
- time per board = end - start of the jobs done; its median is robust to the odd board
  that waited a minute for the cloud.
- failure reasons are grouped with what varies between boards taken out (ports, byte
  values, numbers): `Invalid head of packet (0x61)` and `(0x59)` are one reason.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field

from station.events import Stage
from station.report.data import FlagRow, JobRow, ReportSource, RunRow, Window

STAGES = [s.value for s in (Stage.CONNECT, Stage.IDENTIFY, Stage.REGISTER, Stage.FLASH,
                            Stage.VERIFY, Stage.RESET)]
BUCKETS = (10, 30, 60, 300, 600, 900, 1800, 3600)  # timeline bar widths, seconds
MAX_BARS = 48


OUTCOMES = ("done", "failed", "removed", "in_progress", "skipped")  # best first


@dataclass
class Summary:
    boards: int = 0  # distinct MACs (and jobs that failed before the MAC was read)
    jobs: int = 0
    done: int = 0  # boards, by their best outcome
    skipped_jobs: int = 0
    failed: int = 0
    removed: int = 0
    skipped: int = 0
    in_progress: int = 0
    yield_pct: float | None = None
    boards_per_hour: float | None = None
    median_seconds: float | None = None
    throttles: int = 0
    checks: dict[str, int] = field(default_factory=dict)  # [registry], [verify] cloud
    security: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """[security] mode -> boards done, boards whose lock-down is burned, boards failed
    (never done) with that mode."""
    starts: int = 0
    restarts: int = 0
    unclean_restarts: int = 0
    first_start: float | None = None
    last_end: float | None = None


@dataclass
class SlotStats:
    slot: str
    done: int = 0
    failed: int = 0
    removed: int = 0
    skipped: int = 0
    flagged: bool = False

    @property
    def jobs(self) -> int:
        return self.done + self.failed + self.removed + self.skipped

    @property
    def yield_pct(self) -> float | None:
        ended = self.done + self.failed
        return 100.0 * self.done / ended if ended else None


@dataclass
class Stats:
    window: Window
    source: str
    summary: Summary
    bucket_s: int = 3600
    timeline: list[tuple[float, int, int, int]] = field(default_factory=list)
    """(bucket start, done, failed, removed) by when boards ended."""
    stage_times: dict[str, list[float]] = field(default_factory=dict)
    failures_by_stage: Counter[str] = field(default_factory=Counter)
    failures_by_reason: list[tuple[str, int, str]] = field(default_factory=list)
    """(reason with its details taken out, failed jobs, one example as it was)."""
    slots: list[SlotStats] = field(default_factory=list)
    flags: list[FlagRow] = field(default_factory=list)

    stations: set[str] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return self.summary.jobs == 0

    def slot_name(self, station: str, slot: str) -> str:
        """A slot as the report names it: `line-2/A3` once several stations are in it
        (the central ledger), since A3 of one station is not A3 of another."""
        return f"{station}/{slot}" if len(self.stations) > 1 else slot


_PORT = re.compile(r"(?<![\w.])(?:/|rfc2217://)\S+?: ")  # "/dev/serial/by-path/…: "
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")
_MAC_OR_DIGEST = re.compile(r"\b(?:[0-9a-f]{2}(?::[0-9a-f]{2}){5}|[0-9a-f]{8,})\b")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)*(?![\w])")
_QUOTED = re.compile(r"'[^']*'")


def reason_of(error: str | None) -> str:
    """An error as a reason to group by: one line, short, without what varies from board
    to board (the port's path, byte values, MACs and digests, numbers, quoted values)."""
    text = _PORT.sub("", _example(error))
    text = _NUMBER.sub("N", _MAC_OR_DIGEST.sub("…", _HEX.sub("0x…", text)))
    text = _QUOTED.sub("'…'", text)
    return text if len(text) <= 120 else text[:119] + "…"


def _example(error: str | None) -> str:
    return " ".join((error or "no reason given").split())


def _reasons(failed: list[JobRow]) -> list[tuple[str, int, str]]:
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for job in failed:
        reason = reason_of(job.error)
        counts[reason] += 1
        examples.setdefault(reason, _example(job.error)[:200])
    return [(reason, n, examples[reason]) for reason, n in counts.most_common()]


def _outcomes(jobs: list[JobRow]) -> Counter[str]:
    """Boards by their best outcome (OUTCOMES' order); a job with no MAC is its own."""
    best: dict[str, int] = {}
    for job in jobs:
        board = job.mac or f"job:{job.job_id}"
        rank = OUTCOMES.index(job.result or "in_progress")
        best[board] = min(rank, best.get(board, rank))
    return Counter(OUTCOMES[rank] for rank in best.values())


def _restarts(runs: list[RunRow], window: Window) -> tuple[int, int, int]:
    """(starts in the window, of them restarts, of them after a run with no stop)."""
    starts = restarts = unclean = 0
    previous: dict[str, RunRow] = {}
    for run in runs:
        before = previous.get(run.station)
        previous[run.station] = run
        inside = (window.since is None or run.started_at >= window.since) and \
            (window.until is None or run.started_at < window.until)
        if not inside:
            continue
        starts += 1
        if before is not None:
            restarts += 1
            unclean += before.stopped_at is None
    return starts, restarts, unclean


def compute(source: ReportSource, window: Window) -> Stats:
    jobs = source.jobs(window)
    flags = source.flags(window)
    outcomes = _outcomes(jobs)
    s = Summary(boards=sum(outcomes.values()), jobs=len(jobs))
    s.done, s.failed = outcomes["done"], outcomes["failed"]
    s.removed, s.skipped, s.in_progress = outcomes["removed"], outcomes["skipped"], \
        outcomes["in_progress"]
    s.skipped_jobs = sum(j.result == "skipped" for j in jobs)
    if s.done + s.failed:
        s.yield_pct = 100.0 * s.done / (s.done + s.failed)
    ended = [j for j in jobs if j.finished_at is not None]
    if jobs:
        s.first_start = min(j.started_at for j in jobs)
    if ended:
        s.last_end = max(j.finished_at for j in ended if j.finished_at is not None)
    if s.first_start is not None and s.last_end is not None and s.last_end > s.first_start:
        s.boards_per_hour = s.done * 3600.0 / (s.last_end - s.first_start)
    durations = [j.finished_at - j.started_at for j in jobs
                 if j.result == "done" and j.finished_at is not None]
    if durations:
        s.median_seconds = statistics.median(durations)
    s.throttles = source.throttles(window)
    s.checks = source.checks(window)
    s.security = _security(jobs)
    s.starts, s.restarts, s.unclean_restarts = _restarts(source.runs(window), window)

    stats = Stats(window=window, source=source.describe(), summary=s, flags=flags)
    _timeline(stats, ended)
    # the worker's stages in their order, then other timings (register_cloud: the
    # registration, which runs beside the flash)
    keys = {k for j in jobs if j.result == "done" for k in j.timings}
    for stage in [*STAGES, *sorted(keys - set(STAGES))]:
        times = [j.timings[stage] for j in jobs if j.result == "done" and stage in j.timings]
        if times:
            stats.stage_times[stage] = times
    failed = [j for j in jobs if j.result == "failed"]
    stats.failures_by_stage = Counter(j.failed_stage or "unknown" for j in failed)
    stats.failures_by_reason = _reasons(failed)
    stats.stations = {j.station for j in jobs if j.station} | \
        {f.station for f in flags if f.station}  # "": a job whose start was not recorded
    stats.slots = _slots(stats, jobs, flags)
    return stats


def _security(jobs: list[JobRow]) -> dict[str, tuple[int, int, int]]:
    """Boards (MACs) per [security] mode: done, locked down, failed and never done."""
    out = {}
    for mode in sorted({j.security for j in jobs if j.security}):
        mine = [j for j in jobs if j.security == mode and j.mac]
        done = {j.mac for j in mine if j.result == "done"}
        locked = {j.mac for j in mine if j.lockdown}
        failed = {j.mac for j in mine if j.result == "failed"} - done
        out[mode] = (len(done), len(locked), len(failed))
    return out


def _timeline(stats: Stats, ended: list[JobRow]) -> None:
    s = stats.summary
    if s.first_start is None or s.last_end is None:
        return
    span = max(s.last_end - s.first_start, 1.0)
    # a night is read by the hour; a short run gets bars short enough to show its shape
    stats.bucket_s = 3600 if span >= 4 * 3600 else \
        next((b for b in BUCKETS if span / b <= MAX_BARS), BUCKETS[-1])
    width = stats.bucket_s
    buckets: dict[float, list[int]] = {}
    start = s.first_start // width * width
    for k in range(int((s.last_end - start) // width) + 1):
        buckets[start + k * width] = [0, 0, 0]
    column = {"done": 0, "failed": 1, "removed": 2}
    for job in ended:
        assert job.finished_at is not None
        if job.result in column:
            buckets[job.finished_at // width * width][column[job.result]] += 1
    stats.timeline = [(t, c[0], c[1], c[2]) for t, c in sorted(buckets.items())]


def _slots(stats: Stats, jobs: list[JobRow], flags: list[FlagRow]) -> list[SlotStats]:
    by_slot: dict[str, SlotStats] = {}
    for job in jobs:
        name = stats.slot_name(job.station, job.slot)
        slot = by_slot.setdefault(name, SlotStats(name))
        if job.result in ("done", "failed", "removed", "skipped"):
            setattr(slot, job.result, getattr(slot, job.result) + 1)
    for flag in flags:
        name = stats.slot_name(flag.station, flag.slot)
        by_slot.setdefault(name, SlotStats(name)).flagged = True
    return list(by_slot.values())
