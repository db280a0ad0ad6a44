"""Slot health: tell a bad slot (cable, hub port, bridge) from a bad board.

Why it looks like this:
- A failed board's row is overwritten by the next board on its slot, so a worn cable that
  fails board after board looks like bad luck on the dashboard. The pattern lives in the
  sequence of results per slot, so this keeps, per slot, the last `window` results (the
  stage a board failed at, or None for done) and flags the slot when either rule of
  `[ports.health]` holds *at one stage*: `consecutive` failures in a row, or
  `failures_in_window` of the last `window` boards. One stage, because a slot whose
  boards fail at connect, then flash, then verify is more likely to be a bad batch of
  boards than a bad cable; and the stage is what tells the operator what to check.
- Removed and skipped boards say nothing about the slot (a hand pulled the board; the
  ledger had it done), so they neither count as failures nor break a run of them.
- It is pure state: `observe(event)` returns the SlotFlagged or SlotCleared event to
  emit, and the caller (station/health/slotpark.py) emits it. The thresholds come in, the clock
  comes with the events, so tests feed it events and compare.
- A flag stays until an operator clears it; only when slots are not parked does a board
  done on the slot clear it by itself ("recovered"), since then boards keep running there
  and a good one shows the fault went away. A parked slot takes no boards and so cannot
  recover: the operator fixes the cable and clears it.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from station.config import HealthSection
from station.events import Event, JobFinished, SlotCleared, SlotFlagged, Stage

HINTS: dict[Stage, str] = {
    Stage.CONNECT: "check the cable or the hub port",
    Stage.IDENTIFY: "check the cable; a board that answers but cannot be read may sit "
                    "in a bad socket",
    Stage.REGISTER: "check the registrar (cloud or CA): the slot itself is rarely the cause",
    Stage.REGISTRY: "check the device registry ([registry]): the slot is not the cause",
    Stage.CLOUD: "check the broker, its policy and CA ([verify] cloud): not the slot",
    Stage.FLASH: "check the cable and the hub's power supply",
    Stage.VERIFY: "check power: the hub's supply or the cable's voltage drop",
    Stage.RESET: "check the reset lines: the bridge's DTR/RTS or the board's auto-reset",
}


def hint(stage: Stage) -> str:
    """What the operator should look at, for failures at `stage`."""
    return f"fails at {stage.value}: {HINTS.get(stage, 'check the cable and the hub port')}"


@dataclass
class _Slot:
    recent: deque[Stage | None]  # failed stage per board, None for done; newest last
    flag: SlotFlagged | None = None


@dataclass
class SlotHealth:
    """Per-slot results and flags; `observe` every event, emit what it returns."""

    rules: HealthSection
    station: str
    park: bool = False
    slots: dict[str, _Slot] = field(default_factory=dict)

    @property
    def flagged(self) -> dict[str, SlotFlagged]:
        """Slot -> its flag, for every slot flagged now."""
        return {name: s.flag for name, s in self.slots.items() if s.flag is not None}

    def parked(self, slot: str) -> bool:
        """No new job may start on `slot`."""
        s = self.slots.get(slot)
        return self.park and s is not None and s.flag is not None

    def _slot(self, name: str) -> _Slot:
        if name not in self.slots:
            self.slots[name] = _Slot(deque(maxlen=max(self.rules.window,
                                                      self.rules.consecutive, 1)))
        return self.slots[name]

    def observe(self, event: Event) -> SlotFlagged | SlotCleared | None:
        """The flag to raise or drop because of `event`, or None."""
        if not isinstance(event, JobFinished) or not event.slot:
            return None
        if event.result == Stage.DONE:
            outcome: Stage | None = None
        elif event.result == Stage.FAILED:
            outcome = event.failed_stage or Stage.CONNECT
        else:  # removed, skipped: nothing about the slot
            return None
        slot = self._slot(event.slot)
        slot.recent.append(outcome)
        if slot.flag is not None:
            if outcome is None and not self.park:
                slot.flag = None
                slot.recent.clear()
                return SlotCleared(job_id=event.job_id, port=event.port, slot=event.slot,
                                   at=event.at, station=self.station, by="recovered")
            return None
        if outcome is None:
            return None
        reason = self._breach(slot.recent, outcome)
        if reason is None:
            return None
        slot.flag = SlotFlagged(job_id=event.job_id, port=event.port, slot=event.slot,
                                at=event.at, station=self.station, stage=outcome,
                                reason=reason, hint=hint(outcome), parked=self.park)
        return slot.flag

    def _breach(self, recent: deque[Stage | None], stage: Stage) -> str | None:
        rules = self.rules
        run = 0
        for outcome in reversed(recent):
            if outcome != stage:
                break
            run += 1
        if rules.consecutive and run >= rules.consecutive:
            return f"{run} in a row"
        if rules.failures_in_window and rules.window:
            last = list(recent)[-rules.window:]
            n = Counter(last)[stage]
            if n >= rules.failures_in_window:
                return f"{n} of the last {len(last)}"
        return None

    def restore(self, flag: SlotFlagged) -> None:
        """A flag the ledger still holds open from an earlier run: the slot stays flagged."""
        self._slot(flag.slot).flag = flag

    def clear(self, slot: str, by: str, at: float) -> SlotCleared | None:
        """The operator cleared `slot`: its flag and its history go (a fixed cable starts
        with a clean slate). None if it was not flagged."""
        s = self.slots.get(slot)
        if s is None or s.flag is None:
            return None
        s.flag = None
        s.recent.clear()
        return SlotCleared(job_id="", port="", slot=slot, at=at, station=self.station, by=by)
