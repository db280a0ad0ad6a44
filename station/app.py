"""Wiring: turn a validated config into a running Station with the real adapters, and
run it (`serve`, with the live table or log lines; `station run` and `station demo`).

The only place that knows which concrete flasher, registrar, ledger and displays the
station uses; `daemon.Station` itself is handed them. Everything that can be checked
before a board is touched is checked here (firmware, partition label, state dir, ledger),
so a mistake in station.toml fails at start, not at the first board.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from station.config import Config, writable_folder
from station.daemon import Bus, Options, Station, state_dir_lock
from station.dsboard import DsStep
from station.events import (
    ButtonsNeeded,
    Event,
    LineRate,
    RegistrationStep,
    RegistryStep,
    Throttled,
)
from station.flash import (
    EsptoolFlasher,
    FirmwareBundle,
    build_plans,
    firmware_warnings,
    load_bundles,
)
from station.health import SlotGuard, SlotHealth
from station.identity import (
    CredentialStore,
    Registrar,
    credentials_image,
    make_cloud_check,
    make_registrar,
    make_registry,
)
from station.parts import DeviceCredentials
from station.ports import RateNote, RemotePorts, SlotMemory
from station.record import EventLog, Ledger
from station.screen import HeadlessLog, LiveDashboard, StationView, read_keys
from station.security import LineSecurity, secure_line
from station.worker import current_board

if TYPE_CHECKING:
    from station.fleet import Replicator
    from station.health.metrics import StationMetrics

log = logging.getLogger("station.app")


def throttled_reporter(bus: Bus) -> Callable[[str], None]:
    """Shows a cloud throttle on the row of the board that is waiting for it."""
    def report(api: str) -> None:
        board = current_board.get()
        if board is not None:
            job_id, port, slot = board
            bus.notify(Throttled(job_id=job_id, port=port, slot=slot, api=api))
    return report


def board_keys(port: str) -> tuple[str, ...]:
    """What names a port for [ports.baud_by_port] and the slots' memory: slot first."""
    board = current_board.get()
    return (board[2], port) if board is not None else (port,)


def rate_reporter(bus: Bus) -> Callable[[RateNote], Awaitable[None]]:
    """The flasher's line rates and step-downs, as LineRate events of the board's job."""
    async def report(note: RateNote) -> None:
        board = current_board.get()
        if board is not None:
            job_id, port, slot = board
            await bus.emit(LineRate(job_id=job_id, port=port, slot=slot, baud=note.baud,
                                    adapter=note.adapter, stepped_from=note.stepped_from,
                                    reason=note.reason, remembered=note.remembered))
    return report


def buttons_reporter(bus: Bus) -> Callable[[str, bool], None]:
    """The flasher's "press BOOT + EN" (and its end), for the board's row."""
    def report(port: str, waiting: bool) -> None:
        board = current_board.get()
        if board is not None:
            job_id, port, slot = board
            bus.notify(ButtonsNeeded(job_id=job_id, port=port, slot=slot, waiting=waiting))
    return report


@dataclass
class Assembly:
    """A station and what the CLI shows of the parts it was built from."""

    station: Station
    bundle: FirmwareBundle  # the first firmware
    registrar: Registrar
    guard: SlotGuard
    replicator: Replicator | None = None
    bundles: tuple[FirmwareBundle, ...] = ()


def first_boot_wait(config: Config) -> float | None:
    """key = "device": the bootloader encrypts the flash on a board's first boot, which a
    reset must not cut short; connecting waits up to the boot timeout for such a pass
    (station/flash/first_boot_guard.py), which [security] requires to cover it."""
    return config.verify.boot_timeout if config.security.key == "device" else None


