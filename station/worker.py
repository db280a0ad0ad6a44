"""One board's life on its slot: connect, identify, register, flash, verify, reset.

This is the core of the station and it is plain async code: it is handed a flasher, a
registrar, an event sink and a clock, and knows nothing of esptool, boto3, SQLite or the
terminal. Every stage runs under a timeout; transient failures are retried with the
reason kept; a board ends in exactly one final stage (done, failed, removed, skipped),
and that final event is always emitted, even when the worker is cancelled.

Registration (and, with [registry], the device registry's request: beside.py) runs
while the common images are written (it needs only the MAC), so a slow cloud is hidden
behind the serial line; a registration failure fails the board before its credentials
partition is written. With [verify] cloud the board's verified credentials open a
session on its broker before it is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from station.beside import Beside, current_board
from station.errors import (
    BootError,
    CloudCheckError,
    FlashError,
    KnownBoardError,
    PortError,
    StationError,
)
from station.events import (
    BootChecked,
    CloudChecked,
    CredentialsOnBoard,
    EventSink,
    Identified,
    JobFinished,
    JobStarted,
    KnownBoard,
    Progress,
    Retrying,
    SecurityStep,
    Stage,
    StageChanged,
)
from station.flash import Plan, Plans
from station.identity import BoardFacts, CloudCheck, HttpRegistry, Registrar, crash_point
from station.parts import (
    BoardDs,
    BoardHistory,
    BoardIdentity,
    BoardLock,
    BoardSecurity,
    BoardSession,
    BootJudge,
    Clock,
    DeviceCredentials,
    Flasher,
    KnownBoardLookup,
    Region,
    SecurityJournal,
    SystemClock,
)

log = logging.getLogger("station.worker")
T = TypeVar("T")
__all__ = ["REMOVED", "Clock", "Parts", "Policy", "SystemClock", "Worker", "current_board",
           "no_credentials_hook"]

REMOVED = "removed"
NO_CONSOLE = ("native USB: the port leaves the bus when the chip restarts, so the boot story "
              "is not on it; the flash is verified by MD5")
"""The cancel message the daemon uses when a board's port disappears."""
WRITTEN = "flash:written"  # crash-test point (CRASH_ENV): all written, none verified yet


@dataclass(frozen=True)
class Policy:
    retries: int = 2
    retry_delay: float = 1.0
    timeouts: Mapping[str, float] = field(default_factory=dict)
    reflash: bool = False
    on_known_board: str = "reflash"
    """A board another station provisioned: "reflash" (as its thing), "skip" or "fail"."""

    def timeout(self, stage: Stage) -> float | None:
        return self.timeouts.get(stage.value)


async def no_credentials_hook(_credentials: DeviceCredentials) -> None:
    return None


@dataclass(frozen=True)
class Parts:
    flasher: Flasher
    registrar: Registrar
    sink: EventSink
    clock: Clock = field(default_factory=SystemClock)
    already_done: Callable[[str, str], Awaitable[bool]] | None = None
    """(mac, firmware hash) -> the ledger has this board done with this firmware."""
    on_verified: Callable[[DeviceCredentials], Awaitable[None]] = no_credentials_hook
    """Called once the board holds verified credentials (e.g. drop the private key)."""
    port_present: Callable[[str], bool] = lambda _port: True
    """Tells a vanished port (an unplug) from a failing one after a serial error."""
    known_board: KnownBoardLookup | None = None
    """mac -> the board's history on other stations (the central ledger), if any."""
    port_mac: Callable[[str], str | None] = lambda _port: None
    """The board's MAC if the host knows it without opening the port (a USB-Serial/JTAG's
    serial number): a board done with this firmware is then skipped untouched."""
    registry: HttpRegistry | None = None  # [registry]: told beside the registrar
    cloud: CloudCheck | None = None  # [verify] cloud: the credentials tried on the broker
    security: BoardSecurity | None = None
    """[security]: reads the board's eFuses and runs its locking sequence."""
    ds: BoardDs | None = None
    """[credentials] ds: burns the HMAC key, makes the DS partition (dsboard.py)."""


async def _to_the_end(work: Awaitable[None]) -> None:
    """Run `work` to completion even if this task is cancelled meanwhile: a board's final
    record must land. A cancel that arrived is delivered once the work is done."""
    task = asyncio.ensure_future(work)
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            interrupted = True
    task.result()
    if interrupted:
        raise asyncio.CancelledError()


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


