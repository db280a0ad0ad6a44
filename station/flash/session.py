"""The serial edge: esptool's loader driven from one thread per board.

`EsptoolFlasher.open(port)` connects (sync, chip detection, stub, baud change, flash
attach) and returns an `EsptoolSession`, which implements `parts.BoardSession`.

Why it looks the way it does:

- esptool is blocking. Each session owns a single-thread executor, so 16 boards get 16
  threads; asyncio's default pool has only min(32, cores + 4) = 6 threads on two cores,
  and the seventh board would queue behind the others.
- esptool's logger is one process-wide object: it is routed to logging, naming the
  port (station/serialport.py, with the abortable local and RFC 2217 ports and the open
  errors), and progress comes from our own write loop instead of `cmds.write_flash`.
- The write loop sends the data blocks itself (station/flashwrite.py: esptool's own
  packet code costs ~25 ms of CPU per block); everything else goes through esptool's
  loader unchanged.
- The line rate is tried, not trusted (station/baud.py): esptool's `change_baud` does
  not check that the bridge followed, so a register read with a short timeout follows
  every change; a line failure there or in a block write closes the port (a real board
  is reset by the next connect, a pty by the close), reconnects one ladder rate lower
  and goes on. Each step is a `RateNote`, reported after the thread's call returns.
- Cancellation: `close()` aborts the serial port first (pending and later reads/writes
  fail at once), so a thread blocked in esptool finishes within milliseconds, then closes
  the port from that thread (never closing a file descriptor another thread is using).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import serial
from esptool.cmds import attach_flash, detect_chip, detect_flash_size, reset_chip, run_stub
from esptool.loader import DEFAULT_TIMEOUT
from esptool.util import FatalError, flash_size_bytes

from station.errors import (
    FlashError,
    NotAnEspError,
    PortError,
    StationError,
    VerifyError,
    WrongChipError,
)
from station.flash._write import write_region
from station.parts import BoardIdentity, ProgressFn, Region
from station.ports import (
    Adapter,
    BaudSettings,
    LocalPort,
    NativeUsb,
    RateNote,
    RemoteLinks,
    RemotePort,
    SlotMemory,
    Step,
    first_line,
    is_remote,
    native_usb,
    next_lower,
    open_error,
    points_at_line,
    quiet_esptool,
    set_port_tag,
    usb_adapter,
)

log = logging.getLogger("station.flasher")
T = TypeVar("T")

ROM_BAUD = 115200
CONSOLE_READ_TIMEOUT = 0.1  # one console read: how late the boot check sees a deadline
CLOSE_TIMEOUT = 10.0  # an aborted port makes esptool fail in milliseconds; this is a guard
BUTTONS_TIMEOUT = 120.0  # seconds a board without auto-reset waits for BOOT + EN
# esptool's words when its reset sequence did not bring the ROM's download mode up: a
# silent line, or the ROM's SPI-boot banner ("Wrong boot mode detected (0x13)")
NO_DOWNLOAD_SIGNS = ("No serial data received", "Wrong boot mode detected")
PROGRESS_INTERVAL = 0.1  # at most ~10 progress callbacks per second per board
PROBE_TIMEOUT = 0.5  # a register read after a baud change takes milliseconds when it works
RECONNECT_PAUSE = 0.1  # after closing a port before reopening it: a pty's only reset
# Chips whose esp-flasher-stub keeps the UART as the ROM left it (src/main.c raises clocks
# and resets the divider to the ROM's init rate only on ESP32, -S2, -S3, -P4, -S31, -H21,
# -H4, -C6; transport.c attaches to the ROM-initialised UART): on these the ROM changes
# the rate first and the stub travels at it. Elsewhere the stub goes at 115200.
FAST_STUB_CHIPS = frozenset({"esp32c2", "esp32c3", "esp32c5", "esp32c61", "esp32h2"})
_fast_stub_failed: set[str] = set()  # chips whose stub did not start at a fast rate
# Connect failures that mean "something answers, but it is not an ESP bootloader".
NOT_ESP_SIGNS = ("Invalid head of packet", "Invalid SLIP escape", "Unexpected chip",
                 "Failed to autodetect", "Response doesn't match request")


def chip_name(esp: Any) -> str:
    """esptool's "ESP32-S3" -> our "esp32s3"."""
    return str(esp.CHIP_NAME).lower().replace("-", "")


