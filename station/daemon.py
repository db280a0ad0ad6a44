"""The supervisor: one worker per plugged port, signals, graceful drain, exit codes.

`Station` owns the port registry and nothing else; the parts it drives (flasher,
registrar, ledger, displays) are handed in, so tests run the very same supervisor on
virtual boards and a moto server. A port keeps its finished job until it is unplugged,
so a failed board stays failed on its slot instead of being flashed in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from station.beside import registry_journal
from station.config import Config
from station.errors import StateDirBusyError
from station.events import (
    Event,
    Identified,
    JobFinished,
    RegistrationStep,
    RegistryStep,
    Stage,
    StageChanged,
)
from station.flash import Plans
from station.identity import (
    CloudCheck,
    HttpRegistry,
    Journal,
    Registrar,
    RegistryJournal,
    pending_without_registry,
)
from station.parts import BoardDs, BoardSecurity, DeviceCredentials, Flasher, KnownBoardLookup
from station.ports import (
    PortInfo,
    PortWatcher,
    Reenumerations,
    RemotePorts,
    bridge_vid,
    is_remote,
    native_usb,
)
from station.worker import (
    REMOVED,
    Clock,
    Parts,
    Policy,
    SystemClock,
    Worker,
    no_credentials_hook,
)

log = logging.getLogger("station.daemon")

ABORTED = "aborted"

# Exit codes: a public contract for scripts, systemd and benchmarks (see README).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_BOARDS_FAILED = 3
EXIT_BUSY = 4
EXIT_REGISTRAR = 5
EXIT_ABORTED = 130


class Bus:
    """Fans events out: durable consumers (ledger, event log) first, then displays.

    `emit` returns only once every durable consumer has the event, which is what lets a
    registrar journal a certificate id before its next cloud call.
    """

    def __init__(self) -> None:
        self.durable: list[Callable[[Event], Awaitable[None]]] = []
        self.displays: list[Callable[[Event], None]] = []
        self.observers: list[Callable[[Event], None]] = []

    async def emit(self, event: Event) -> None:
        for record in self.durable:
            await record(event)
        self.notify(event)
        for observe in self.observers:
            observe(event)

    def notify(self, event: Event) -> None:
        for show in self.displays:
            try:
                show(event)
            except Exception:  # a display bug must never stop a board
                log.exception("display failed on %s", type(event).__name__)


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """Two stations on one state_dir would interleave ledgers and flash twice: refuse."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "station.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise StateDirBusyError(
                f"{state_dir}: another station (pid {holder}) is using this state_dir; "
                "stop it, or give this one its own [station] state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def reconcile_journal(
    emit: Callable[[Event], Awaitable[None]],
) -> Callable[[str, str], Journal]:
    """Journals for the registrar's clean-up of (mac, thing)s outside any board job."""
    def journal_for(mac: str, thing: str) -> Journal:
        async def journal(step: str, cert_id: str | None, cert_arn: str | None) -> None:
            await emit(RegistrationStep(
                job_id="reconcile", port="", slot="", mac=mac, thing_name=thing, step=step,
                certificate_id=cert_id, certificate_arn=cert_arn))
        return journal
    return journal_for


def reconcile_registry_journal(
    emit: Callable[[Event], Awaitable[None]],
) -> Callable[[str, str], RegistryJournal]:
    """Journals for the device registry's re-sent requests, outside any board job."""
    def journal_for(mac: str, thing: str) -> RegistryJournal:
        return registry_journal(emit, "reconcile", "", "", mac, thing)
    return journal_for


async def reconcile_registry(registry: HttpRegistry | None, steps: Sequence[RegistryStep],
                             emit: Callable[[Event], Awaitable[None]]) -> list[str]:
    """Send again what a crash left in flight ([registry]); `run` and `reconcile` alike."""
    if registry is None:
        return pending_without_registry(steps)
    return await registry.reconcile(steps, reconcile_registry_journal(emit))


def _port_mac(port: str) -> str | None:
    native = native_usb(port)
    return native.mac if native is not None else None


@dataclass
class Options:
    exit_after: int | None = None
    reflash: bool = False