class _Removed(Exception):
    """The port went away under a stage; ends the job as removed, not failed."""


@dataclass
class Worker:
    """Runs one job: the board that appeared on `port` (shown as `slot`)."""

    job_id: str
    port: str
    slot: str
    plans: Plans
    parts: Parts
    policy: Policy
    timings: dict[str, float] = field(default_factory=dict)
    _stage: Stage = Stage.CONNECT
    _beside: Beside | None = None  # the registration and registry request, once identified
    _known: BoardHistory | None = None  # another station's done job for this board
    _asked: bool = False  # the central ledger was asked (once per job)
    _note: str | None = None  # why the board was skipped, for its final record
    _plan: Plan | None = None  # the board's, once its chip is known

    @property
    def plan(self) -> Plan:
        assert self._plan is not None, "no plan before the board is identified"
        return self._plan

    async def run(self) -> Stage:
        """Take the board to a final stage and emit JobFinished; returns that stage."""
        cancelled: asyncio.CancelledError | None = None
        error: str | None = None
        current_board.set((self.job_id, self.port, self.slot))  # for the edges' reports
        try:
            await self.parts.sink.emit(JobStarted(
                job_id=self.job_id, port=self.port, slot=self.slot, station=self.plans.station,
                firmware_hash=self.plans.firmware_hash))
            result = await self._attempts()
            error = self._note if result == Stage.SKIPPED else None
        except asyncio.CancelledError as e:
            cancelled = e
            removed = bool(e.args) and e.args[0] == REMOVED
            result = Stage.REMOVED if removed else Stage.FAILED
            error = f"{'unplugged' if removed else 'aborted'} during {self._stage.value}"
        except _Removed:
            result, error = Stage.REMOVED, f"unplugged during {self._stage.value}"
        except StationError as e:
            result, error = Stage.FAILED, str(e)
        except Exception as e:  # a bug must fail one board, never the station
            log.exception("%s: unexpected error in %s", self.port, self._stage.value)
            result, error = Stage.FAILED, f"internal error: {e!r}"
        await _to_the_end(self._wrap_up(result, error))
        if cancelled is not None:
            raise cancelled
        return result

    async def _wrap_up(self, result: Stage, error: str | None) -> None:
        """Stop the registration, release credentials the board never got, record the end."""
        if self._beside is not None:
            await self._beside.stop()
        await self.parts.sink.emit(JobFinished(
            job_id=self.job_id, port=self.port, slot=self.slot, result=result, error=error,
            failed_stage=self._stage if result in (Stage.FAILED, Stage.REMOVED) else None,
            timings=dict(self.timings)))

    async def _attempts(self) -> Stage:
        """Whole-session attempts: a serial failure mid-way means reconnecting anyway."""
        if await self._done_untouched():
            return Stage.SKIPPED
        attempt = 1
        while True:
            try:
                return await self._attempt(attempt)
            except StationError as e:
                if not self.parts.port_present(self.port):
                    raise _Removed() from e
                if not e.transient or attempt > self.policy.retries:
                    raise
                await self.parts.sink.emit(Retrying(
                    job_id=self.job_id, port=self.port, slot=self.slot, stage=self._stage,
                    attempt=attempt + 1, reason=str(e)))
                log.info("%s: retrying after %s: %s", self.port, self._stage.value, e)
                attempt += 1
                await self.parts.clock.sleep(self.policy.retry_delay)

    async def _attempt(self, attempt: int) -> Stage:
        session = await self._stage_call(Stage.CONNECT, attempt,
                                         lambda: self.parts.flasher.open(self.port))
        try:
            identity = await self._stage_call(Stage.IDENTIFY, attempt, session.identify)
            plan = self.plans.by_chip.get(identity.chip)
            thing = (plan or self.plans.any).thing_name(identity)
            known = await self._known_elsewhere(identity)
            if known is not None and known.thing_name and self.policy.on_known_board == \
                    "reflash":
                thing = known.thing_name  # reworked here: it stays the thing it was
            await self.parts.sink.emit(Identified(  # who it is, even if it cannot be served
                job_id=self.job_id, port=self.port, slot=self.slot, chip=identity.chip,
                mac=identity.mac, thing_name=thing, flash_size=identity.flash_size,
                firmware_hash=plan.firmware_hash if plan else None))
            self._plan = self.plans.pick(identity.chip)
            if identity.flash_size and identity.flash_size < self.plan.flash_end:
                raise FlashError(
                    f"{self.port}: the board has {_size(identity.flash_size)} of flash but "
                    f"the firmware reaches 0x{self.plan.flash_end:x}; use boards with more "
                    "flash or a build for this size", transient=False)
            if await self._already_done(identity):
                return Stage.SKIPPED
            if known is not None and self.policy.on_known_board == "skip":
                self._note = f"{known.describe()} ([identity] on_known_board = \"skip\")"
                return Stage.SKIPPED
            if known is not None and self.policy.on_known_board == "fail":
                raise KnownBoardError(f"{known.describe()}; not flashed because [identity] "
                                      "on_known_board = \"fail\"")
            ds, block = self.parts.ds, self.plan.ds_block
            if ds is not None and block is not None:  # before the cloud or the board is touched
                await self._stage_call(Stage.SECURE, attempt,
                                       lambda: ds.check(session, identity, block))
            if self._beside is None:
                self._beside = Beside(
                    job_id=self.job_id, port=self.port, slot=self.slot,
                    registrar=self.parts.registrar, registry=self.parts.registry,
                    sink=self.parts.sink, clock=self.parts.clock, retries=self.policy.retries,
                    retry_delay=self.policy.retry_delay,
                    timeout=self.policy.timeout(Stage.REGISTER), timings=self.timings)
                self._beside.start(BoardFacts(
                    identity=identity, thing_name=thing, station=self.plan.station,
                    firmware_hash=self.plan.firmware_hash,
                    firmware_version=self.plan.app_version, ds=self.plan.ds_block is not None))
            lock = None if self.parts.security is None else await self._stage_call(
                Stage.SECURE, attempt, lambda: self.parts.security.survey(  # type: ignore
                    session, identity, self._security_journal(identity.mac), thing))
            await self._flash(session, attempt, lock)
            await self._reset(session, attempt)
            if self.plan.boot is not None:
                await self._boot(session, attempt, self.plan.boot, lock)
            return Stage.DONE
        finally:
            await asyncio.shield(session.close())

    async def _boot(self, session: BoardSession, attempt: int, check: BootJudge,
                    lock: BoardLock | None) -> None:
        """[verify] boot: the story the board told since the reset, judged; the verdict
        and the last lines go to the ledger. A wrong boot is not retried: the flash is
        verified, so writing it again would boot the same way."""
        complete = check.complete if lock is None else lock.boot_complete(check.complete)
        text = await self._stage_call(Stage.BOOT, attempt,
                                      lambda: session.console(check.timeout, complete))
        if text is None:
            await self.parts.sink.emit(BootChecked(
                job_id=self.job_id, port=self.port, slot=self.slot, result="skipped",
                project=None, version=None, detail=NO_CONSOLE, tail=""))
            return
        verdict = check.judge(text if lock is None else lock.boot_story(text))
        problem = None if not verdict.ok or lock is None else lock.boot_problem(text)
        ok, detail = verdict.ok and problem is None, problem or verdict.detail
        await self.parts.sink.emit(BootChecked(
            job_id=self.job_id, port=self.port, slot=self.slot, result="ok" if ok else
            "failed", project=verdict.project, version=verdict.version, detail=detail,
            tail=verdict.tail))
        failure = None if ok or lock is None else lock.boot_failure(detail or "")
        if failure is not None:
            raise failure
        if not ok:
            raise BootError(f"{self.port}: boot check: {detail}", transient=False)
        if lock is not None:
            await lock.after_boot(text)

    async def _reset(self, session: BoardSession, attempt: int) -> None:
        """A board that vanishes while being reset was reset: native-USB boards drop off
        the bus when they restart, and its flash is verified by now either way."""
        capture = self.plan.boot is not None
        try:
            await self._stage_call(Stage.RESET, attempt,
                                   (lambda: session.reset(capture=True)) if capture
                                   else session.reset)
        except StationError as e:
            if self.parts.port_present(self.port):
                raise
            log.info("%s: the port went away during the reset (%s): the board restarted",
                     self.port, e)

    async def _flash(self, session: BoardSession, attempt: int, lock: BoardLock | None) -> None:
        """Common images first (registration runs meanwhile), then the board's own data;
        with [security], the key before them and the other eFuses once they verify."""
        regions = list(self.plan.regions) if lock is None else lock.regions(self.plan.regions)
        first, last = (regions, []) if lock is None else lock.write_last(regions)
        if lock is not None:
            await self._timed(Stage.SECURE, lambda: lock.before_write(session))
        if first:  # none: the board holds them already (a device-key board's first boot)
            await self._stage_call(Stage.FLASH, attempt, lambda: self._write(session, first))
        credentials = await self._credentials()
        own: list[Region] = []
        if credentials is not None and self.plan.ds_block is not None:
            credentials, own = await self._ds(credentials, session)
        elif credentials is not None and self.plan.credentials_region is not None:
            own = [self.plan.credentials_region(credentials,
                                                None if lock is None else lock.nvs_keys)]
        if own:  # an esp_secure_cert partition is flagged encrypted: [security] encrypts it
            own = own if lock is None else lock.regions(own, own=True)
        if own or last:
            self._stage = Stage.FLASH
            await self._timed(Stage.FLASH, lambda: self._write(session, own + last))
        if regions or own:
            crash_point(WRITTEN)
            await self._stage_call(Stage.VERIFY, attempt,
                                   lambda: self._verify(session, regions + own))
            if lock is not None:
                await lock.verified(regions + own)
        if credentials is not None:
            assert self._beside is not None
            await self._beside.journal()("on-board", credentials.certificate_id,
                                         credentials.certificate_arn)
            await self.parts.sink.emit(CredentialsOnBoard(
                job_id=self.job_id, port=self.port, slot=self.slot,
                format=self.plan.credentials_format, key_block=self.plan.ds_block))
            self._beside.on_board = True
            await self.parts.on_verified(credentials)
            if self.parts.cloud is not None:
                await self._cloud(attempt, self.parts.cloud, credentials)
        if lock is not None:
            await self._stage_call(Stage.SECURE, attempt,
                                   lambda: lock.after_verify(session, regions + own))

    async def _ds(self, creds: DeviceCredentials, session: BoardSession
                  ) -> tuple[DeviceCredentials, list[Region]]:
        """[credentials] ds: the HMAC key burned (or found), the DS partition made."""
        ds, block, at = self.parts.ds, self.plan.ds_block, self.plan.credentials_at
        assert ds is not None and block is not None and at is not None
        assert self._beside is not None and self._beside.board is not None
        identity = self._beside.board.identity
        self._stage = Stage.SECURE
        region, creds = await self._timed(Stage.SECURE, lambda: ds.region(
            session, identity, creds, block, at, self._security_journal(identity.mac)))
        return creds, [region]

    async def _cloud(self, attempt: int, cloud: CloudCheck,
                     credentials: DeviceCredentials) -> None:
        """[verify] cloud: the board's own certificate and key on its broker; a refusal
        fails the board with the broker's reason (a retry would present the same ones)."""
        assert self._beside is not None and self._beside.board is not None
        board = self._beside.board
        verdict = await self._stage_call(Stage.CLOUD, attempt,
                                         lambda: cloud.check(credentials, board))
        await self.parts.sink.emit(CloudChecked(
            job_id=self.job_id, port=self.port, slot=self.slot, mode=cloud.mode,
            result=verdict.result, broker=verdict.broker, client_id=verdict.client_id,
            detail=verdict.detail))
        if verdict.result == "failed":
            raise CloudCheckError(f"cloud check ({cloud.mode}) as {verdict.client_id}: "
                                  f"{verdict.detail}", transient=False)

    def _security_journal(self, mac: str) -> SecurityJournal:
        async def journal(step: str, phase: str, mode: str, fingerprint: str | None,
                          digest: str | None, detail: str) -> None:
            await self.parts.sink.emit(SecurityStep(
                job_id=self.job_id, port=self.port, slot=self.slot, mac=mac, step=step,
                phase=phase, mode=mode, fingerprint=fingerprint, digest=digest,
                detail=detail))
        return journal

    async def _write(self, session: BoardSession, regions: list[Region]) -> None:
        for region in regions:
            for stage in self._beside.done() if self._beside is not None else ():
                await self._wait_beside(stage)  # a failed registration stops the flash now
            await session.write(region, self._progress_for(region))

    async def _verify(self, session: BoardSession, regions: list[Region]) -> None:
        for region in regions:
            await session.verify(region)

    def _progress_for(self, region: Region) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            self.parts.sink.notify(Progress(job_id=self.job_id, port=self.port, slot=self.slot,
                                            region=region.name, done=done, total=total))
        return progress

    async def _credentials(self) -> DeviceCredentials | None:
        assert self._beside is not None
        self._stage = Stage.REGISTER
        credentials = await self._timed(Stage.REGISTER,
                                        lambda: self._wait_beside(Stage.REGISTER))
        if self._beside.has_registry:  # bounded by its own attempts and the timeout
            self._stage = Stage.REGISTRY
            await self._timed(Stage.REGISTRY, lambda: self._wait_beside(Stage.REGISTRY))
        return credentials

    async def _wait_beside(self, stage: Stage) -> DeviceCredentials | None:
        """A step beside the flash: its outcome, or its failure as this stage's."""
        assert self._beside is not None
        try:
            return await self._beside.wait(stage)
        except StationError:
            self._stage = stage  # noticed between two writes, but it is this stage's
            raise

    async def _known_elsewhere(self, identity: BoardIdentity) -> BoardHistory | None:
        """Ask the central ledger once per job; record what it said on the board's row."""
        lookup = self.parts.known_board
        if lookup is None or self._asked:
            return self._known
        self._asked = True
        self._known = await lookup(identity.mac)
        if self._known is not None:
            await self.parts.sink.emit(KnownBoard(
                job_id=self.job_id, port=self.port, slot=self.slot,
                station=self._known.station, finished_at=self._known.finished_at,
                thing_name=self._known.thing_name, note=self._known.describe(),
                policy=self.policy.on_known_board))
        return self._known
    async def _done_untouched(self) -> bool:
        """A board the host names by its MAC and the ledger has done: not even connected.
        Connecting resets a native-USB chip into its bootloader, and it may re-enumerate:
        a done board must not be reset again (issue #9's skip-reset-re-enumerate loop)."""
        check, mac = self.parts.already_done, self.parts.port_mac(self.port)
        if mac is None or check is None or self.policy.reflash:
            return False
        for plan in self.plans.by_chip.values():
            if await check(mac, plan.firmware_hash):
                self._plan = plan
                await self.parts.sink.emit(self._stage_event(Stage.IDENTIFY, 1))
                await self.parts.sink.emit(Identified(
                    job_id=self.job_id, port=self.port, slot=self.slot, chip=plan.chip,
                    mac=mac, thing_name=plan.thing_name(BoardIdentity(plan.chip, mac)),
                    firmware_hash=plan.firmware_hash))
                log.info("%s: %s is done with this firmware (known by its USB serial "
                         "number): skipped without opening the port", self.port, mac)
                return True
        return False

    async def _already_done(self, identity: BoardIdentity) -> bool:
        check = self.parts.already_done
        if self.policy.reflash or check is None:
            return False
        return await check(identity.mac, self.plan.firmware_hash)

    def _stage_event(self, stage: Stage, attempt: int) -> StageChanged:
        self._stage = stage
        return StageChanged(job_id=self.job_id, port=self.port, slot=self.slot, stage=stage,
                            attempt=attempt)

    async def _stage_call(self, stage: Stage, attempt: int,
                          call: Callable[[], Awaitable[T]]) -> T:
        await self.parts.sink.emit(self._stage_event(stage, attempt))
        return await self._timed(stage, call)

    async def _timed(self, stage: Stage, call: Callable[[], Awaitable[T]]) -> T:
        """Run one stage's work under its timeout and add its time to the job's timings."""
        started = self.parts.clock.monotonic()
        limit = self.policy.timeout(stage)
        try:
            async with asyncio.timeout(limit):
                return await call()
        except TimeoutError:
            raise PortError(f"{stage.value} timed out after {limit:g}s on {self.port}") from None
        finally:
            spent = self.parts.clock.monotonic() - started
            self.timings[stage.value] = self.timings.get(stage.value, 0.0) + spent