# -- the flasher and its sessions ----------------------------------------------------------


class EsptoolFlasher:
    """Opens boards with esptool; implements `parts.Flasher`.

    `baud`: the rate after the stub runs (the ROM always starts at 115200); `line`, when
    given, decides it per port instead (station/baud.py), and `memory` keeps the slots'
    step-downs. `keys(port)` names the port for [ports.baud_by_port] and the memory
    (slot first); `on_rate` receives every RateNote, on the event loop.
    `chip` / `chips`: the chip(s) the station has firmware for; a board of another chip
    still opens (so `identify()` can name it) but gets no stub, and `write()` refuses it.
    `connect_attempts`: esptool's reset+sync attempts (~0.8 s each when nothing answers).
    """

    def __init__(self, baud: int = 921600, chip: str | None = None, connect_attempts: int = 4,
                 trace: bool = False, progress_interval: float = PROGRESS_INTERVAL,
                 chips: tuple[str, ...] = (),
                 native: Callable[[str], NativeUsb | None] = native_usb,
                 line: BaudSettings | None = None, memory: SlotMemory | None = None,
                 adapter: Callable[[str], Adapter] = usb_adapter,
                 keys: Callable[[str], tuple[str, ...]] = lambda port: (port,),
                 on_rate: Callable[[RateNote], Awaitable[None]] | None = None,
                 links: RemoteLinks | None = None,
                 on_buttons: Callable[[str, bool], None] | None = None,
                 buttons_timeout: float = BUTTONS_TIMEOUT,
                 ask_buttons: str = "remote") -> None:
        self.baud = baud
        self.on_buttons = on_buttons  # (port, waiting): "press BOOT + EN" on its row
        self.buttons_timeout = buttons_timeout
        self.ask_buttons = ask_buttons  # on which ports ([ports] ask_buttons)
        self.links = links  # remote ports' connections between sessions (remoteports.py)
        self.line = line if line is not None else BaudSettings(baud=baud)
        self.memory = memory if memory is not None else SlotMemory()
        self.adapter = adapter  # sysfs VID:PID and product (usbport.py)
        self.keys = keys
        self.on_rate = on_rate
        self.native = native  # sysfs VID:PID (usbport.py); tests may stand in for sysfs
        self.chips = chips or ((chip,) if chip else ())
        self.connect_attempts = connect_attempts
        self.trace = trace
        self.progress_interval = progress_interval
        quiet_esptool()

    async def open(self, port: str) -> EsptoolSession:
        # on the loop, in the worker's context: the board's slot is known here only
        session = EsptoolSession(port, self, self.keys(port))
        if self.on_buttons is not None:  # called from the session thread, in this context
            loop, context, notify = asyncio.get_running_loop(), contextvars.copy_context(), \
                self.on_buttons
            session.ask_buttons = lambda waiting: loop.call_soon_threadsafe(
                context.run, notify, port, waiting)
        try:
            await session.call("connect", session.connect_blocking)
        except BaseException:
            await asyncio.shield(session.close())
            raise
        return session