@dataclass
class Station:
    config: Config
    plans: Plans
    flasher: Flasher
    registrar: Registrar
    bus: Bus
    already_done: Callable[[str, str], Awaitable[bool]] | None = None
    on_verified: Callable[[DeviceCredentials], Awaitable[None]] = no_credentials_hook
    registration_steps: Callable[[], Awaitable[Sequence[RegistrationStep]]] | None = None
    options: Options = field(default_factory=Options)
    clock: Clock = field(default_factory=SystemClock)
    parked: Callable[[str], bool] = lambda _slot: False
    """A flagged slot with `[ports] park_unhealthy` (station/health/slotpark.py): take no board."""
    known_board: KnownBoardLookup | None = None
    port_mac: Callable[[str], str | None] = field(default=lambda port: _port_mac(port))
    security: BoardSecurity | None = None  # [security]: station/security's LineSecurity
    """A port's MAC known without opening it (ports/usb.py: a USB-Serial/JTAG's serial number)."""
    ds: BoardDs | None = None  # [credentials] ds: station/dsboard.py's DsStep
    remote: RemotePorts | None = None
    """[ports] remote: rfc2217:// ports, a second source of "present / gone"."""
    registry: HttpRegistry | None = None
    """[registry]: the device registry, told about each board beside the registrar."""
    registry_steps: Callable[[], Awaitable[Sequence[RegistryStep]]] | None = None
    cloud: CloudCheck | None = None
    """[verify] cloud: each board's credentials tried on its broker before it is done."""

    def __post_init__(self) -> None:
        self._jobs: dict[str, asyncio.Task[Stage | None]] = {}
        self._started = 0
        self._results: list[Stage] = []
        self._accepting = True
        self._stop = asyncio.Event()
        self._signals = 0
        self._aborted = False
        self._slots = asyncio.Semaphore(self.config.station.max_parallel)
        self._waiting: dict[str, PortInfo] = {}  # plugged into a parked slot
        self.bus.observers.append(self._observe)
        # The same-board rule for ports that re-enumerate after our reset (ports/reenumeration.py)
        self._reenumerations: Reenumerations[asyncio.Task[Stage | None]] = \
            Reenumerations(self.config.ports.reenumerate_window)
        self._by_job: dict[str, tuple[str, asyncio.Task[Stage | None]]] = {}  # id -> key, task
        self._bridges: set[str] = set()  # jobs on a USB-UART bridge: no re-enumeration
        self._macs: dict[str, str] = {}  # job id -> MAC, once identified

    async def serve(self) -> int:
        """Run until a signal or --exit-after; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.registrar.start()
            if self.registry is not None:
                await self.registry.start()
            await self._reconcile()
            watcher = PortWatcher(self.config.ports.watch, self.config.ports.rescan_interval,
                                  on_added=self._plugged, on_removed=self._unplugged)
            await watcher.start()
            if self.remote is not None:  # each hub on its own task: none waits on another
                await self.remote.start(self._plugged, self._unplugged)
            registry = asyncio.create_task(self._reconcile_registry(), name="registry reconcile")
            log.info("ready: watching %s", ", ".join(self.config.ports.watch))
            try:
                await self._stop.wait()
                await self._drain()
            finally:
                registry.cancel()  # a request still out stays "pending" for the next start
                await asyncio.gather(registry, return_exceptions=True)
                await watcher.stop()
                if self.remote is not None:
                    await self.remote.stop()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.registrar.close()
            if self.registry is not None:
                await self.registry.close()
        return self._exit_code()

    def stop(self) -> None:
        """What the first signal does: take no new boards, let in-flight ones finish."""
        self._accepting = False
        self._stop.set()

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.warning("%s: finishing boards in flight, taking no new ones "
                        "(signal again to abort)", signal.Signals(sig).name)
            self.stop()
        else:
            log.warning("%s again: aborting boards in flight", signal.Signals(sig).name)
            self._abort()

    def _abort(self) -> None:
        self._aborted = True
        self.stop()
        for task in {*self._jobs.values(), *self._reenumerations.away()}:
            task.cancel(ABORTED)

    async def _reconcile(self) -> None:
        if self.registration_steps is None:
            return
        steps = await self.registration_steps()
        done = await self.registrar.reconcile(steps, reconcile_journal(self.bus.emit))
        for line in done:
            log.warning("reconcile: %s", line)

    async def _reconcile_registry(self) -> None:
        """Requests a crash left in flight, sent again beside the boards: a registry that
        is down at start must not hold the line (each one retries on its own)."""
        if self.registry_steps is None:
            return
        try:
            steps = await self.registry_steps()
            for line in await reconcile_registry(self.registry, steps, self.bus.emit):
                log.warning("reconcile: %s", line)
        except Exception:  # a bug here must not stop the station; the next start retries
            log.exception("reconcile of the device registry failed")

    def _plugged(self, info: PortInfo) -> None:
        if not self._accepting:
            log.info("%s: plugged while stopping; not taken", info.path)
            return
        if info.path in self._jobs:
            return
        if self._same_board_back(info):
            return
        if self.parked(self.config.slot_for(info.location, info.path)):
            if info.path not in self._waiting:
                log.warning("%s: slot parked (flagged unhealthy); the board waits until the "
                            "slot is cleared", info.path)
            self._waiting[info.path] = info
            return
        self._started += 1
        if self.options.exit_after is not None and self._started >= self.options.exit_after:
            self._accepting = False
        slot = self.config.slot_for(info.location, info.path)
        job_id = uuid.uuid4().hex[:12]
        worker = Worker(job_id=job_id, port=info.path, slot=slot, plans=self.plans,
                        parts=self._parts(),
                        policy=Policy(retries=self.config.worker.retries,
                                      retry_delay=self.config.worker.retry_delay,
                                      timeouts=self.config.worker.timeouts,
                                      reflash=self.options.reflash,
                                      on_known_board=self.config.identity.on_known_board))
        task = asyncio.create_task(self._run(worker), name=f"job {info.path}")
        self._jobs[info.path] = task
        self._by_job[job_id] = (self._usb_key(info), task)
        if bridge_vid(info.target) is not None or is_remote(info.path):  # it keeps its
            # port through a chip reset (a remote port: the hub's bridge and our connection):
            self._bridges.add(job_id)  # a vanish after the reset is a hand, never the reset

        def forget(_task: asyncio.Task[Stage | None]) -> None:
            self._macs.pop(job_id, None)
            self._bridges.discard(job_id)

        task.add_done_callback(forget)

    @staticmethod
    def _usb_key(info: PortInfo) -> str:
        return info.location or info.path

    def _same_board_back(self, info: PortInfo) -> bool:
        """A board the station reset, back at its USB location: it keeps its job."""
        task = self._reenumerations.returned(self._usb_key(info), self.port_mac(info.target))
        if task is None:
            return False
        self._jobs[info.path] = task
        log.info("%s: the board the station reset came back at %s (re-enumerated): same "
                 "board, no new job", info.path, self._usb_key(info))
        return True

    def _parts(self) -> Parts:
        return Parts(flasher=self.flasher, registrar=self.registrar, sink=self.bus,
                     clock=self.clock, already_done=self.already_done,
                     on_verified=self.on_verified, port_present=self._present,
                     known_board=self.known_board, port_mac=self.port_mac,
                     registry=self.registry, cloud=self.cloud,
                     security=self.security, ds=self.ds)

    def _present(self, port: str) -> bool:
        if is_remote(port):
            return self.remote is not None and self.remote.present(port)
        return os.path.exists(port)

    async def _run(self, worker: Worker) -> Stage | None:
        async with self._slots:
            if self._stop.is_set():
                return None  # queued behind max_parallel when the stop came: never started
            try:
                return await worker.run()
            except Exception:
                # The worker could not even record its end (the ledger failed): the board
                # still counts as final, or --exit-after would wait for it forever.
                log.exception("%s: job %s ended without its final record", worker.port,
                              worker.job_id)
                self._final(Stage.FAILED)
                return Stage.FAILED

    def slot_cleared(self, slot: str) -> None:
        """A parked slot was cleared: start the boards that wait in it."""
        for path, info in list(self._waiting.items()):
            if self.config.slot_for(info.location, info.path) == slot:
                del self._waiting[path]
                self._plugged(info)

    def _unplugged(self, info: PortInfo) -> None:
        self._waiting.pop(info.path, None)
        task = self._jobs.pop(info.path, None)
        if self._reenumerations.vanished(self._usb_key(info), task):
            log.info("%s: gone after the station reset it; same board if it comes back at "
                     "%s within %gs", info.path, self._usb_key(info),
                     self.config.ports.reenumerate_window)
            return  # a reset in progress ends on its own: a vanished port is its proof
        if task is not None and not task.done():
            task.cancel(REMOVED)

    def _observe(self, event: Event) -> None:
        if isinstance(event, JobFinished):
            self._final(event.result)
        where = self._by_job.get(event.job_id)
        if where is None:
            return
        key, task = where
        if isinstance(event, Identified):
            self._macs[event.job_id] = event.mac
        elif isinstance(event, StageChanged) and event.stage == Stage.RESET and \
                event.job_id not in self._bridges:
            self._reenumerations.resetting(key, task, self._macs.get(event.job_id))
        elif isinstance(event, JobFinished):
            self._reenumerations.ended(key, task)
            del self._by_job[event.job_id]

    def _final(self, result: Stage) -> None:
        self._results.append(result)
        limit = self.options.exit_after
        if limit is not None and len(self._results) >= limit:
            self.stop()

    async def _drain(self) -> None:
        running = [t for t in {*self._jobs.values(), *self._reenumerations.away()}
                   if not t.done()]
        if not running:
            return
        log.info("waiting for %d board(s) in flight", len(running))
        _, pending = await asyncio.wait(running, timeout=self.config.worker.drain_timeout)
        if pending:
            log.warning("%d board(s) still busy after %gs: aborting them", len(pending),
                        self.config.worker.drain_timeout)
            self._aborted = True
            for task in pending:
                task.cancel(ABORTED)
        await asyncio.gather(*running, return_exceptions=True)

    def _exit_code(self) -> int:
        if self._aborted:
            return EXIT_ABORTED
        if self.options.exit_after is not None:
            ok = {Stage.DONE, Stage.SKIPPED}
            if len(self._results) < self.options.exit_after or \
                    any(r not in ok for r in self._results):
                return EXIT_BOARDS_FAILED
        return EXIT_OK
