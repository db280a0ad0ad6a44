"""What a board's worker runs beside its flash: the registration and the device registry.

Both need only who the board is, so they start as soon as it is identified and the
serial line hides their time: the registration (the registrar: key, certificate, thing)
and, with [registry], the device registry's request (after the registrar when the
request names {certificate_id}). The worker waits for both before the board's
credentials partition is written; a failure of either stops the flash at the next
region. What the board ended without (an ACTIVE certificate no board holds) is released.

Why a module of its own: the worker (worker.py) is the board's stage machine; this is
the part of its life that talks to the cloud and journals every step for the crash
rules (docs/registration.md). The worker drives it and knows nothing of what it calls.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace

from station.errors import RegistrationError, StationError
from station.events import (
    Event,
    EventSink,
    Registered,
    RegistrationStep,
    RegistryStep,
    Retrying,
    Stage,
)
from station.identity import (
    BoardFacts,
    HttpRegistry,
    Journal,
    Registrar,
    RegistryJournal,
    RegistryNote,
)
from station.parts import Clock, DeviceCredentials

current_board: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar(
    "current_board", default=None)
"""(job id, port, slot) of the board a registrar call is for: lets shared clients report
throttling against the board that waits, without threading it through every call."""


def registry_journal(emit: Callable[[Event], Awaitable[None]], job_id: str, port: str,
                     slot: str, mac: str, thing: str) -> RegistryJournal:
    """A registry's notes as durable RegistryStep events (`emit` awaits the ledger)."""
    async def journal(note: RegistryNote) -> None:
        await emit(RegistryStep(
            job_id=job_id, port=port, slot=slot, mac=mac, thing_name=thing, step=note.step,
            method=note.request.method, url=note.request.url, body=note.request.body,
            device_id=note.device_id, status=note.status, detail=note.detail))
    return journal


@dataclass
class Beside:
    """One job's registration and registry request, started once, waited for by stage."""

    job_id: str
    port: str
    slot: str
    registrar: Registrar
    registry: HttpRegistry | None
    sink: EventSink
    clock: Clock
    retries: int
    retry_delay: float
    timeout: float | None  # [worker.timeouts] register: each of the two, at most
    timings: dict[str, float] = field(default_factory=dict)
    board: BoardFacts | None = None
    on_board: bool = False  # the board's flash holds its verified credentials
    _registration: asyncio.Task[DeviceCredentials | None] | None = None
    _device: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._registration is not None

    def start(self, board: BoardFacts) -> None:
        self.board = board
        self._registration = asyncio.create_task(self._register(board))
        if self.registry is not None:
            self._device = asyncio.create_task(self._tell_registry(self.registry, board))

    def done(self) -> list[Stage]:
        """The steps that have ended (their outcome can be waited for without waiting)."""
        return [stage for stage, task in ((Stage.REGISTER, self._registration),
                                          (Stage.REGISTRY, self._device))
                if task is not None and task.done()]

    @property
    def has_registry(self) -> bool:
        return self._device is not None

    async def wait(self, stage: Stage) -> DeviceCredentials | None:
        """The step's own outcome; its failure is final (it did its own retries)."""
        task = self._registration if stage == Stage.REGISTER else self._device
        assert task is not None
        try:
            result = await asyncio.shield(task)
        except StationError as e:
            raise RegistrationError(str(e), transient=False) from e
        return result if isinstance(result, DeviceCredentials) else None

    def journal(self) -> Journal:
        assert self.board is not None
        mac, thing = self.board.identity.mac, self.board.thing_name

        async def journal(step: str, certificate_id: str | None,
                          certificate_arn: str | None) -> None:
            await self.sink.emit(RegistrationStep(
                job_id=self.job_id, port=self.port, slot=self.slot, mac=mac, thing_name=thing,
                step=step, certificate_id=certificate_id, certificate_arn=certificate_arn))
        return journal

    async def stop(self) -> None:
        """Cancel what still runs (a registry request in flight stays "pending": the
        next reconcile ends it), then release credentials the board never got."""
        for task in (self._registration, self._device):
            if task is not None and not task.done():
                task.cancel()
                with suppress(BaseException):
                    await task
        await self._release_unused_credentials()

    async def _release_unused_credentials(self) -> None:
        """Registered, but the board never got its credentials: no ACTIVE certificate may
        be left that no board holds (registering again when it returns re-activates it)."""
        task = self._registration
        if self.on_board or task is None or task.cancelled() or task.exception() is not None:
            return
        credentials = task.result()
        if credentials is not None:
            await self.registrar.release(credentials, self.journal())

    async def _register(self, board: BoardFacts) -> DeviceCredentials | None:
        """Runs beside the flash; retried like a stage, but never re-flashes anything."""
        current_board.set((self.job_id, self.port, self.slot))  # this task's own context
        started = self.clock.monotonic()
        attempt = 1
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    credentials = await self.registrar.register(board, self.journal())
                break
            except TimeoutError:
                raise RegistrationError(f"registration of {board.thing_name} timed out "
                                        f"after {self.timeout:g}s") from None
            except StationError as e:
                if not e.transient or attempt > self.retries:
                    raise
                await self.sink.emit(Retrying(
                    job_id=self.job_id, port=self.port, slot=self.slot, stage=Stage.REGISTER,
                    attempt=attempt + 1, reason=str(e)))
                attempt += 1
                await self.clock.sleep(self.retry_delay)
        self.timings["register_cloud"] = self.clock.monotonic() - started
        await self.sink.emit(Registered(
            job_id=self.job_id, port=self.port, slot=self.slot, thing_name=board.thing_name,
            certificate_id=credentials.certificate_id if credentials else None,
            registrar=self.registrar.kind))
        return credentials

    async def _tell_registry(self, registry: HttpRegistry, board: BoardFacts) -> None:
        """[registry]: the request and its retries are the registry's own
        (identity/registry.py); this bounds it and waits for {certificate_id} if named."""
        current_board.set((self.job_id, self.port, self.slot))
        if registry.needs_certificate:
            assert self._registration is not None
            try:
                credentials = await asyncio.shield(self._registration)
            except StationError:
                return  # the registration's own failure fails the board
            board = replace(board, certificate_id=credentials.certificate_id
                            if credentials else None)
        started = self.clock.monotonic()
        journal = registry_journal(self.sink.emit, self.job_id, self.port, self.slot,
                                   board.identity.mac, board.thing_name)
        try:
            async with asyncio.timeout(self.timeout):
                await registry.register(board, journal)
        except TimeoutError:
            raise RegistrationError(f"the registry did not answer for {board.thing_name} "
                                    f"within {self.timeout:g}s ([worker.timeouts] register)"
                                    ) from None
        self.timings["registry_http"] = self.clock.monotonic() - started
