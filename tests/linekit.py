"""An operator at a virtual line, for soak-style tests of slot health and the report.

`Operator` keeps the rig's slots busy the way a person does: once the ledger has a board's
final row, it pulls the board out, waits until the station has seen the port go (its
log says so: a new pty may reuse the old device node), and plugs the next board into
the same hub port. `faults(index, n)` decides what the n-th board of a hub port is like.
The ledger is read read-only (WAL lets it be read while the station writes).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from station.sim import Faults, PluggedBoard, Rig, by_path_name

POLL = 0.1
"""Seconds between two looks at the ledger and the log (a polling interval)."""


def finished_per_port(ledger: Path) -> dict[str, int]:
    if not ledger.exists():
        return {}
    conn = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT port, count(*) FROM jobs WHERE finished_at IS NOT NULL "
                            "GROUP BY port").fetchall()
    except sqlite3.OperationalError:  # the station has not made its tables yet
        return {}
    finally:
        conn.close()
    return {port: n for port, n in rows}


@dataclass
class _Hub:
    board: PluggedBoard | None = None
    plugged: int = 0  # boards plugged into this hub port so far
    unplugged: int = 0
    jobs_expected: int = 0  # boards here the station took (a parked slot's board: not yet)


@dataclass
class Operator:
    rig: Rig
    state: Path  # the station's state_dir
    slots: int = 16
    faults: Callable[[int, int], Faults] = lambda _i, _n: Faults()
    hubs: dict[int, _Hub] = field(default_factory=dict)
    budget: int | None = None  # boards to plug in all; None: no limit
    total: int = 0
    holding: set[int] = field(default_factory=set)  # hub ports the operator leaves alone

    def start(self) -> None:
        for index in range(self.slots):
            self.hubs[index] = _Hub()
            self._plug(index)

    def _plug(self, index: int) -> None:
        if self.budget is not None and self.total >= self.budget:
            return
        hub = self.hubs[index]
        hub.board = self.rig.plug(index=index, faults=self.faults(index, hub.plugged))
        hub.plugged += 1
        self.total += 1

    def _removals(self) -> str:
        log = self.state / "station.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def step(self) -> None:
        """One look: replace every board whose job has ended."""
        finished = finished_per_port(self.state / "ledger.sqlite3")
        log: str | None = None
        for index, hub in self.hubs.items():
            if index in self.holding:
                continue
            port = self.rig.directory / by_path_name(index)
            if hub.board is not None and finished.get(str(port), 0) >= hub.plugged:
                self.rig.unplug(hub.board)
                hub.board = None
                hub.unplugged += 1
            if hub.board is None:
                log = self._removals() if log is None else log
                if log.count(f"port removed: {port}") >= hub.unplugged:
                    self._plug(index)

    def run_until(self, what: str, done: Callable[[], bool], timeout: float,
                  alive: Callable[[], bool] = lambda: True) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if not alive():
                raise AssertionError(f"the station exited before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            self.step()
            time.sleep(POLL)  # the polling interval of a deadline-bound wait


def sixteen_slots() -> str:
    """[ports.slots] lines naming hub ports 1-16 A1..A8, B1..B8, as a line labels a bench."""
    return "\n".join(f'"usb-0:1.{i + 1}" = "{"AB"[i // 8]}{i % 8 + 1}"' for i in range(16))
