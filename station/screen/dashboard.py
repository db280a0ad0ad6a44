"""The live table: a row per slot, a footer, redrawn by rich four times a second.

`render(view, now)` is a pure function of the view's state (view.py) and the time passed
in, so tests render it into a fixed-width Console and compare text.
"""

from __future__ import annotations

import re
import time

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from station.events import SlotFlagged, Stage
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
    """The last column: the outcome, or why a board in progress is waiting."""
    if row.stage == Stage.DONE:
        return Text("done" + (f", booted {row.booted}" if row.booted else ""), style="green")
    if row.stage == Stage.FAILED:  # the stage column already says "failed"
        where = f"at {row.failed_stage.value}: " if row.failed_stage else ""
        return Text(one_line(f"{where}{row.error or 'no reason given'}"), style="red")
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
    return Text("")


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


def progress_text(row: BoardRow) -> Text:
    """The wide last column: a bar and bytes while flashing, the outcome once final.

    One column for both, so a failed row's error gets the width the bar no longer needs.
    """
    if row.final:
        return result_text(row)
    total, done = row.bytes_total, row.bytes_done
    text = Text()
    if total:
        filled = BAR_WIDTH * done // total
        text.append("━" * filled, style="green")
        text.append("─" * (BAR_WIDTH - filled), style="grey37")
        text.append(f" {100 * done // total:>3}% {human_bytes(done)}/{human_bytes(total)}")
    note = result_text(row)
    if row.known:
        note = Text(row.known, style="cyan") + (Text("; ") + note if note else Text(""))
    if note:
        text.append("  " if total else "").append_text(note)
    return text


def short_port(port: str, width: int = 18) -> str:
    """The end of a port's name: what tells sockets apart (`…1.2:1.0-port0`, `ttyUSB3`)."""
    name = port.rsplit("/", 1)[-1]
    return name if len(name) <= width else "…" + name[-(width - 1):]


def render(view: StationView, now: float) -> RenderableType:
    """The whole screen from state alone: `now` comes in, no clock is read here."""
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, collapse_padding=True,
                  title=f"station {view.station}", title_justify="left")
    table.add_column("slot", no_wrap=True)
    table.add_column("port", no_wrap=True, max_width=18)
    table.add_column("chip", no_wrap=True)
    table.add_column("MAC / thing", no_wrap=True, overflow="ellipsis", max_width=28)
    table.add_column("stage", no_wrap=True)
    table.add_column("elapsed", no_wrap=True, justify="right")
    table.add_column("speed", no_wrap=True, justify="right")
    table.add_column("baud", no_wrap=True, justify="right")
    extra = bool(view.registry or view.cloud)  # the column only on a line that has them
    if extra:
        table.add_column("registry / cloud", no_wrap=True, overflow="ellipsis", max_width=24)
    table.add_column("progress / result", no_wrap=True, overflow="ellipsis", ratio=1)
    for slot in sorted(view.rows, key=_slot_key):
        row = view.rows[slot]
        who = row.thing if row.mac in row.thing else \
            f"{row.mac} / {row.thing}" if row.thing else row.mac
        speed = row.speed()
        flag = view.flags.get(slot)
        result = progress_text(row)
        if flag is not None:  # the slot's pattern first: the board's own error follows
            result = Text(f"{flag_word(flag)}: {flag.hint} ({flag.reason})  ",
                          style="bold red").append_text(result)
        table.add_row(
            Text(f"{row.slot} !", style="bold red") if flag else row.slot,
            short_port(row.port), row.chip, who,
            Text(row.stage.value + (f" #{row.attempt}" if row.attempt > 1 else ""),
                 style="red" if row.stage == Stage.FAILED else ""),
            duration(row.elapsed(now)),
            f"{human_bytes(speed)}/s" if speed is not None else "",
            baud_text(row),
            *((registry_cloud_text(row),) if extra else ()),
            result,
        )
    return Group(table, footer(view, now))


def flag_word(flag: SlotFlagged) -> str:
    return "PARKED" if flag.parked else "FLAGGED"


def flag_line(view: StationView) -> Text | None:
    """The footer's first line while a slot is flagged: the oldest flag, how to clear it."""
    if not view.flags:
        return None
    first, *others = sorted(view.flags.values(), key=lambda f: f.at)
    how = f"press {view.clear_key} to clear it, or " if view.clear_key else ""
    text = Text(f"! slot {first.slot} {flag_word(first)}: {first.hint} ({first.reason})  |  "
                f"{how}station slot clear {first.slot}", style="bold red")
    if others:
        text.append(f"  |  also flagged: {', '.join(f.slot for f in others)}")
    return text


def footer(view: StationView, now: float) -> Text:
    uptime = max(0.0, now - view.started_at)
    done = view.results[Stage.DONE.value]
    # Over the first minute a rate is noise.
    per_hour = f"{done * 3600 / uptime:.1f}" if uptime >= 60 else "-"
    counts = (f"done {done}  failed {view.results[Stage.FAILED.value]}  "
              f"removed {view.results[Stage.REMOVED.value]}  "
              f"skipped {view.results[Stage.SKIPPED.value]}  in progress {view.in_progress}")
    text = Text(f"{counts}  |  {per_hour} boards/h  |  up {duration(uptime)}\n"
                f"station {view.station}  |  firmware {view.firmware or '-'}  |  "
                f"registrar {view.registrar}" +
                (f"  |  registry {view.registry}" if view.registry else "") +
                (f"  |  cloud check {view.cloud}" if view.cloud else ""),
                no_wrap=True, overflow="ellipsis")
    if view.central_line is not None:  # replication lag, or why the central ledger waits
        line, ok = view.central_line
        text.append("\n").append(line, style="" if ok else "bold yellow")
    for hub in view.hubs.values():  # a dead hub host: its boards cannot even be seen
        if hub.state == "down":
            text.append(f"\nhub {hub.port} ({hub.slot}) unreachable: {hub.detail}",
                        style="bold yellow")
    flagged = flag_line(view)
    return text if flagged is None else Text("\n", no_wrap=True, overflow="ellipsis").join(
        [flagged, text])



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
