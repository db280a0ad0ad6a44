"""What the operator sees: a live table of slots, or one log line per event.

The UI reads state, it never owns it: `StationView` is built only from the events the
workers emit (`view.apply(event)`), and `render(view, now)` is a pure function of that
state and the time passed in, so tests render it into a fixed-width Console and compare
text. rich's `Live` redraws from its own thread while the event loop applies events, so
the view takes a lock in `apply` and Live renders from `view.snapshot()`, a private copy.

Headless (no terminal, `--headless`, systemd): `HeadlessLog` writes `format_event`'s
line per event; Progress only where a region starts or ends and at each quarter, so a
night's log stays readable.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Protocol

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from station.events import (
    BootChecked,
    ButtonsNeeded,
    Event,
    HubStatus,
    Identified,
    JobFinished,
    JobStarted,
    KnownBoard,
    LineRate,
    Progress,
    Registered,
    RegistrationStep,
    Retrying,
    SlotCleared,
    SlotFlagged,
    Stage,
    StageChanged,
    Throttled,
)

SPEED_WINDOW = 3.0  # seconds of Progress samples behind the speed column


class Display(Protocol):
    """A best-effort consumer (the Bus's `displays`): called on the loop, must not block."""

    def show(self, event: Event) -> None: ...


@dataclass
class BoardRow:
    """One slot's latest job, as far as events tell; kept after the job ends."""

    slot: str
    port: str = ""
    job_id: str = ""
    chip: str = ""
    mac: str = ""
    thing: str = ""
    stage: Stage = Stage.CONNECT
    attempt: int = 1
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    failed_stage: Stage | None = None
    retry_reason: str | None = None
    throttled: bool = False
    known: str = ""  # "provisioned by line-2 on ..." (the central ledger)
    booted: str = ""  # "blinky 2.0.1": what the board said it runs ([verify] boot)
    buttons: bool = False  # waiting for a person to press BOOT + EN
    region: str = ""
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    prev_done: int | None = None  # the current region's bytes before the last Progress
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))
    line: LineRate | None = None  # the latest rate (station/baud.py)
    stepped: list[str] = field(default_factory=list)  # "2000000->921600: why", this job

    @property
    def final(self) -> bool:
        return self.stage.final

    @property
    def bytes_done(self) -> int:
        return sum(done for done, _ in self.regions.values())

    @property
    def bytes_total(self) -> int:
        """Of the regions started so far: events do not announce the regions ahead."""
        return sum(total for _, total in self.regions.values())

    def speed(self) -> float | None:
        """Bytes per second over the last SPEED_WINDOW seconds of Progress."""
        if self.final or len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def copy(self) -> BoardRow:
        """Cheap private copy: speed needs only the window's first and last sample."""
        ends = [self.samples[0], self.samples[-1]] if self.samples else []
        return dataclasses.replace(self, regions=dict(self.regions),
                                   samples=deque(ends, maxlen=256), stepped=list(self.stepped))

    def elapsed(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at if self.finished_at is not None else now) - self.started_at


