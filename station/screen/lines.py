"""Headless (no terminal, `--headless`, systemd): one log line per event.

`HeadlessLog` writes `format_event`'s line per event; Progress only where a region starts
or ends and at each quarter, so a night's log stays readable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import IO

from station.events import (
    BootChecked,
    ButtonsNeeded,
    CloudChecked,
    CredentialsOnBoard,
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
    RegistryStep,
    Retrying,
    SecurityStep,
    SlotCleared,
    SlotFlagged,
    Stage,
    StageChanged,
    Throttled,
)
from station.screen.view import StationView, one_line


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

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
    mac = event.mac if isinstance(event, Identified | RegistrationStep | RegistryStep |
                                  SecurityStep) else \
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
               f"{one_line(event.reason)}"
    if isinstance(event, Throttled):
        return f"{head} throttled by {event.api}, waiting"
    if isinstance(event, KnownBoard):
        return f"{head} {event.note} (on_known_board = {event.policy})"
    if isinstance(event, LineRate):
        if event.stepped_from is not None:
            return f"{head} stepped down {event.stepped_from} -> {event.baud} baud: " \
                   f"{one_line(event.reason or '')}"
        rate = "baud unchanged (native USB)" if event.baud is None else f"{event.baud} baud"
        why = f", {one_line(event.reason)}" if event.remembered and event.reason else ""
        return f"{head} line {rate} ({event.adapter}{why})"
    if isinstance(event, RegistrationStep):
        cert = f" {event.certificate_id}" if event.certificate_id else ""
        return f"{head} registration {event.step}{cert}"
    if isinstance(event, RegistryStep):
        said = f" ({one_line(event.detail)})" if event.detail and event.step == "failed" else ""
        device = f" id {event.device_id}" if event.device_id else ""
        return f"{head} registry {event.step} {event.method} {event.url}{device}{said}"
    if isinstance(event, CloudChecked):
        why = f" ({one_line(event.detail)})" if event.detail else ""
        return f"{head} cloud check {event.mode} {event.result} as {event.client_id} at " \
               f"{event.broker}{why}"
    if isinstance(event, SecurityStep):  # hashes and field names only, never a key
        what = f": {one_line(event.detail)}" if event.detail and \
            event.step not in ("images", "plaintext") else ""  # MD5s: the ledger has them
        key = f" key {event.fingerprint}" if event.fingerprint and event.step == "key" else ""
        return f"{head} security {event.step} {event.phase}{key}{what}"
    if isinstance(event, Registered):
        return f"{head} registered {event.thing_name} ({event.registrar})"
    if isinstance(event, CredentialsOnBoard):
        block = f", DS key in {event.key_block}" if event.key_block else ""
        return f"{head} credentials on the board ({event.format}{block})"
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
            return f"{head} failed at {where}: {one_line(event.error or 'no reason given')}"
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
