"""The live table: a row per slot, a footer, redrawn by rich four times a second.

`render(view, now)` is a pure function of the view's state (view.py) and the time passed
in, so tests render it into a fixed-width Console and compare text. The table is laid out
when rich draws it, for the terminal's width (FittedTable): a line PC's 80x24 terminal
must show each board's slot, chip, stage and progress whole, where rich by itself would
cut every column evenly (`fl…`, `esp3…`); the other columns give way in GIVE_WAY's order.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from station.events import SlotFlagged, Stage
from station.screen.fit import Choice, Packed, Tail
from station.screen.view import BoardRow, StationView, one_line

# -- formatting helpers (pure) ----------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "kB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} MB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


def _slot_key(slot: str) -> list[tuple[int, str]]:
    """A1, A2, A10 in that order (numbers compare as numbers)."""
    return [(int(p), "") if p.isdigit() else (0, p) for p in re.split(r"(\d+)", slot)]


def result_text(row: BoardRow) -> Text:
    """The last column: the outcome, or why a board in progress is waiting.

    The stage column already says `done` or `failed`: the result says what follows it
    (what the board booted, where and why it failed), so it fits beside the stage at 80
    columns."""
    mark = security_mark(row)
    if row.stage == Stage.DONE:
        return Text(f"{mark} · " if mark else "", style="bold green").append(
            f"booted {row.booted}" if row.booted else "done", style="green")
    if row.stage == Stage.FAILED:
        where = f"at {row.failed_stage.value}: " if row.failed_stage else ""
        return Text(f"{mark} · " if mark else "", style="bold yellow").append(
            one_line(f"{where}{row.error or 'no reason given'}"), style="red")
    if row.stage == Stage.REMOVED:
        where = f" during {row.failed_stage.value}" if row.failed_stage else ""
        return Text(f"removed{where}", style="yellow")
    if row.stage == Stage.SKIPPED:
        return Text(one_line(f"skipped: {row.error or 'already done with this firmware'}"),
                    style="cyan")
    if row.buttons:
        return Text("press BOOT + EN (no auto-reset)", style="bold yellow")
    if row.throttled:
        return Text("throttled by the cloud, waiting", style="yellow")
    if row.retry_reason:
        return Text(one_line(f"attempt {row.attempt} after: {row.retry_reason}"),
                    style="yellow")
    if row.stepped:
        return Text(one_line(f"stepped down {row.stepped[-1]}"), style="yellow")
    if row.securing in DEVICE_KEY_WORDS:  # key = "device": no eFuse batch of ours
        return Text(DEVICE_KEY_WORDS[row.securing], style="bold yellow")
    if row.securing:
        return Text(f"eFuses: {row.securing}", style="bold yellow")
    return Text(mark)


DEVICE_KEY_WORDS = {"first_boot before": "first boot: the chip encrypts its flash",
                    "plaintext before": "writing the plaintext its first boot encrypts"}
SECURITY_MARKS = (("lockdown", "locked"), ("secure_boot", "secure boot"),
                  ("encrypt", "encrypted"), ("first_boot", "encrypted"),
                  ("images", "key burned"), ("key", "key burned"))
"""[security]: the furthest eFuse batch a board's row has seen done, as a word."""


def security_mark(row: BoardRow) -> str:
    """"locked" on a board that left the line locked; on a failed one, how far its
    irreversible steps went (a board with its key burned needs rework, not a new key)."""
    return next((word for step, word in SECURITY_MARKS if step in row.security), "")


def baud_text(row: BoardRow) -> Text:
    """The line rate; "↓" once this board stepped down, "slot↓" when it started at the
    lower rate its slot stepped down to on an earlier board (until a restart)."""
    line = row.line
    if line is None:
        return Text("")
    if line.baud is None:
        return Text("usb")
    if row.stepped:
        return Text(f"{line.baud} ↓", style="yellow")
    if line.remembered:
        return Text(f"{line.baud} slot↓", style="yellow")
    return Text(str(line.baud))


def registry_cloud_text(row: BoardRow) -> Text:
    """[registry] and [verify] cloud: "reg ✓ 1042 · mqtt ✓", what is pending, what failed."""
    marks = {"registered": ("✓", "green"), "already": ("✓ had it", "green"),
             "pending": ("…", "yellow"), "failed": ("✗", "red"), "ok": ("✓", "green"),
             "skipped": ("skipped", "cyan")}
    text = Text()
    if row.registry:
        mark, style = marks.get(row.registry, (row.registry, ""))
        text.append(f"reg {mark}" + (f" {row.registry_id}" if row.registry_id else ""),
                    style=style)
    if row.cloud:
        mark, style = marks.get(row.cloud, (row.cloud, ""))
        text.append(" · " if row.registry else "").append(f"mqtt {mark}", style=style)
    return text


