"""The events workers emit; the ledger and the dashboard consume them, never the reverse.

Events are small frozen records. `emit` delivers them durably (the ledger has them
before the worker goes on); progress goes through `notify`, which is best-effort and
only feeds the dashboard, because the flash loop produces hundreds per second.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol


class Stage(enum.StrEnum):
    """A board's life on its slot. The last four are final."""

    CONNECT = "connect"
    IDENTIFY = "identify"
    REGISTER = "register"
    REGISTRY = "registry"  # [registry]: the device registry's answer, waited for with the
    # registrar's (identity/registry.py)
    FLASH = "flash"
    VERIFY = "verify"
    SECURE = "secure"  # [security]: eFuse batches after the verify (station/security)
    RESET = "reset"
    CLOUD = "cloud"  # [verify] cloud: its credentials on its broker (identity/cloudcheck.py)
    BOOT = "boot"  # [verify] boot: the boot story read after the reset (flash/bootcheck.py)
    DONE = "done"
    FAILED = "failed"
    REMOVED = "removed"
    SKIPPED = "skipped"

    @property
    def final(self) -> bool:
        return self in FINAL_STAGES


FINAL_STAGES = frozenset({Stage.DONE, Stage.FAILED, Stage.REMOVED, Stage.SKIPPED})


def _now() -> float:
    return time.time()


@dataclass(frozen=True, kw_only=True)
class Event:
    """Common to all events: which job, which port and slot, and when (wall clock)."""

    job_id: str
    port: str
    slot: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class JobStarted(Event):
    station: str
    firmware_hash: str


@dataclass(frozen=True, kw_only=True)
class StageChanged(Event):
    stage: Stage
    attempt: int = 1


@dataclass(frozen=True, kw_only=True)
class Identified(Event):
    chip: str
    mac: str  # 12 lower-case hex digits, no separators
    thing_name: str
    flash_size: int | None = None
    firmware_hash: str | None = None  # the firmware picked for this chip


@dataclass(frozen=True, kw_only=True)
class Progress(Event):
    """Bytes of the current write; not journaled."""

    region: str
    done: int
    total: int


@dataclass(frozen=True, kw_only=True)
class Retrying(Event):
    stage: Stage
    attempt: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Throttled(Event):
    """The cloud asked us to slow down; the board waits, it has not failed."""

    api: str


@dataclass(frozen=True, kw_only=True)
class RegistrationStep(Event):
    """A durable breadcrumb of a registration, written before the next cloud call.

    `step` is what has just happened: "key-written", "cert-created", "policy-attached",
    "thing-created", "cert-attached", "group-added", "cert-activated", "cert-revoked",
    "cert-deleted". Reconciliation after a crash reads these back from the ledger.
    """

    mac: str
    thing_name: str
    step: str
    certificate_id: str | None = None
    certificate_arn: str | None = None


@dataclass(frozen=True, kw_only=True)
class RegistryStep(Event):
    """The device registry (identity/registry.py), journaled around its request.

    `step` "pending" is written before the request is sent (with `method`, `url` and
    `body`, so a crash leaves what to send again: never a header, which may hold a key);
    then the outcome: "registered" (`device_id`: the id in the answer, if any), "already"
    (the registry had it: a re-plugged board, or a request answered but not recorded
    before a crash) or "failed" (`detail` says why). Reconciliation re-sends a thing whose
    last step is "pending".
    """

    mac: str
    thing_name: str
    step: str
    method: str = ""
    url: str = ""
    body: str = ""
    device_id: str | None = None
    status: int | None = None  # the HTTP status of the answer
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class CloudChecked(Event):
    """[verify] cloud: the board's certificate and key opened a session on its broker
    (`mode` "connect") and sent one test message ("publish"). `result` "ok", "failed" (the
    broker's reason in `detail`) or "skipped" (the key is not on the host: `detail`)."""

    mode: str
    result: str
    broker: str  # host:port
    client_id: str
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class Registered(Event):
    thing_name: str
    certificate_id: str | None
    registrar: str


