"""The serial edge: esptool's loader driven from one thread per board.

`EsptoolFlasher.open(port)` connects (sync, chip detection, stub, baud change, flash
attach: _connect.py) and returns an `EsptoolSession`, which implements
`parts.BoardSession`.

Why it looks the way it does:

- esptool is blocking. Each session owns a single-thread executor, so 16 boards get 16
  threads; asyncio's default pool has only min(32, cores + 4) = 6 threads on two cores,
  and the seventh board would queue behind the others.
- esptool's logger is one process-wide object: it is routed to logging, naming the
  port (ports/serial.py, with the abortable local and RFC 2217 ports and the open
  errors), and progress comes from our own write loop instead of `cmds.write_flash`.
- The write loop sends the data blocks itself (_write.py: esptool's own packet code
  costs ~25 ms of CPU per block); everything else goes through esptool's loader
  unchanged.
- The line rate is tried, not trusted (_connect.py, ports/baud.py): a line failure in a
  block write reconnects one ladder rate lower and writes the region again.
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
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import serial
from esptool.cmds import detect_flash_size, reset_chip
from esptool.util import FatalError, flash_size_bytes

from station.errors import (
    FlashError,
    PortError,
    StationError,
    VerifyError,
    WrongChipError,
)
from station.flash._connect import ROM_BAUD, Connection, chip_name
from station.flash._write import write_region
from station.parts import BoardIdentity, ProgressFn, Region
from station.ports import (
    Adapter,
    BaudSettings,
    NativeUsb,
    RateNote,
    RemoteLinks,
    SlotMemory,
    first_line,
    native_usb,
    quiet_esptool,
    set_port_tag,
    usb_adapter,
)

log = logging.getLogger("station.flasher")
T = TypeVar("T")

CONSOLE_READ_TIMEOUT = 0.1  # one console read: how late the boot check sees a deadline
CLOSE_TIMEOUT = 10.0  # an aborted port makes esptool fail in milliseconds; this is a guard
BUTTONS_TIMEOUT = 120.0  # seconds a board without auto-reset waits for BOOT + EN
PROGRESS_INTERVAL = 0.1  # at most ~10 progress callbacks per second per board

# -- the flasher and its sessions ----------------------------------------------------------


class EsptoolFlasher:
    """Opens boards with esptool; implements `parts.Flasher`.

    `baud`: the rate after the stub runs (the ROM always starts at 115200); `line`, when
    given, decides it per port instead (station/ports/baud.py), and `memory` keeps the slots'
    step-downs. `keys(port)` names the port for [ports.baud_by_port] and the memory
    (slot first); `on_rate` receives every RateNote, on the event loop.
    `chip` / `chips`: the chip(s) the station has firmware for; a board of another chip
    still opens (so `identify()` can name it) but gets no stub, and `write()` refuses it.
    `connect_attempts`: esptool's reset+sync attempts (~0.8 s each when nothing answers).
    `first_boot_wait`: on a key = "device" line, how long a first boot's encryption pass
    may run before connecting gives up waiting for it (first_boot_guard.py); None: no
    such line, esptool's own resets. `first_boot_slots`: slots (or ports) whose board the
    last stop caught in its first boot; their first connect waits the pass out.
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
                 ask_buttons: str = "remote", first_boot_wait: float | None = None,
                 first_boot_slots: Collection[str] = ()) -> None:
        self.baud = baud
        self.first_boot_wait = first_boot_wait  # key = "device": [verify] boot_timeout
        self.first_boot_slots = set(first_boot_slots)
        self.on_buttons = on_buttons  # (port, waiting): "press BOOT + EN" on its row
        self.buttons_timeout = buttons_timeout
        self.ask_buttons = ask_buttons  # on which ports ([ports] ask_buttons)
        self.links = links  # remote ports' connections between sessions (ports/remote.py)
        self.line = line if line is not None else BaudSettings(baud=baud)
        self.memory = memory if memory is not None else SlotMemory()
        self.adapter = adapter  # sysfs VID:PID and product (ports/usb.py)
        self.keys = keys
        self.on_rate = on_rate
        self.native = native  # sysfs VID:PID (ports/usb.py); tests may stand in for sysfs
        self.chips = chips or ((chip,) if chip else ())
        self.connect_attempts = connect_attempts
        self.known_chips: dict[str, str] = {}  # slot -> its last board's chip (_connect.py)
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


class EsptoolSession(Connection):
    """One open, synced board; every esptool call runs on this session's own thread.

    Connecting (the port, the ROM, the stub, the baud ladder) is `Connection`'s
    (_connect.py); this class runs it and everything after it on the session's thread."""

    flasher: EsptoolFlasher

    def __init__(self, port: str, flasher: EsptoolFlasher,
                 keys: tuple[str, ...] = ()) -> None:
        super().__init__(port, flasher, keys)
        self.identity: BoardIdentity | None = None
        self._closed = False
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

    def _identify_blocking(self) -> BoardIdentity:
        esp = self.esp
        if esp.secure_download_mode:
            # The ROM answers no register read in secure download mode: no MAC, no eFuses
            raise FlashError(f"{self.port}: the board is in secure download mode (locked): "
                             "the ROM gives no MAC or eFuses over UART, so the station "
                             "cannot tell whose it is; a board this line locked is in the "
                             "ledger (its last job reached lockdown), any other was locked "
                             "by another line", transient=False)
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
        if not region.md5:  # encrypted by the chip with a key the host does not know
            return
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
            # port then drops off the bus and re-enumerates (ports/reenumeration.py).
            log.debug("%s: native USB (%s %04x:%04x): watchdog reset", self.port,
                      self.native.kind, self.native.vid, self.native.pid)
            reset_chip(self.esp, "watchdog-reset")
            return
        # On a pty, setting DTR/RTS fails with ENOTTY: esptool warns once and goes on.
        self.esp.hard_reset()

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

    async def on_loader(self, what: str, fn: Callable[[Any], T]) -> T:
        return await self.call(what, lambda: fn(self.esp))

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



@functools.lru_cache(maxsize=16)
def _erased_md5(size: int) -> str:
    return hashlib.md5(b"\xff" * size).hexdigest()