@dataclass
class StationView:
    """The station as the events describe it; `apply` on the loop, `snapshot` anywhere."""

    station: str = "station"
    firmware: str = ""
    registrar: str = "none"
    started_at: float = field(default_factory=time.time)
    rows: dict[str, BoardRow] = field(default_factory=dict)
    results: Counter[str] = field(default_factory=Counter)
    flags: dict[str, SlotFlagged] = field(default_factory=dict)  # slot health, by slot
    clear_key: str = ""  # the key that clears the footer's flag, when keys are read
    central: Callable[[float], tuple[str, bool]] | None = None
    """The central ledger's footer line and whether all is well; read at snapshot time."""
    central_line: tuple[str, bool] | None = None
    hubs: dict[str, HubStatus] = field(default_factory=dict)  # remote ports, by URL
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def apply(self, event: Event) -> None:
        with self._lock:
            self._apply(event)

    def show(self, event: Event) -> None:
        """The Display interface: same as `apply`."""
        self.apply(event)

    def _apply(self, event: Event) -> None:
        if isinstance(event, HubStatus):  # about a hub connection, not a job
            self.hubs[event.port] = event
            return
        if isinstance(event, SlotFlagged | SlotCleared):  # about the slot, not its job
            if isinstance(event, SlotFlagged):
                self.flags[event.slot] = event
            else:
                self.flags.pop(event.slot, None)
            return
        row = self.rows.get(event.slot)
        if isinstance(event, JobStarted) or row is None:
            row = BoardRow(slot=event.slot, port=event.port, job_id=event.job_id,
                           started_at=event.at)
            self.rows[event.slot] = row
        elif row.job_id != event.job_id:
            return  # a late event of the slot's previous job
        if isinstance(event, StageChanged):
            row.stage, row.attempt, row.throttled = event.stage, event.attempt, False
        elif isinstance(event, Identified):
            row.chip, row.mac, row.thing = event.chip, event.mac, event.thing_name
        elif isinstance(event, Progress):
            row.prev_done = row.regions[event.region][0] if event.region in row.regions \
                else None
            row.region = event.region
            row.regions[event.region] = (event.done, event.total)
            row.samples.append((event.at, row.bytes_done))
            while row.samples and row.samples[0][0] < event.at - SPEED_WINDOW:
                row.samples.popleft()
        elif isinstance(event, Retrying):
            row.attempt, row.retry_reason = event.attempt, event.reason
            row.buttons = False  # a new attempt resets the board again
            row.regions.clear()
            row.samples.clear()
        elif isinstance(event, Throttled):
            row.throttled = True
        elif isinstance(event, KnownBoard):
            row.known = event.note
        elif isinstance(event, ButtonsNeeded):
            row.buttons = event.waiting
        elif isinstance(event, BootChecked):
            row.booted = " ".join(p for p in (event.project, event.version) if p)
        elif isinstance(event, LineRate):
            row.line = event
            if event.stepped_from is not None:
                row.stepped.append(f"{event.stepped_from}->{event.baud}: {event.reason}")
        elif isinstance(event, Registered):
            row.thing, row.throttled = event.thing_name, False
        elif isinstance(event, JobFinished):
            row.stage, row.error, row.failed_stage = event.result, event.error, \
                event.failed_stage
            row.finished_at, row.throttled = event.at, False
            self.results[event.result.value] += 1

    def snapshot(self) -> StationView:
        """A private deep copy for another thread to render while events keep coming."""
        line = self.central(time.time()) if self.central is not None else self.central_line
        with self._lock:
            return StationView(station=self.station, firmware=self.firmware,
                               registrar=self.registrar, started_at=self.started_at,
                               rows={k: r.copy() for k, r in self.rows.items()},
                               results=Counter(self.results), flags=dict(self.flags),
                               clear_key=self.clear_key, central_line=line,
                               hubs=dict(self.hubs))

    @property
    def in_progress(self) -> int:
        return sum(1 for row in self.rows.values() if not row.final)


# -- formatting helpers (pure) ----------------------------------------------------------


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def result_text(row: BoardRow) -> Text:
    """The last column: the outcome, or why a board in progress is waiting."""
    if row.stage == Stage.DONE:
        return Text("done" + (f", booted {row.booted}" if row.booted else ""), style="green")
    if row.stage == Stage.FAILED:  # the stage column already says "failed"
        where = f"at {row.failed_stage.value}: " if row.failed_stage else ""
        return Text(_one_line(f"{where}{row.error or 'no reason given'}"), style="red")
    if row.stage == Stage.REMOVED:
        where = f" during {row.failed_stage.value}" if row.failed_stage else ""
        return Text(f"removed{where}", style="yellow")
    if row.stage == Stage.SKIPPED:
        return Text(_one_line(f"skipped: {row.error or 'already done with this firmware'}"),
                    style="cyan")
    if row.buttons:
        return Text("press BOOT + EN (no auto-reset)", style="bold yellow")
    if row.throttled:
        return Text("throttled by the cloud, waiting", style="yellow")
    if row.retry_reason:
        return Text(_one_line(f"attempt {row.attempt} after: {row.retry_reason}"),
                    style="yellow")
    if row.stepped:
        return Text(_one_line(f"stepped down {row.stepped[-1]}"), style="yellow")
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
                f"registrar {view.registrar}", no_wrap=True, overflow="ellipsis")
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


# -- headless ---------------------------------------------------------------------------


