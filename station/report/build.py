"""`station report`: the morning's answer to "how did the night go?", as a file.

Why it looks like this:
- One self-contained HTML file, because it is mailed around and opened on factory PCs
  with no network: styles inline, charts inline SVG (station/report/charts.py), no script,
  no link to anything outside the file. `--format md` gives the same summary and tables
  as Markdown, for an e-mail or a chat message.
- The page is a template string filled with escaped values, not a template engine: it
  is one page, and every value in it is computed once in station/report/stats.py from
  rows of a ReportSource (station/report/data.py), so a central ledger reuses all of it.
- An empty ledger, a ledger of one board, or a window with no boards is a report that
  says so, not a stack trace; a missing ledger is a one-line error naming the path.
- Times are UTC, as in the ledger's exports and the event log.
"""

from __future__ import annotations

import argparse
import html
import re
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from station.config import RecordConfig
from station.record import FILENAME
from station.report.data import ReportSource, SqliteLedgerSource, Window
from station.report.stats import Stats, compute

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """`2026-12-01T18:00` (UTC unless an offset is given), `2026-12-01`, or `12h` / `90m` /
    `2d` / `30s` ago. For argparse: a bad value is an ArgumentTypeError."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use 2026-12-01T18:00 (UTC), 2026-12-01, or 12h / 90m "
            "/ 2d ago") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def stamp(at: float | None) -> str:
    return "" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _num(value: float | None, fmt: str = "{:.1f}", none: str = "n/a") -> str:
    return none if value is None else fmt.format(value)


def summary_rows(stats: Stats) -> list[tuple[str, str, str]]:
    """(key, label, value): what both formats show; the key is for machines (and tests)."""
    s = stats.summary
    return [
        ("boards", "boards (distinct MACs)", str(s.boards)),
        ("jobs", "jobs (each time a port was taken: retries and restarts add jobs)",
         str(s.jobs)),
        ("done", "boards done", str(s.done)),
        ("failed", "boards failed (never done)", str(s.failed)),
        ("removed", "boards removed (never done or failed)", str(s.removed)),
        ("skipped", "jobs skipped (the board was already done)", str(s.skipped_jobs)),
        ("in_progress", "boards in progress", str(s.in_progress)),
        ("yield", "yield: boards done / (done + failed)", _num(s.yield_pct, "{:.1f}%")),
        ("boards_per_hour", "boards done per hour (first start to last end)",
         _num(s.boards_per_hour)),
        ("median_seconds", "median time per board done (s)", _num(s.median_seconds)),
        ("throttles", "registrar throttles", str(s.throttles)),
        *_check_rows(s.checks),
        *[(f"security: {mode}", f"locked boards ({mode}): done / lock-down burned / failed",
           " / ".join(str(n) for n in counts)) for mode, counts in s.security.items()],
        ("restarts", "station restarts (after a crash or kill)",
         f"{s.restarts} ({s.unclean_restarts})"),
        ("first_start", "first board started", stamp(s.first_start) or "-"),
        ("last_end", "last board ended", stamp(s.last_end) or "-"),
    ]


CHECK_ROWS = (
    ("registry", "device registry: registered / already had it / failed",
     ("registered", "already", "failed")),
    ("cloud", "cloud check on the broker: ok / failed / skipped", ("ok", "failed", "skipped")),
)


def _check_rows(checks: dict[str, int]) -> list[tuple[str, str, str]]:
    """A row for [registry] and one for [verify] cloud, on a line that has them."""
    rows = []
    for key, label, outcomes in CHECK_ROWS:
        counts = [checks.get(f"{key} {o}", 0) for o in outcomes]
        if any(counts):
            rows.append((key, label, " / ".join(str(n) for n in counts)))
    return rows


def _window_text(window: Window) -> str:
    parts = [f"from {stamp(window.since)}" if window.since is not None else "",
             f"until {stamp(window.until)}" if window.until is not None else "",
             f"station {window.station}" if window.station else ""]
    return ", ".join(p for p in parts if p) or "the whole ledger"


def empty_text(stats: Stats) -> str:
    if stats.window == Window():
        return "No boards in this ledger yet."
    return f"No boards in this window ({_window_text(stats.window)})."


def stage_rows(stats: Stats) -> list[tuple[str, int, str, str, str]]:
    rows = []
    for stage, times in stats.stage_times.items():
        p90 = statistics.quantiles(times, n=10)[-1] if len(times) > 1 else times[0]
        rows.append((stage, len(times), f"{statistics.median(times):.2f}", f"{p90:.2f}",
                     f"{max(times):.2f}"))
    return rows


def slot_rows(stats: Stats) -> list[tuple[str, ...]]:
    return [(s.slot, str(s.jobs), str(s.done), str(s.failed), str(s.removed),
             _num(s.yield_pct, "{:.0f}%", "-"), "yes" if s.flagged else "")
            for s in sorted(stats.slots, key=lambda s: _natural(s.slot))]


def flag_rows(stats: Stats) -> list[tuple[str, ...]]:
    return [(stats.slot_name(f.station, f.slot), stamp(f.flagged_at), f.stage, f.reason, f.hint,
             "parked" if f.parked else "flagged",
             f"{stamp(f.cleared_at)} ({f.cleared_by})" if f.cleared_at else "still flagged")
            for f in stats.flags]


def _natural(text: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (0, p) for p in re.split(r"(\d+)", text)]


# -- HTML ------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:24px auto;max-width:1000px;padding:0 16px;color:#212121}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px
solid #ddd;padding-bottom:4px}.meta{color:#616161}.notice{background:#fff8e1;border:1px
solid #f9a825;padding:10px 14px;border-radius:4px}table{border-collapse:collapse;
margin:6px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.summary td{font-weight:600}.flag{color:#c62828;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}svg{max-width:100%;
height:auto}
"""


