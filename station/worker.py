"""One board's life on its slot: connect, identify, register, flash, verify, reset.

This is the core of the station and it is plain async code: it is handed a flasher, a
registrar, an event sink and a clock, and knows nothing of esptool, boto3, SQLite or the
terminal. Every stage runs under a timeout; transient failures are retried with the
reason kept; a board ends in exactly one final stage (done, failed, removed, skipped),
and that final event is always emitted, even when the worker is cancelled.

Registration runs while the common images are written (it needs only the MAC), so a slow
cloud is hidden behind the serial line; a registration failure fails the board before
its credentials partition is written.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from station.errors import (
    BootError,
    FlashError,
    KnownBoardError,
    PortError,
    RegistrationError,
    StationError,
)
from station.events import (
    BootChecked,
    EventSink,
    Identified,
    JobFinished,
    JobStarted,
    KnownBoard,
    Progress,
    Registered,
    RegistrationStep,
    Retrying,
    SecurityStep,
    Stage,
    StageChanged,
)
from station.flash import Plan, Plans
from station.identity import BoardFacts, Journal, Registrar
from station.parts import (
    BoardHistory,
    BoardIdentity,
    BoardLock,
    BoardSecurity,
    BoardSession,
    BootJudge,
    DeviceCredentials,
    Flasher,
    KnownBoardLookup,
    Region,
    SecurityJournal,
)

log = logging.getLogger("station.worker")
T = TypeVar("T")

current_board: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar(
    "current_board", default=None)
"""(job id, port, slot) of the board a registrar call is for: lets shared clients report
throttling against the board that waits, without threading it through every call."""

REMOVED = "removed"
NO_CONSOLE = ("native USB: the port leaves the bus when the chip restarts, so the boot story "
              "is not on it; the flash is verified by MD5")
"""The cancel message the daemon uses when a board's port disappears."""


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


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
    security: BoardSecurity | None = None
    """[security]: reads the board's eFuses and runs its locking sequence."""


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
    _registration: asyncio.Task[DeviceCredentials | None] | None = None
    _registered_as: tuple[str, str] = ("", "")  # (mac, thing) the registration is for
    _on_board: bool = False  # the board's flash holds its verified credentials
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
        task = self._registration
        if task is not None and not task.done():
            task.cancel()
            with suppress(BaseException):
                await task
        await self._release_unused_credentials()
        await self.parts.sink.emit(JobFinished(
            job_id=self.job_id, port=self.port, slot=self.slot, result=result, error=error,
            failed_stage=self._stage if result in (Stage.FAILED, Stage.REMOVED) else None,
            timings=dict(self.timings)))

    async def _release_unused_credentials(self) -> None:
        """Registered, but the board never got its credentials: no ACTIVE certificate may
        be left that no board holds (registering again when it returns re-activates it)."""
        task = self._registration
        if self._on_board or task is None or task.cancelled() or task.exception() is not None:
            return
        credentials = task.result()
        if credentials is not None:
            mac, thing = self._registered_as
            await self.parts.registrar.release(credentials, self._journal(mac, thing))

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
            if self._registration is None:
                self._registered_as = (identity.mac, thing)
                self._registration = asyncio.create_task(self._register(identity, thing))
            lock = None if self.parts.security is None else await self._stage_call(
                Stage.SECURE, attempt, lambda: self.parts.security.survey(  # type: ignore
                    session, identity, self._security_journal(identity.mac)))
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
        text = await self._stage_call(Stage.BOOT, attempt,
                                      lambda: session.console(check.timeout, check.complete))
        if text is None:
            await self.parts.sink.emit(BootChecked(
                job_id=self.job_id, port=self.port, slot=self.slot, result="skipped",
                project=None, version=None, detail=NO_CONSOLE, tail=""))
            return
        verdict = check.judge(text)
        problem = None if not verdict.ok or lock is None else lock.boot_problem(text)
        ok, detail = verdict.ok and problem is None, problem or verdict.detail
        await self.parts.sink.emit(BootChecked(
            job_id=self.job_id, port=self.port, slot=self.slot, result="ok" if ok else
            "failed", project=verdict.project, version=verdict.version, detail=detail,
            tail=verdict.tail))
        if not ok:
            raise BootError(f"{self.port}: boot check: {detail}", transient=False)

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
        if lock is not None:
            await self._timed(Stage.SECURE, lambda: lock.before_write(session))
        await self._stage_call(Stage.FLASH, attempt, lambda: self._write(session, regions))
        credentials = await self._credentials()
        own: list[Region] = []
        if credentials is not None and self.plan.credentials_region is not None:
            own = [self.plan.credentials_region(credentials)]
            self._stage = Stage.FLASH
            await self._timed(Stage.FLASH, lambda: self._write(session, own))
        await self._stage_call(Stage.VERIFY, attempt, lambda: self._verify(session, regions + own))
        if credentials is not None:
            mac, thing = self._registered_as
            await self._journal(mac, thing)("on-board", credentials.certificate_id,
                                            credentials.certificate_arn)
            self._on_board = True
            await self.parts.on_verified(credentials)
        if lock is not None:
            await self._stage_call(Stage.SECURE, attempt,
                                   lambda: lock.after_verify(session, regions + own))

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
            if self._registration is not None and self._registration.done():
                await self._wait_registration()  # a failed registration stops the flash now
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
        assert self._registration is not None
        self._stage = Stage.REGISTER
        return await self._timed(Stage.REGISTER, lambda: self._wait_registration())

    async def _wait_registration(self) -> DeviceCredentials | None:
        """The registration's own outcome; its failure is final (it did its own retries)."""
        assert self._registration is not None
        try:
            return await asyncio.shield(self._registration)
        except StationError as e:
            self._stage = Stage.REGISTER  # noticed between two writes, but it is this stage's
            raise RegistrationError(str(e), transient=False) from e

    async def _register(self, identity: BoardIdentity, thing: str) -> DeviceCredentials | None:
        """Runs beside the flash; retried like a stage, but never re-flashes anything."""
        facts = BoardFacts(identity=identity, thing_name=thing, station=self.plan.station,
                           firmware_hash=self.plan.firmware_hash)
        current_board.set((self.job_id, self.port, self.slot))  # this task's own context
        started = self.parts.clock.monotonic()
        attempt = 1
        while True:
            try:
                async with asyncio.timeout(self.policy.timeout(Stage.REGISTER)):
                    credentials = await self.parts.registrar.register(
                        facts, self._journal(identity.mac, thing))
                break
            except TimeoutError:
                raise RegistrationError(f"registration of {thing} timed out after "
                                        f"{self.policy.timeout(Stage.REGISTER):g}s") from None
            except StationError as e:
                if not e.transient or attempt > self.policy.retries:
                    raise
                await self.parts.sink.emit(Retrying(
                    job_id=self.job_id, port=self.port, slot=self.slot, stage=Stage.REGISTER,
                    attempt=attempt + 1, reason=str(e)))
                attempt += 1
                await self.parts.clock.sleep(self.policy.retry_delay)
        self.timings["register_cloud"] = self.parts.clock.monotonic() - started
        await self.parts.sink.emit(Registered(
            job_id=self.job_id, port=self.port, slot=self.slot, thing_name=thing,
            certificate_id=credentials.certificate_id if credentials else None,
            registrar=self.parts.registrar.kind))
        return credentials

    def _journal(self, mac: str, thing: str) -> Journal:
        async def journal(step: str, certificate_id: str | None,
                          certificate_arn: str | None) -> None:
            await self.parts.sink.emit(RegistrationStep(
                job_id=self.job_id, port=self.port, slot=self.slot, mac=mac, thing_name=thing,
                step=step, certificate_id=certificate_id, certificate_arn=certificate_arn))
        return journal

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
