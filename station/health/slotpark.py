"""Slot health wired into a running station: flag, park, and clear from anywhere.

Why it looks like this:
- SlotHealth (station/health/slothealth.py) is pure; this is its one place of contact with the
  station. It is a *durable* consumer of the Bus: the flag it raises on a board's
  JobFinished is emitted (ledger, event log, dashboard) before that JobFinished reaches
  the daemon's observers, so by the time the daemon could take another board on the
  slot, the slot is already parked. Workers know nothing of it.
- The daemon asks only `parked(slot)` and hears `on_cleared(slot)`, so it never imports
  this module and the worker stays free of it.
- Clears come from two places: a key on the dashboard (this process) and
  `station slot clear` (another process, which cannot take the state dir's lock). Both
  end as a closed row in the ledger's `slot_flags`: the CLI writes it directly, and
  `watch()` polls the open flags once a second and unparks a slot whose row was closed.
  A read is queued behind every write already submitted (one writer thread, FIFO), so a
  flag raised before the poll's read is always in it: the poll compares against the
  slots flagged *before* it asked, and never mistakes a fresh flag for a cleared one.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO

from station.events import Event, SlotCleared, SlotFlagged
from station.health.slothealth import SlotHealth
from station.record import Ledger, iso

log = logging.getLogger("station.slots")

POLL_INTERVAL = 1.0
"""Seconds between two looks at the ledger for flags cleared by `station slot clear`."""


class SlotGuard:
    """Flags slots from JobFinished events, parks them, and clears them on request."""

    def __init__(self, health: SlotHealth, emit: Callable[[Event], Awaitable[None]],
                 open_flags: Callable[[], Awaitable[list[SlotFlagged]]],
                 show: Callable[[Event], None] = lambda _e: None) -> None:
        self.health = health
        self._emit = emit
        self._open_flags = open_flags
        self._show = show
        self.on_cleared: list[Callable[[str], None]] = []
        self._tasks: set[asyncio.Task[bool]] = set()

    def parked(self, slot: str) -> bool:
        return self.health.parked(slot)

    async def record(self, event: Event) -> None:
        """The Bus's durable consumer: raise (or drop) a slot's flag after a board's end."""
        change = self.health.observe(event)
        if change is None:
            return
        if isinstance(change, SlotFlagged):
            log.warning("slot %s flagged (%s, %s)%s", change.slot, change.reason, change.hint,
                        "; parked until cleared" if change.parked else "")
        await self._emit(change)
        if isinstance(change, SlotCleared):
            self._cleared(change)

    async def restore(self) -> None:
        """At start: flags an earlier run left open stay (a restart is not a repair)."""
        for flag in await self._open_flags():
            self.health.restore(flag)
            self._show(flag)
            log.warning("slot %s is still flagged from %s (%s); clear it with "
                        "`station slot clear %s`", flag.slot, time.strftime(
                            "%Y-%m-%d %H:%M", time.gmtime(flag.at)), flag.hint, flag.slot)

    async def clear(self, slot: str, by: str) -> bool:
        change = self.health.clear(slot, by=by, at=time.time())
        if change is None:
            return False
        log.warning("slot %s cleared (%s)", slot, by)
        await self._emit(change)
        self._cleared(change)
        return True

    def clear_first(self, by: str = "dashboard") -> str | None:
        """The dashboard's key: clear the oldest flag (the one its footer names). Called on
        the event loop; returns the slot, or None if no slot is flagged."""
        flags = sorted(self.health.flagged.values(), key=lambda f: f.at)
        if not flags:
            return None
        task = asyncio.get_running_loop().create_task(self.clear(flags[0].slot, by))
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return flags[0].slot

    def _done(self, task: asyncio.Task[bool]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("clearing a slot failed: %s", task.exception())

    def _cleared(self, change: SlotCleared) -> None:
        for callback in self.on_cleared:
            callback(change.slot)

    async def watch(self) -> None:
        """Forever: unpark the slots whose flag `station slot clear` closed in the ledger."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            before = set(self.health.flagged)
            if not before:
                continue
            try:
                still = {flag.slot for flag in await self._open_flags()}
            except Exception as e:  # the ledger's own errors reach the boards' rows
                log.error("cannot read slot flags from the ledger: %s", e)
                continue
            for slot in sorted(before - still):
                await self.clear(slot, "cli")


def slot_command(ledger: Ledger, action: str, slot: str | None, out: IO[str]) -> int:
    """`station slot list` and `station slot clear SLOT`: the ledger is the channel (see
    the module's docstring); a running station unparks the slot within POLL_INTERVAL."""
    flags = ledger.open_flags()
    if action == "list":
        if not flags:
            print("no slot is flagged", file=out)
        for flag in flags:
            state = "parked" if flag.parked else "flagged"
            print(f"{flag.slot}  {state} since {iso(flag.at)}  {flag.hint} ({flag.reason})",
                  file=out)
        return 0
    flagged = ", ".join(f.slot for f in flags) or "none"
    if not slot:
        print(f"station: slot clear: name the slot to clear (flagged: {flagged})",
              file=sys.stderr)
        return 2
    if not ledger.clear_flag(slot, "cli"):
        print(f"station: slot clear: slot {slot!r} is not flagged (flagged: {flagged})",
              file=sys.stderr)
        return 2
    print(f"slot {slot} cleared; a running station takes boards on it again", file=out)
    return 0