BAR_WIDTH = 10


def progress_texts(row: BoardRow) -> list[Text]:
    """The wide last column, widest first: a bar, its percent and bytes while flashing,
    the outcome once final. Where the bytes do not fit, the bar and percent stay whole.

    One column for both, so a failed row's error gets the width the bar no longer needs.
    """
    if row.final:
        return [result_text(row)]
    note = result_text(row)
    if row.known:
        note = Text(row.known, style="cyan") + (Text("; ") + note if note else Text(""))
    total, done = row.bytes_total, row.bytes_done
    if not total:
        return [note]
    filled = BAR_WIDTH * done // total
    bar = Text("━" * filled, style="green").append("─" * (BAR_WIDTH - filled), style="grey37")
    bar.append(f" {100 * done // total:>3}%")
    full = bar.copy().append(f" {human_bytes(done)}/{human_bytes(total)}")
    return [t.append("  ").append_text(note) if note else t for t in (full, bar)]


def short_port(port: str, width: int = 18) -> str:
    """The end of a port's name: what tells sockets apart (`…1.2:1.0-port0`, `ttyUSB3`)."""
    name = port.rsplit("/", 1)[-1]
    return name if len(name) <= width else "…" + name[-(width - 1):]


# -- the table, fitted to the terminal's width ------------------------------------------

NAME = "MAC / thing"
RESULT = "progress / result"
REGISTRY = "registry / cloud"
RESULT_WANT = 36
"""Cells the last column gets before any other column drops or shortens: a bar with its
percent and bytes (29), `booted <project> <version>`; a longer error is cut at its end."""
NAME_WHOLE_MAC = 13  # "…" and a whole 12-digit MAC
NAME_LEAST = 8  # "…" and the MAC's last 7 digits

COLUMNS: dict[str, dict[str, Any]] = {
    "slot": {}, "port": {}, "chip": {}, NAME: {}, "stage": {},
    "elapsed": {"justify": "right"}, "speed": {"justify": "right"},
    "baud": {"justify": "right"}, REGISTRY: {"max_width": 24},
    RESULT: {"ratio": 1, "max_width": RESULT_WANT},
}
"""The columns, left to right (a column's max_width bounds what it asks for, not what it
gets: the last column takes all the width the others leave)."""

GIVE_WAY: tuple[str | int, ...] = ("port", "speed", "baud", NAME_WHOLE_MAC, "elapsed",
                                   REGISTRY, NAME_LEAST)
"""What gives way, in this order, while the table is wider than the terminal: a column
name drops that column, a number shortens MAC / thing in the middle to that many cells.
slot, chip, stage and progress / result never give way (at 80 columns all four are
whole: tests/test_dashboard_sizes.py)."""

UNBOUNDED = 10_000  # the width to measure a table at: what it asks for, not what it gets


def _cells(view: StationView, now: float) -> list[dict[str, RenderableType]]:
    """Each slot's row, by column, in natural slot order."""
    rows: list[dict[str, RenderableType]] = []
    for slot in sorted(view.rows, key=_slot_key):
        row = view.rows[slot]
        flag = view.flags.get(slot)
        results = progress_texts(row)
        if flag is not None:  # the slot's pattern first: the board's own error follows
            results = [Text(f"{flag_word(flag)}: {flag.hint} ({flag.reason})  ",
                            style="bold red").append_text(r) for r in results]
        speed = row.speed()
        who = row.thing if row.mac in row.thing else \
            f"{row.mac} / {row.thing}" if row.thing else row.mac
        rows.append({
            "slot": Text(f"{row.slot} !", style="bold red") if flag else Text(row.slot),
            "port": Text(short_port(row.port)),
            "chip": Text(row.chip),
            NAME: Tail(who, keep=row.mac),
            "stage": Text(row.stage.value + (f" #{row.attempt}" if row.attempt > 1 else ""),
                          style="red" if row.stage == Stage.FAILED else ""),
            "elapsed": Text(duration(row.elapsed(now))),
            "speed": Text(f"{human_bytes(speed)}/s" if speed is not None else ""),
            "baud": baud_text(row),
            RESULT: Choice(*results),
        })
        if view.registry or view.cloud:  # the column only on a line that has them
            rows[-1][REGISTRY] = registry_cloud_text(row)
    return rows


def _table(rows: list[dict[str, RenderableType]], shown: list[str],
           name_width: int | None) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, expand=True, pad_edge=False,
                  collapse_padding=True)
    for column in shown:
        if column == NAME:  # its header gives way too: "MAC" where "MAC / thing" is cut
            table.add_column(Choice(Text(NAME), Text("MAC")), no_wrap=True,
                             max_width=name_width)
        else:
            table.add_column(column, no_wrap=True, overflow="ellipsis", **COLUMNS[column])
    for row in rows:
        table.add_row(*(row[column] for column in shown))
    return table