class EsptoolSession:
    """One open, synced board; every esptool call runs on this session's own thread."""

    def __init__(self, port: str, flasher: EsptoolFlasher,
                 keys: tuple[str, ...] = ()) -> None:
        self.port = port
        self.keys = keys or (port,)
        self.flasher = flasher
        self.name = Path(port).name
        self.esp: Any = None
        self.identity: BoardIdentity | None = None
        self._serial: LocalPort | RemotePort | None = None
        self._step = "open"  # how far connect got, for its error message
        self._baud_unconfirmed = False  # changed the baud, no reply at the new one yet
        self.rate: int | None = None  # the line rate in use; None: native USB
        self._slot = port
        self._adapter_name = ""
        self._notes: list[RateNote] = []  # to report once the thread's call returns
        self.native: NativeUsb | None = None
        self._closed = False
        self._connect_mode = "default-reset"  # "no-reset" while waiting for BOOT + EN
        self.ask_buttons: Callable[[bool], object] = lambda _waiting: None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"flash-{self.name}",
                                            initializer=self._init_thread)

    def _init_thread(self) -> None:
        set_port_tag(self.port)

    # -- plumbing --

    async def call(self, stage: str, fn: Callable[[], T]) -> T:
        """Run `fn` on the session's thread; esptool and serial errors become ours."""
        if self._closed:
            raise PortError(f"{self.port}: the session is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._guarded, stage, fn)
        finally:
            await self._report_rates()

    async def _report_rates(self) -> None:
        notes, self._notes = self._notes, []
        if self.flasher.on_rate is not None:
            for note in notes:
                await self.flasher.on_rate(note)

    def _guarded(self, stage: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StationError:
            raise
        except (serial.SerialException, OSError) as e:
            if self._serial is not None and self._serial.aborted:
                raise PortError(f"{self.port}: {stage} stopped: the port was closed") from e
            if self._remote_lost():
                raise PortError(f"{self.port}: {stage}: the hub closed the connection "
                                f"({first_line(e)})") from e
            raise PortError(f"{self.port}: {stage}: the serial port failed ({first_line(e)}); "
                            "was the board unplugged?") from e
        except FatalError as e:
            if self._serial is not None and self._serial.aborted:
                raise PortError(f"{self.port}: {stage} stopped: the port was closed") from e
            if self._remote_lost():
                raise PortError(f"{self.port}: {stage}: the hub closed the connection "
                                f"({first_line(e)})") from e
            message = first_line(e)
            if stage == "connect":
                raise self._connect_error(e, message) from e
            raise FlashError(f"{self.port}: {stage}: {message}") from e

    def _remote_lost(self) -> bool:
        """A remote port whose connection died: the hub host or its board is gone."""
        links = self.flasher.links
        return links is not None and self._serial is not None and is_remote(self.port) \
            and links.link_failed(self.port, self._serial)

    def _open_port(self) -> LocalPort | RemotePort:
        """The port opened at the ROM's rate; a remote port reuses the connection its
        last session left open (closing it would make the relay reset the board)."""
        links = self.flasher.links
        if is_remote(self.port):
            held = links.take(self.port) if links is not None else None
            if isinstance(held, RemotePort):
                held.aborted = False
                held.timeout = DEFAULT_TIMEOUT
                held.baudrate = ROM_BAUD
                return held
            remote = RemotePort()
            remote.port, remote.baudrate = self.port, ROM_BAUD
            try:
                remote.open()
            except serial.SerialException as e:
                raise PortError(f"{self.port}: cannot open: {first_line(e)}") from e
            return remote
        port = LocalPort()
        port.port = self.port
        port.baudrate = ROM_BAUD
        port.exclusive = True  # two sessions on one port would corrupt each other
        try:
            port.open()
        except serial.SerialException as e:
            raise open_error(self.port, e) from e
        return port

    def _connect_error(self, e: FatalError, message: str) -> PortError:
        """Not an ESP only if the sync itself met garbage; after a sync, it is noise."""
        text = str(e)
        if self._step == "chip detection" and text.startswith("Failed to connect"):
            if any(sign in text for sign in NOT_ESP_SIGNS):
                return NotAnEspError(f"{self.port}: something answers, but not an ESP "
                                     f"bootloader ({message})")
            return PortError(f"{self.port}: no answer from an ESP bootloader ({message}); "
                             "is the board in download mode?")
        if self._baud_unconfirmed:  # esptool's change_baud does not check the bridge follows
            return PortError(f"{self.port}: no reply after switching to {self.rate} "
                             "baud: the port's adapter may not support it (set [ports] baud "
                             f"lower) ({message})", transient=False)  # again would fail alike
        return PortError(f"{self.port}: the board synced, then {self._step} failed "
                         f"({message})")

    # -- blocking parts (session thread) --

    def connect_blocking(self) -> None:
        """Connect at the port's rate (baud.py), stepping down while the line fails."""
        opts = self.flasher
        self.native = opts.native(self.port)
        adapter = opts.adapter(self.port)
        self._slot = self.keys[0]
        self._adapter_name = adapter.describe()
        rate, why = opts.line.rate_for(adapter, self.keys)
        earlier = None
        if self.native is not None:  # the chip's own USB ignores the baud rate
            rate, self._adapter_name = None, f"native USB {self.native.kind}"
        elif rate is not None:
            rate, earlier = opts.memory.limit(self._slot, rate)
        try:
            self._connect_laddered(rate)
        except FatalError as e:
            # To esptool a board without an auto-reset circuit and a mute board look the
            # same. By default local ports keep failing after their retries (a dead board
            # must not hold its slot for minutes); on a hub host's port the missing or too
            # slow circuit is the common case, and nobody can reach the port but the
            # station. A line of boards without the circuit asks on every port.
            if self.native is not None or not self._may_ask_buttons() or \
                    not any(s in str(e) for s in NO_DOWNLOAD_SIGNS):
                raise
            self._await_buttons(rate, e)
        self._notes.append(RateNote(
            baud=self.rate, adapter=self._adapter_name, remembered=earlier is not None,
            reason=(f"slot {earlier.slot} stepped down {earlier.from_baud}->{earlier.to_baud} "
                    f"earlier ({earlier.reason})") if earlier is not None else None))
        log.debug("%s: line rate %s (%s)", self.port, self.rate, why)

    def _may_ask_buttons(self) -> bool:
        policy = self.flasher.ask_buttons
        return self.flasher.on_buttons is not None and \
            (policy == "all" or (policy == "remote" and is_remote(self.port)))

    def _await_buttons(self, rate: int | None, first: FatalError) -> None:
        """The reset sequence did not reach download mode and the board stays silent:
        no auto-reset circuit (or one that fails). Ask for BOOT + EN on the board's row
        and sync without resetting until someone presses them, or give up."""
        log.warning("%s: no download mode after the reset sequence (%s): press BOOT + EN",
                    self.port, first_line(first))
        self.ask_buttons(True)
        deadline = time.monotonic() + self.flasher.buttons_timeout
        self._connect_mode = "no-reset"
        try:
            while True:
                if self._serial is not None and self._serial.aborted:
                    raise first
                self._reopen()  # the failed attempt's port (a remote one is kept, reused)
                try:
                    self._connect_laddered(rate)
                    self.ask_buttons(False)  # "in download mode" (a failure ends the row)
                    return
                except FatalError as e:
                    if time.monotonic() >= deadline or \
                            not any(s in str(e) for s in NO_DOWNLOAD_SIGNS):
                        raise PortError(
                            f"{self.port}: no download mode after the reset sequence and "
                            f"nobody pressed BOOT + EN within {self.flasher.buttons_timeout:g}"
                            f" s (a board without an auto-reset circuit?) ({first_line(e)})",
                            transient=False) from e
        finally:
            self._connect_mode = "default-reset"

    def _connect_laddered(self, rate: int | None) -> None:
        while True:
            try:
                self.rate = self._connect_at(rate)
                return
            except _StubAtRateFailed:
                self._reopen()  # the fallback: as on every other chip, stub at 115200
                continue
            except FatalError as e:
                # only a failure after the baud change is the line's (before it, 115200)
                lower = self._line_failed(rate, e, self._step) if self._baud_unconfirmed \
                    else None
                if lower is None:
                    raise
                self._reopen()
                rate = lower

    def _line_failed(self, rate: int | None, e: FatalError, where: str) -> int | None:
        """The next rate down after a line failure at `rate`, or None: not the line's
        fault, or the ladder is at its end. Records the step and the slot remembers it."""
        if rate is None or (self._serial is not None and self._serial.aborted):
            return None
        if not points_at_line(str(e)) or not os.path.exists(self.port):
            return None  # not the line's fault, or the board was pulled: nothing to remember
        lower = next_lower(rate)
        if lower is None:
            return None
        what = f"no reply after {where}" if where.startswith("the change") else \
            f"{where} failed at {rate} baud"
        reason = f"{what} ({first_line(e)})"
        step = Step(slot=self._slot, from_baud=rate, to_baud=lower, reason=reason)
        self.flasher.memory.remember(step)
        self._notes.append(RateNote(baud=lower, adapter=self._adapter_name, stepped_from=rate,
                                    reason=reason))
        log.warning("%s: %s; stepping down to %d baud", self.port, reason, lower)
        return lower

    def _reopen(self) -> None:
        """Close the port and start over in the ROM: the next connect resets a real board
        (DTR/RTS); on a pty the close itself is the reset, so it must be seen first."""
        self._close_blocking()
        self._serial, self.esp, self._baud_unconfirmed = None, None, False
        time.sleep(RECONNECT_PAUSE)

    def _connect_at(self, rate: int | None) -> int | None:
        """Connect, load the stub and change to `rate`; returns the rate in use."""
        opts = self.flasher
        port = self._open_port()
        self._serial = port
        self._step = "chip detection"
        esp = detect_chip(port, ROM_BAUD, trace_enabled=opts.trace,
                          connect_mode=self._connect_mode,
                          connect_attempts=opts.connect_attempts)
        self.esp = esp
        chip = chip_name(esp)
        if opts.chips and chip not in opts.chips:
            log.info("%s: %s board, firmware is for %s: not loading the stub", self.port, chip,
                     ", ".join(opts.chips))
            return ROM_BAUD if rate is not None else None
        changed = rate is not None and rate != ROM_BAUD
        self._step = "the stub upload"
        if changed and chip in FAST_STUB_CHIPS and chip not in _fast_stub_failed:
            assert rate is not None
            self._change_and_probe(rate)  # on the ROM: the stub then travels at `rate`
            self._step = "the stub upload"
            try:
                esp = self.esp = run_stub(esp)
            except FatalError as e:
                log.warning("%s: the %s stub did not start at %d baud (%s); loading it at "
                            "%d from now on", self.port, chip, rate, first_line(e), ROM_BAUD)
                _fast_stub_failed.add(chip)
                raise _StubAtRateFailed() from e
        else:
            esp = self.esp = run_stub(esp)
            if changed:
                assert rate is not None
                self._change_and_probe(rate)
        self._step = "the flash attach"
        attach_flash(esp)
        self._baud_unconfirmed = False
        if not esp.secure_download_mode:
            size = detect_flash_size(esp)
            if size is not None:  # as write_flash's flash_size="keep"
                esp.flash_set_parameters(flash_size_bytes(size))
        log.debug("%s: connected to %s (stub %s) at %s baud", self.port, chip, esp.IS_STUB,
                  rate)
        return rate

    def _change_and_probe(self, rate: int) -> None:
        self._step = f"the change to {rate} baud"
        self.esp.change_baud(rate)
        self._baud_unconfirmed = True
        self.rate = rate
        # esptool does not check that the bridge followed: one register read, with a
        # timeout a working line never needs, tells a garbling line in milliseconds.
        self.esp.read_reg(self.esp.EFUSE_RD_REG_BASE, timeout=PROBE_TIMEOUT)

    def _identify_blocking(self) -> BoardIdentity:
        esp = self.esp
        # A READ_REG reply carries no checksum and esptool drops the ESP32's MAC CRC: one
        # flipped bit on a noisy line names another board, which would then be registered
        # and flashed as that thing (the soak saw it). Two reads must agree.
        mac = bytes(esp.read_mac()).hex()
        again = bytes(esp.read_mac()).hex()
        if mac != again:
            raise PortError(f"{self.port}: the MAC read back as {mac}, then as {again}: the "
                            "serial line garbles replies (check the cable and the hub)")
        size = None
        if esp.IS_STUB and not esp.secure_download_mode:
            text = detect_flash_size(esp)
            size = flash_size_bytes(text) if text else None
        return BoardIdentity(chip=chip_name(esp), mac=mac, flash_size=size)

    def _write_blocking(self, region: Region, report: Callable[[int], None]) -> None:
        write_region(self.esp, region, report, self.port,
                     aborted=lambda: self._serial is not None and self._serial.aborted)

    def _write_laddered(self, region: Region, report: Callable[[int], None]) -> None:
        """A write whose blocks fail on the line reconnects one rate lower and starts the
        region again (the stub's erase state is gone with the reset)."""
        while True:
            try:
                self._write_blocking(region, report)
                return
            except FatalError as e:
                lower = self._line_failed(self.rate, e, f"write {region.name}")
                if lower is None:
                    raise
                self._reopen()
                self._connect_laddered(lower)
                report(0)

    def _verify_blocking(self, region: Region) -> None:
        md5 = self.esp.flash_md5sum(region.offset, len(region.data))
        if md5 != region.md5:
            empty = md5 == _erased_md5(len(region.data))
            raise VerifyError(f"{self.port}: {region.name} at 0x{region.offset:x}: flash MD5 "
                              f"{md5} != image MD5 {region.md5}"
                              + (" (the region is erased: the write did not land)"
                                 if empty else ""))

    def _reset_blocking(self, capture: bool = False) -> None:
        if capture and self.native is None and self._serial is not None:
            # The story is told once, from the reset on: the port must already be at the
            # console's rate and open (its input queue holds what comes while the worker
            # turns to console()). A baud change moves no modem line, so it resets nothing.
            self._serial.baudrate = ROM_BAUD
        if self.native is not None:
            # The chip's own USB: esptool's watchdog reset restarts it fully (also after
            # BOOT was held), and falls back to the hard reset on chips without one. The
            # port then drops off the bus and re-enumerates (reenumeration.py).
            log.debug("%s: native USB (%s %04x:%04x): watchdog reset", self.port,
                      self.native.kind, self.native.vid, self.native.pid)
            reset_chip(self.esp, "watchdog-reset")
            return
        # On a pty, setting DTR/RTS fails with ENOTTY: esptool warns once and goes on.
        self.esp.hard_reset()

    def _close_blocking(self) -> None:
        links = self.flasher.links
        if isinstance(self._serial, RemotePort) and links is not None and \
                self._serial.is_open:  # (esptool closes it itself after a failed connect)
            self._serial.aborted = False  # the keeper reads it from now on
            links.keep(self.port, self._serial)
            return
        if self._serial is not None:
            with contextlib.suppress(Exception):
                self._serial.close()

    # -- BoardSession --

    async def identify(self) -> BoardIdentity:
        if self.identity is None:
            self.identity = await self.call("identify", self._identify_blocking)
        return self.identity

    async def write(self, region: Region, progress: ProgressFn) -> None:
        if self.flasher.chips and chip_name(self.esp) not in self.flasher.chips:
            raise WrongChipError(chip_name(self.esp), self.flasher.chips)
        loop = asyncio.get_running_loop()
        total = len(region.data)
        interval = self.flasher.progress_interval
        last = [0.0]

        def deliver(done: int, total: int) -> None:
            if not self._closed:
                progress(done, total)

        def report(done: int) -> None:  # session thread
            now = time.monotonic()
            if done >= total or now - last[0] >= interval:
                last[0] = now
                with contextlib.suppress(RuntimeError):  # the loop is closing
                    loop.call_soon_threadsafe(deliver, min(done, total), total)

        progress(0, total)
        await self.call(f"write {region.name}", lambda: self._write_laddered(region, report))

    async def verify(self, region: Region) -> None:
        await self.call(f"verify {region.name}", lambda: self._verify_blocking(region))

    async def reset(self, capture: bool = False) -> None:
        try:
            await self.call("reset", lambda: self._reset_blocking(capture))
        finally:
            if not capture:
                await self.close()

    async def console(self, timeout: float, enough: Callable[[str], bool]) -> str | None:
        return await self.call("boot", lambda: self._console_blocking(timeout, enough))

    def _console_blocking(self, timeout: float, enough: Callable[[str], bool]) -> str | None:
        """Read the console until `enough(text)` or the deadline; the text as read."""
        if self.native is not None:  # the port left the bus with the reset: story lost
            return None
        port = self._serial
        if port is None:
            return ""
        deadline = time.monotonic() + timeout
        port.timeout = CONSOLE_READ_TIMEOUT
        data = bytearray()
        while time.monotonic() < deadline:
            data += port.read(max(1, port.in_waiting))
            text = data.decode("ascii", "replace")
            if enough(text):
                return text
        return data.decode("ascii", "replace")

    async def close(self) -> None:
        """Abort the port (a blocked esptool call fails at once), close it, end the thread."""
        if self._closed:
            return
        self._closed = True
        if self._serial is not None:
            self._serial.abort()
        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(self._executor, self._close_blocking)
            try:
                await asyncio.wait_for(asyncio.shield(job), CLOSE_TIMEOUT)
            except TimeoutError:
                log.warning("%s: esptool did not stop within %.0fs; leaving its thread",
                            self.port, CLOSE_TIMEOUT)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)


class _StubAtRateFailed(Exception):
    """The stub did not start at the fast rate: connect again, stub at 115200."""


@functools.lru_cache(maxsize=16)
def _erased_md5(size: int) -> str:
    return hashlib.md5(b"\xff" * size).hexdigest()