def _quarter(done: int, total: int) -> int:
    return 4 * done // total if total else 0


def format_event(event: Event, view: StationView) -> str | None:
    """One log line for `event`, or None for Progress between quarters.

    Call it after `view.apply(event)`: the row tells where the region was before.
    """
    if isinstance(event, HubStatus):
        return f"hub {event.port}: {event.state}" + (f" ({event.detail})" if event.detail
                                                      else "")
    row = view.rows.get(event.slot)
    if row is not None and row.job_id != event.job_id:
        row = None
    mac = event.mac if isinstance(event, Identified | RegistrationStep) else \
        (row.mac if row and row.mac else "-")
    head = f"{iso(event.at)} {event.slot} {event.port} {mac}"
    if isinstance(event, Progress):
        prev = row.prev_done if row else None
        if not (prev is None or event.done >= event.total
                or _quarter(event.done, event.total) > _quarter(prev, event.total)):
            return None
        return f"{head} flash {event.region} {event.done}/{event.total} B"
    if isinstance(event, ButtonsNeeded):
        return f"{head} " + ("press BOOT + EN: no download mode after the reset sequence"
                             if event.waiting else "in download mode")
    if isinstance(event, BootChecked) and event.result == "skipped":
        return f"{head} boot check skipped ({event.detail})"
    if isinstance(event, BootChecked):
        said = " ".join(p for p in (event.project, event.version) if p) or "nothing we know"
        return f"{head} boot check {event.result}: booted {said}" + (
            f" ({event.detail})" if event.detail else "")
    if isinstance(event, JobStarted):
        return f"{head} started job {event.job_id}"
    if isinstance(event, StageChanged):
        return f"{head} {event.stage.value}" + (
            f" (attempt {event.attempt})" if event.attempt > 1 else "")
    if isinstance(event, Identified):
        return f"{head} identified {event.chip} as {event.thing_name}"
    if isinstance(event, Retrying):
        return f"{head} retrying {event.stage.value} (attempt {event.attempt}): " \
               f"{_one_line(event.reason)}"
    if isinstance(event, Throttled):
        return f"{head} throttled by {event.api}, waiting"
    if isinstance(event, KnownBoard):
        return f"{head} {event.note} (on_known_board = {event.policy})"
    if isinstance(event, LineRate):
        if event.stepped_from is not None:
            return f"{head} stepped down {event.stepped_from} -> {event.baud} baud: " \
                   f"{_one_line(event.reason or '')}"
        rate = "baud unchanged (native USB)" if event.baud is None else f"{event.baud} baud"
        why = f", {_one_line(event.reason)}" if event.remembered and event.reason else ""
        return f"{head} line {rate} ({event.adapter}{why})"
    if isinstance(event, RegistrationStep):
        cert = f" {event.certificate_id}" if event.certificate_id else ""
        return f"{head} registration {event.step}{cert}"
    if isinstance(event, Registered):
        return f"{head} registered {event.thing_name} ({event.registrar})"
    if isinstance(event, SlotFlagged):
        parked = f"; parked until cleared (station slot clear {event.slot})" \
            if event.parked else ""
        return f"{head} slot flagged ({event.reason}): {event.hint}{parked}"
    if isinstance(event, SlotCleared):
        return f"{head} slot cleared ({event.by})"
    if isinstance(event, JobFinished):
        took = event.at - row.started_at if row and row.started_at is not None else \
            sum(event.timings.values())
        if event.result == Stage.DONE:
            return f"{head} done in {took:.1f}s"
        where = event.failed_stage.value if event.failed_stage else "?"
        if event.result == Stage.FAILED:
            return f"{head} failed at {where}: {_one_line(event.error or 'no reason given')}"
        if event.result == Stage.REMOVED:
            return f"{head} removed during {where}"
        return f"{head} {event.result.value}"
    return f"{head} {type(event).__name__}"


class HeadlessLog:
    """Log lines on a stream; put it after `view.apply` in the Bus's displays."""

    def __init__(self, view: StationView, stream: IO[str]) -> None:
        self.view = view
        self.stream = stream

    def show(self, event: Event) -> None:
        line = format_event(event, self.view)
        if line is not None:
            self.stream.write(line + "\n")
            self.stream.flush()


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