@contextlib.asynccontextmanager
async def assemble(config: Config, options: Options,
                   displays: Sequence[Callable[[Event], None]] = ()) -> AsyncIterator[Assembly]:
    """Lock the state dir, open the ledger, load the firmware, build the registrar."""
    state_dir = config.station.state_dir
    with state_dir_lock(state_dir):
        bundles = await asyncio.to_thread(load_bundles, config)
        for line in firmware_warnings(config, bundles):
            log.warning("%s", line)
        store = CredentialStore(config.credentials.out_dir)
        bus = Bus()
        registrar = make_registrar(config, store, throttled_reporter(bus))
        plans = build_plans(config, bundles,
                            None if registrar.kind == "none" else credentials_image)
        security = await asyncio.to_thread(secure_line, config, bundles)
        if registrar.kind != "none":  # fail now, not at every board's credentials
            await asyncio.to_thread(writable_folder, config.credentials.out_dir,
                                    "credentials.out_dir", config)
        ledger = Ledger.open(state_dir)
        events = EventLog(state_dir / "events.jsonl")
        try:
            interrupted = ledger.close_interrupted("the station was stopped or crashed")
            for job in interrupted:
                log.warning("job %s was interrupted by the last stop; marked failed", job)
            in_first_boot = ledger.caught_in_first_boot(interrupted)
            guard = SlotGuard(SlotHealth(config.ports.health, config.station.name,
                                         park=config.ports.park_unhealthy),
                              emit=bus.emit, open_flags=ledger.open_flags_async,
                              show=bus.notify)
            bus.durable += [ledger.record, events.record, guard.record]
            bus.displays += [*displays, ledger.note]

            async def already_done(mac: str, firmware_hash: str) -> bool:
                return await asyncio.to_thread(ledger.done_with, mac, firmware_hash)

            async def steps() -> Sequence[RegistrationStep]:
                return await asyncio.to_thread(ledger.registration_steps)

            async def registry_steps() -> Sequence[RegistryStep]:
                return await asyncio.to_thread(ledger.registry_steps)

            async def verified(creds: DeviceCredentials) -> None:
                if not config.credentials.keep_private_keys:
                    await store.forget_private_key(creds.thing_name)

            remote = RemotePorts(config.ports.remote, show=bus.notify,
                                 slot_for=lambda url: config.slot_for(url, url)) \
                if config.ports.remote else None
            if remote is not None:  # a job that kept no connection: watch its URL
                bus.observers.append(remote.observe)
            station = Station(config=config, plans=plans,
                              flasher=EsptoolFlasher(line=config.ports.line,
                                                     memory=SlotMemory(), keys=board_keys,
                                                     on_rate=rate_reporter(bus),
                                                     chips=tuple(plans.by_chip),
                                                     links=remote,
                                                     on_buttons=buttons_reporter(bus),
                                                     buttons_timeout=config.ports
                                                     .buttons_timeout,
                                                     ask_buttons=config.ports.ask_buttons,
                                                     first_boot_wait=first_boot_wait(config),
                                                     first_boot_slots=in_first_boot),
                              registrar=registrar, bus=bus, already_done=already_done,
                              on_verified=verified, registration_steps=steps,
                              options=options, parked=guard.parked, remote=remote,
                              registry=make_registry(config.registry, throttled_reporter(bus)),
                              registry_steps=registry_steps,
                              cloud=make_cloud_check(config.verify.cloud))
            if security is not None:
                station.security = LineSecurity(security, ledger.security_journal_async,
                                                escrow_dir=config.credentials.out_dir)
            if any(p.ds_block for p in plans.by_chip.values()):
                station.ds = DsStep(store, ledger.security_journal_async)
            guard.on_cleared.append(station.slot_cleared)
            await guard.restore()
            run_id = await asyncio.to_thread(ledger.run_started, config.station.name,
                                             os.getpid())
            watch = asyncio.create_task(guard.watch(), name="slot flags")
            try:
                async with central_and_metrics(config, ledger, bus, registrar) as rep:
                    if rep is not None:
                        from station.fleet import FleetLookup

                        fleet = FleetLookup(config.ledger.central, config.station.name,
                                            healthy=lambda: rep.status().state == "up")
                        station.known_board = fleet.known
                    try:
                        yield Assembly(station=station, bundle=bundles[0], registrar=registrar,
                                       guard=guard, replicator=rep, bundles=bundles)
                    finally:
                        if rep is not None:
                            await asyncio.to_thread(fleet.close)
                        # before the replicator's last flush: the central ledger knows
                        # this stop was clean (the report counts unclean restarts)
                        await asyncio.to_thread(ledger.run_stopped, run_id)
                        run_id = 0
            finally:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
                if run_id:  # the central ledger's start failed
                    await asyncio.to_thread(ledger.run_stopped, run_id)
        finally:
            await events.close()
            ledger.close()


@contextlib.asynccontextmanager
async def central_and_metrics(config: Config, ledger: Ledger, bus: Bus, registrar: Registrar,
                              ) -> AsyncIterator[Replicator | None]:
    """[ledger] central: the replicator (PostgreSQL refusing us fails the start, PostgreSQL
    away only warns); [metrics] listen: the Prometheus endpoint. Both are consumers."""
    replicator: Replicator | None = None
    metrics: StationMetrics | None = None
    try:
        if config.ledger.central:
            from station.fleet import Replicator

            replicator = Replicator(ledger.path, config.station.name, config.ledger.central,
                                    batch=config.ledger.batch,
                                    connect_timeout=config.ledger.connect_timeout)
            warning = await asyncio.to_thread(replicator.connect_at_start)
            if warning:
                log.warning("%s", warning)
            bus.observers.append(replicator.observe)
            replicator.start()
        if config.metrics.listen:
            from station.health.metrics import StationMetrics

            iot = getattr(registrar, "iot", None)
            metrics = StationMetrics(
                replication=replicator.status if replicator is not None else None,
                aws=(lambda: (iot.calls, iot.throttles)) if iot is not None else None)
            metrics.serve(config.metrics.listen, config.metrics.address, str(config.path))
            bus.displays.append(metrics.show)
        yield replicator
    finally:
        if metrics is not None:
            metrics.close()
        if replicator is not None:
            await asyncio.to_thread(replicator.stop)


def setup_logging(config: Config, headless: bool) -> None:
    """state_dir/station.log gets everything from INFO; stderr warnings (headless) or
    errors only (the live table owns the terminal)."""
    config.station.state_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    file = logging.FileHandler(config.station.state_dir / "station.log")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING if headless else logging.ERROR)
    err.setFormatter(logging.Formatter("station: %(levelname)s: %(message)s"))
    root.addHandler(err)


async def serve(config: Config, options: Options, headless: bool) -> int:
    """Build the station from `config` and run it with the live table or log lines."""
    view = StationView(station=config.station.name)
    displays: list[Callable[[Event], None]] = [view.apply]
    headless_log = HeadlessLog(view, sys.stdout) if headless else None
    if headless_log is not None:
        displays.append(headless_log.show)
    async with assemble(config, options, displays) as built:
        view.firmware = "; ".join(b.describe() for b in built.bundles)
        view.registrar = built.registrar.kind
        view.registry = config.registry.kind if config.registry.kind != "none" else ""
        view.cloud = config.verify.cloud.mode if config.verify.cloud.mode != "off" else ""
        if built.replicator is not None:  # the footer's replication line
            status = built.replicator.status
            view.central = lambda now: (status().line(now), status().healthy)
        if headless:
            return await built.station.serve()
        with read_keys({"c": built.guard.clear_first}) as keys, LiveDashboard(view):
            view.clear_key = "c" if keys else ""
            return await built.station.serve()