@dataclass(frozen=True, kw_only=True)
class LineRate(Event):
    """The serial rate a board runs at (station/ports/baud.py): once connected, and at every
    step down the ladder, with the failure that forced it."""

    baud: int | None  # None: native USB, the baud rate does not apply
    adapter: str  # "cp2102n", "10c4:ea60", "native USB 303a:1001", "unknown adapter"
    stepped_from: int | None = None  # set on a step down
    reason: str | None = None  # why it stepped down
    remembered: bool = False  # started lower: this slot stepped down on an earlier board


@dataclass(frozen=True, kw_only=True)
class ButtonsNeeded(Event):
    """The reset sequence did not reach download mode (no auto-reset circuit): the board
    waits for a person to press BOOT + EN (`waiting`), or no longer does."""

    waiting: bool


@dataclass(frozen=True, kw_only=True)
class BootChecked(Event):
    """The boot check's verdict: `result` "ok", "failed" or "skipped" (a port that cannot
    carry the story); what the board said it runs; `detail` what was expected and
    printed, or why it was skipped; `tail` the last console lines."""

    result: str
    project: str | None
    version: str | None
    detail: str
    tail: str


@dataclass(frozen=True, kw_only=True)
class CredentialsOnBoard(Event):
    """The board's credentials are written and verified on its flash: in which format
    ([credentials] format: "nvs" or "esp_secure_cert") and, with ds = true, which eFuse
    key block holds the HMAC key that unlocks its DS ciphertext (else None)."""

    format: str
    key_block: str | None = None


@dataclass(frozen=True, kw_only=True)
class SecurityStep(Event):
    """One line of a board's security journal ([security], station/security): written
    before each eFuse batch and after it (or its failure). Hashes only, never a key."""

    mac: str
    step: str  # key, images, encrypt, secure_boot, lockdown
    phase: str  # before, after, failed
    mode: str  # [security] as a phrase: "flash encryption release (host key), ..."
    fingerprint: str | None = None  # a hash naming the flash-encryption key
    digest: str | None = None  # the signing key's public digest, as burned
    detail: str = ""  # what is burned; "images"/"plaintext": the MD5s by offset


@dataclass(frozen=True, kw_only=True)
class JobFinished(Event):
    """The board reached a final stage; `timings` are seconds spent per stage."""

    result: Stage
    error: str | None = None
    failed_stage: Stage | None = None
    timings: dict[str, float] = field(default_factory=dict)


class EventSink(Protocol):
    """Where workers send events; the daemon fans them out to ledger and dashboard."""

    async def emit(self, event: Event) -> None:
        """Deliver durably: returns once the ledger has recorded the event."""

    def notify(self, event: Event) -> None:
        """Deliver best-effort (progress); must be called on the event loop thread."""


# -- slot health (station/health/slothealth.py): about a slot, not one board -------------------


@dataclass(frozen=True, kw_only=True)
class SlotFlagged(Event):
    """A slot's boards keep failing at one stage: a cable, hub port or bridge, not a board.

    `job_id` is the job whose end crossed the threshold; `reason` says which rule ("3 in a
    row", "4 of the last 6"); `parked` is true when no new job starts on the slot until an
    operator clears it.
    """

    station: str
    stage: Stage
    reason: str
    hint: str
    parked: bool


@dataclass(frozen=True, kw_only=True)
class SlotCleared(Event):
    """The flag is gone: `by` is "dashboard", "cli" or "recovered" (a board done on it)."""

    station: str
    by: str


# -- the central ledger (station/fleet/lookup.py) ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class KnownBoard(Event):
    """The central ledger says another station already provisioned this board."""

    station: str
    finished_at: float
    thing_name: str | None
    note: str  # "provisioned by line-2 on 2026-11-27 22:04 UTC"
    policy: str  # [identity] on_known_board: "reflash", "skip" or "fail"


# -- remote ports (station/ports/remote.py): about a hub connection, not one board -------


@dataclass(frozen=True, kw_only=True)
class HubStatus(Event):
    """A remote port's hub host: `state` "present" (accepting), "probing" (the connection
    closed; looking again) or "down" (unreachable; `detail` says why and when it retries).
    Notified, not emitted: the dashboard shows it; no job has it (`job_id` "")."""

    state: str
    detail: str
