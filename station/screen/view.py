"""The station as its events describe it: one row per slot, the flags, the hubs.

The UI reads state, it never owns it: `StationView` is built only from the events the
workers emit (`view.apply(event)`). rich's `Live` redraws from its own thread while the
event loop applies events, so the view takes a lock in `apply` and Live renders from
`view.snapshot()`, a private copy. The live table (dashboard.py) and the headless lines
(lines.py) both read it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from station.events import (
    BootChecked,
    ButtonsNeeded,
    CloudChecked,
    Event,
    HubStatus,
    Identified,
    JobFinished,
    JobStarted,
    KnownBoard,
    LineRate,
    Progress,
    Registered,
    RegistryStep,
    Retrying,
    SecurityStep,
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
    registry: str = ""  # [registry]: "pending", "registered", "already", "failed"
    registry_id: str = ""  # the id in the registry's answer
    cloud: str = ""  # [verify] cloud: "ok", "failed", "skipped"
    security: list[str] = field(default_factory=list)  # [security]: the eFuse batches done
    securing: str = ""  # [security]: the batch under way ("key before"), or failed
    region: str = ""
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    prev_done: int | None = None  # the current region's bytes before the last Progress
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))
    line: LineRate | None = None  # the latest rate (ports/baud.py)
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
                                   samples=deque(ends, maxlen=256), stepped=list(self.stepped),
                                   security=list(self.security))

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
    registry: str = ""  # [registry] kind ("" = none): the dashboard's registry / cloud column
    cloud: str = ""  # [verify] cloud mode ("" = off)
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
        elif isinstance(event, RegistryStep):
            row.registry = event.step
            row.registry_id = event.device_id or row.registry_id
        elif isinstance(event, CloudChecked):
            row.cloud = event.result
        elif isinstance(event, SecurityStep):
            if event.phase == "after" and event.step not in row.security:
                row.security.append(event.step)
            row.securing = "" if event.phase == "after" else f"{event.step} {event.phase}"
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
                               registrar=self.registrar, registry=self.registry,
                               cloud=self.cloud, started_at=self.started_at,
                               rows={k: r.copy() for k, r in self.rows.items()},
                               results=Counter(self.results), flags=dict(self.flags),
                               clear_key=self.clear_key, central_line=line,
                               hubs=dict(self.hubs))

    @property
    def in_progress(self) -> int:
        return sum(1 for row in self.rows.values() if not row.final)


def one_line(text: str) -> str:
    """A board's error or reason on one line: a row, or a log line, holds one."""
    return " ".join(text.split())