class FittedTable:
    """The slot table for the width it is drawn at: rich measures it as it would lay it
    out, and while it is wider than the terminal, the next of GIVE_WAY gives way.

    rich alone shrinks every no_wrap column evenly (`esp3…`, `fl…`); this decides what
    goes first, and rich lays out what is left (the last column, ratio 1, takes the rest).
    """

    def __init__(self, rows: list[dict[str, RenderableType]]) -> None:
        self.rows = rows

    def table(self, console: Console, options: ConsoleOptions) -> Table:
        unbounded = options.update_width(UNBOUNDED)
        shown = [c for c in COLUMNS if c != REGISTRY or
                 any(REGISTRY in row for row in self.rows)]
        name_width = None
        table = _table(self.rows, shown, None)
        name_want = max([Measurement.get(console, unbounded, row[NAME]).maximum
                         for row in self.rows] + [len(NAME)])
        for step in GIVE_WAY:
            over = Measurement.get(console, unbounded, table).maximum - options.max_width
            if over <= 0:
                break
            if isinstance(step, str):
                if step not in shown:  # a column this line does not have
                    continue
                shown.remove(step)
            else:
                name_width = max(step, (name_width or name_want) - over)
            table = _table(self.rows, shown, name_width)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(console, options)


def render(view: StationView, now: float) -> RenderableType:
    """The whole screen from state alone: `now` comes in, no clock is read here. The
    footer names the station (no title line: 16 rows and the footer fit 24 lines)."""
    return Group(FittedTable(_cells(view, now)), footer(view, now))


def flag_word(flag: SlotFlagged) -> str:
    return "PARKED" if flag.parked else "FLAGGED"


def flag_line(view: StationView) -> Packed | None:
    """The footer's first line while a slot is flagged: the oldest flag, how to clear it."""
    if not view.flags:
        return None
    first, *others = sorted(view.flags.values(), key=lambda f: f.at)
    how = f"press {view.clear_key} to clear it, or " if view.clear_key else ""
    return Packed([f"! slot {first.slot} {flag_word(first)}: {first.hint} ({first.reason})",
                   f"{how}station slot clear {first.slot}",
                   f"also flagged: {', '.join(f.slot for f in others)}" if others else ""],
                  style="bold red")


def footer(view: StationView, now: float) -> Group:
    """Counts and the rate; who and what runs; then the central ledger, dead hubs.

    Each line is items joined by `  |  ` that move to the next line whole where the
    terminal is too narrow (fit.Packed), so none is cut in the middle of a number."""
    uptime = max(0.0, now - view.started_at)
    done = view.results[Stage.DONE.value]
    # From the first board done: over a short time the rate is rough, and still a rate.
    per_hour = f"{done * 3600 / uptime:.1f}" if done and uptime > 0 else "-"
    counts = (f"done {done}  failed {view.results[Stage.FAILED.value]}  "
              f"removed {view.results[Stage.REMOVED.value]}  "
              f"skipped {view.results[Stage.SKIPPED.value]}  in progress {view.in_progress}")
    lines: list[RenderableType] = [
        Packed([counts, f"{per_hour} boards/h"]),
        Packed([f"station {view.station}", f"up {duration(uptime)}",
                f"registrar {view.registrar}",
                *([f"registry {view.registry}"] if view.registry else []),
                *([f"cloud check {view.cloud}"] if view.cloud else []),
                f"firmware {view.firmware or '-'}"]),
    ]
    if view.central_line is not None:  # replication lag, or why the central ledger waits
        line, ok = view.central_line
        lines.append(Text(line, style="" if ok else "bold yellow", no_wrap=True,
                          overflow="ellipsis"))
    for hub in view.hubs.values():  # a dead hub host: its boards cannot even be seen
        if hub.state == "down":
            lines.append(Text(f"hub {hub.port} ({hub.slot}) unreachable: {hub.detail}",
                              style="bold yellow", no_wrap=True, overflow="ellipsis"))
    flagged = flag_line(view)
    return Group(*([flagged] if flagged is not None else []), *lines)


class LiveDashboard:
    """rich Live over a StationView: redraws 4 times a second from its own thread."""

    def __init__(self, view: StationView, console: Console | None = None,
                 refresh_per_second: float = 4) -> None:
        self.view = view
        self.live = Live(get_renderable=self.renderable, console=console,
                         refresh_per_second=refresh_per_second)

    def renderable(self) -> RenderableType:
        return render(self.view.snapshot(), time.time())

    def start(self) -> None:
        self.live.start(refresh=True)

    def stop(self) -> None:
        self.live.stop()

    def __enter__(self) -> LiveDashboard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