def _table(head: tuple[str, ...], rows: list[tuple[object, ...]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{html.escape(str(v))}</td>' if _numeric(v) else
        f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _numeric(value: object) -> bool:
    return bool(re.fullmatch(r"[\d.,%() -]+", str(value))) and str(value).strip() != "-"


def render_html(stats: Stats, charts: dict[str, str], generated: float) -> str:
    summary = "".join(
        f'<tr data-key="{key}"><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>'
        for key, label, value in summary_rows(stats))
    parts = [f'<h2>Summary</h2><table class="summary"><tbody>{summary}</tbody></table>']
    if stats.empty:
        parts.insert(0, f'<p class="notice" id="empty">{html.escape(empty_text(stats))}</p>')
    if "timeline" in charts:
        parts.append(f"<h2>Boards over time</h2>{charts['timeline']}")
    if "stages" in charts:
        parts.append(f"<h2>Time per stage</h2>{charts['stages']}" + _table(
            ("stage", "boards", "median s", "90th pct s", "max s"), list(stage_rows(stats)),
            "stages"))
    if stats.failures_by_stage:
        by_stage = _table(("stage", "failed"), list(stats.failures_by_stage.most_common()),
                          "failstage")
        by_reason = _table(("reason", "failed", "example"), list(stats.failures_by_reason),
                           "reasons")
        parts.append(f'<h2>Failures</h2><div class="charts">{charts.get("failstage", "")}'
                     f"<div>{by_stage}</div></div><h3>By reason</h3>{by_reason}")
    elif not stats.empty:
        parts.append("<h2>Failures</h2><p>No board failed.</p>")
    if stats.slots:
        parts.append(f"<h2>Slots</h2>{charts.get('slots', '')}" + _table(
            ("slot", "jobs", "done", "failed", "removed", "yield", "flagged"),
            list(slot_rows(stats)), "slots"))
    parts.append("<h2>Flagged slots</h2>" + (_table(
        ("slot", "flagged", "stage", "rule", "hint", "", "cleared"), list(flag_rows(stats)),
        "flags") if stats.flags else "<p>No slot was flagged.</p>"))
    title = "Station report"
    meta = (f"{html.escape(_window_text(stats.window))} · ledger "
            f"{html.escape(stats.source)} · made {html.escape(stamp(generated))}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{_CSS}</style></head><body>"
            f'<h1>{title}</h1><p class="meta">{meta}</p>{"".join(parts)}</body></html>\n')


# -- Markdown --------------------------------------------------------------------------


def _md_table(head: tuple[str, ...], rows: list[tuple[object, ...]]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_md(stats: Stats, generated: float) -> str:
    out = [f"# Station report\n\n{_window_text(stats.window)} · ledger `{stats.source}` · "
           f"made {stamp(generated)}\n"]
    if stats.empty:
        out.append(f"**{empty_text(stats)}**\n")
    out.append(_md_table(("figure", "value"),
                         [(label, value) for _, label, value in summary_rows(stats)]))
    if stats.stage_times:
        out.append("\n## Time per stage\n\n" + _md_table(
            ("stage", "boards", "median s", "90th pct s", "max s"), list(stage_rows(stats))))
    if stats.failures_by_stage:
        out.append("\n## Failures by stage\n\n" + _md_table(
            ("stage", "failed"), list(stats.failures_by_stage.most_common())))
        out.append("\n## Failures by reason\n\n" + _md_table(
            ("reason", "failed", "example"), list(stats.failures_by_reason)))
    if stats.slots:
        out.append("\n## Slots\n\n" + _md_table(
            ("slot", "jobs", "done", "failed", "removed", "yield", "flagged"),
            list(slot_rows(stats))))
    out.append("\n## Flagged slots\n\n" + (_md_table(
        ("slot", "flagged", "stage", "rule", "hint", "", "cleared"), list(flag_rows(stats)))
        if stats.flags else "No slot was flagged."))
    return "\n".join(out) + "\n"


# -- the command -----------------------------------------------------------------------


def make_report(source: ReportSource, window: Window, fmt: str,
                generated: float | None = None) -> str:
    generated = time.time() if generated is None else generated
    stats = compute(source, window)
    if fmt == "md":
        return render_md(stats, generated)
    from station.report.charts import all_charts  # matplotlib only when drawing

    return render_html(stats, all_charts(stats), generated)


def report_command(config: RecordConfig, *, since: float | None, until: float | None,
                   station: str | None, fmt: str, out: Path | None,
                   stdout: IO[str] = sys.stdout, central: str | None = None) -> int:
    """`central`: the [ledger] central conninfo to read instead of the local ledger."""
    window = Window(since=since, until=until, station=station)
    if central:
        from station.report.central import CentralSource

        with CentralSource(central, config.ledger.connect_timeout) as fleet:
            text = make_report(fleet, window, fmt)
    else:
        text = make_report(SqliteLedgerSource(config.station.state_dir / FILENAME), window,
                           fmt)
    target = out or Path(f"report.{fmt}")
    if str(target) == "-":
        stdout.write(text)
        return 0
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)  # a half-written report is never mailed out
    print(f"station report: {target} ({len(text) // 1024} KB)", file=stdout)
    return 0
