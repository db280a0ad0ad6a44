"""Connecting: a board brought from its port into the stub, at the best rate the line holds.

The session's first half (session.py is the rest): open the port (a remote one reuses the
connection its last session kept), reset into the ROM's download mode and sync, upload
the stub and change the rate, attach the flash.

- The line rate is tried, not trusted (ports/baud.py): esptool's `change_baud` does not
  check that the bridge followed, so a register read with a short timeout follows every
  change; a line failure there or in a block write closes the port (a real board is
  reset by the next connect, a pty by the close), reconnects one ladder rate lower and
  goes on. Each step is a `RateNote`, reported after the thread's call returns.
- A board whose reset sequence never reaches download mode (no auto-reset circuit) is
  asked for BOOT + EN on its row, where [ports] ask_buttons says so.

What a connect costs, and what is left of it (issue #23, esptool 5.6's source):
- Chip detection: esptool's detect_chip asks GET_SECURITY_INFO first; the classic
  ESP32's ROM refuses it and esptool drains each refusal for 0.2 s, twice (loader.py
  `drain_input_buffer`, `get_security_info`'s 20- then 12-byte tries): 0.4 s. A slot
  whose chip is known to be an ESP32 (its last board, or the only chip the station has
  firmware for) is connected with esptool's ESP32 class and checked by its magic
  register, as detect_chip does after the refusal; another chip there is detected by
  esptool on the synced ROM, without a second reset.
- The stub travels at the line rate only where esp-flasher-stub keeps the ROM's UART
  (FAST_STUB_CHIPS); elsewhere at 115200 (0.5-0.8 s: the one cost left on those chips).
- A rate that failed once makes the session try each lower rate on the ROM first (a
  CHANGE_BAUDRATE, a register read, and back to 115200 for the stub): a rung costs a
  probe timeout and a reset, not a stub upload each. A rate the port's bridge cannot
  carry by its data sheet (sysfs VID:PID and product, ports/baud.py) is tried on the ROM
  from the start, and its failure jumps straight to the bridge's top rate: a CP2102
  asked for 3 Mbaud pays one failed probe, not a stub and three rungs.
- Kept as esptool has them: change_baud's 50 ms wait for the bytes of the switch, and
  attach_flash's XMC boot-up and flash connection checks (a few SPI commands, each a
  dozen register round trips).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import serial
from esptool.cmds import attach_flash, detect_chip, detect_flash_size, run_stub
from esptool.loader import DEFAULT_TIMEOUT, ESPLoader
from esptool.targets import CHIP_DEFS
from esptool.util import FatalError, flash_size_bytes

from station.errors import NotAnEspError, PortError
from station.flash.first_boot_guard import FirstBootGuard
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
    beyond,
    first_line,
    is_remote,
    open_error,
    points_at_line,
    rung_after,
)

log = logging.getLogger("station.flasher")

ROM_BAUD = 115200
# esptool's words when its reset sequence did not bring the ROM's download mode up: a
# silent line, or the ROM's SPI-boot banner ("Wrong boot mode detected (0x13)")
NO_DOWNLOAD_SIGNS = ("No serial data received", "Wrong boot mode detected")
# A register read after a baud change takes milliseconds when the line works (a USB
# bridge adds 1-16 ms: FTDI's latency timer); a remote port adds the network and the relay.
PROBE_TIMEOUT = 0.5  # remote ports
LOCAL_PROBE_TIMEOUT = 0.2  # local ports
# esp-flasher-stub sends OHAI right after its start-up (src/main.c): a fast-rate stub that
# has not greeted within this is not coming (its UART is at another rate)
STUB_GREETING_TIMEOUT = 0.5
# Chips esptool tells only by the magic register, whose ROM lacks GET_SECURITY_INFO:
# cmds.detect_chip asks for it first ("cmd not supported on ESP8266 and ESP32") and the
# ROM's refusal costs a 0.2 s drain per try, two tries (loader.command,
# drain_input_buffer; loader.get_security_info tries 20 then 12 bytes). A slot whose
# chip is known connects with that chip's class and checks the magic register instead.
MAGIC_ONLY_CHIPS = frozenset({"esp32"})
RECONNECT_PAUSE = 0.1  # after closing a port before reopening it: a pty's only reset
# Chips whose esp-flasher-stub keeps UART0 as the ROM left it: on these the ROM changes
# the rate first and the stub travels at it. esptool 5.6 ships esp-flasher-stub v1.4.1
# (targets/stub_flasher/2/README.md); its src/main.c at v1.1.0 (the newest release we
# could read) raises the clocks and resets the divider to the ROM's stored rate
# (stub_lib_uart_rominit_get_baudrate(): UartDev.baud_rate) on ESP32, -S2 and -P4, and a
# later main.c (read before, not re-checked against v1.4.1) also on -S3, -C6, -S31, -H21
# and -H4. Whether the ROM's CHANGE_BAUDRATE updates UartDev.baud_rate is in the closed
# ROM, so those chips keep the safe path: the stub at 115200, then the change.
FAST_STUB_CHIPS = frozenset({"esp32c2", "esp32c3", "esp32c5", "esp32c61", "esp32h2"})
_fast_stub_failed: set[str] = set()  # chips whose stub did not start at a fast rate
# Connect failures that mean "something answers, but it is not an ESP bootloader".
NOT_ESP_SIGNS = ("Invalid head of packet", "Invalid SLIP escape", "Unexpected chip",
                 "Failed to autodetect", "Response doesn't match request")




def chip_name(esp: Any) -> str:
    """esptool's "ESP32-S3" -> our "esp32s3"."""
    return str(esp.CHIP_NAME).lower().replace("-", "")



class ConnectOptions(Protocol):
    """What connecting reads of its flasher (session.EsptoolFlasher)."""

    native: Callable[[str], NativeUsb | None]
    adapter: Callable[[str], Adapter]
    line: BaudSettings
    memory: SlotMemory
    links: RemoteLinks | None
    chips: tuple[str, ...]
    trace: bool
    connect_attempts: int
    known_chips: dict[str, str]  # slot -> the chip its last board was
    on_buttons: Callable[[str, bool], None] | None
    buttons_timeout: float
    ask_buttons: str
    first_boot_wait: float | None  # key = "device" lines: see first_boot_guard.py
    first_boot_slots: set[str]  # slots the last stop caught in a first boot (once each)


class Connection:
    """A board's port and the esptool loader on it; everything here runs on the session's
    thread (blocking)."""

    def __init__(self, port: str, flasher: ConnectOptions, keys: tuple[str, ...] = ()) -> None:
        self.port = port
        self.keys = keys or (port,)
        self.flasher = flasher
        self.name = Path(port).name
        self.esp: Any = None
        self._serial: LocalPort | RemotePort | None = None
        self._step = "open"  # how far connect got, for its error message
        self._baud_unconfirmed = False  # changed the baud, no reply at the new one yet
        self._rom_probe = False  # the line failed once: try each rate on the ROM first
        self.rate: int | None = None  # the line rate in use; None: native USB
        self._slot = port
        self._adapter = Adapter()  # sysfs facts of the port (connect_blocking)
        self._adapter_name = ""
        self._notes: list[RateNote] = []  # to report once the thread's call returns
        self.native: NativeUsb | None = None
        self._connect_mode = "default-reset"  # "no-reset" while waiting for BOOT + EN
        self.ask_buttons: Callable[[bool], object] = lambda _waiting: None

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
        # esptool restores this after every command; its bare reads (the stub's OHAI)
        # use it, and pyserial's default (None) would wait forever for a silent stub
        port.timeout = DEFAULT_TIMEOUT
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

    def connect_blocking(self) -> None:
        """Connect at the port's rate (ports/baud.py), stepping down while the line fails."""
        opts = self.flasher
        self.native = opts.native(self.port)
        adapter = self._adapter = opts.adapter(self.port)
        self._slot = self.keys[0]
        self._adapter_name = adapter.describe()
        rate, why = opts.line.rate_for(adapter, self.keys)
        earlier = None
        if self.native is not None:  # the chip's own USB ignores the baud rate
            rate, self._adapter_name = None, f"native USB {self.native.kind}"
        elif rate is not None:
            rate, earlier = opts.memory.limit(self._slot, rate)
            # above the bridge's data sheet: tried on the ROM, where failing costs no stub
            self._rom_probe = beyond(rate, adapter)
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
        lower = rung_after(rate, self._adapter)
        if lower is None:
            return None
        self._rom_probe = True
        what = f"no reply after {where}" if where.startswith("the change") else \
            f"{where} failed at {rate} baud"
        reason = f"{what} ({first_line(e)})"
        if beyond(rate, self._adapter):  # the jump's why, in the ledger's step
            reason += f"; {self._adapter_name} carries {self._adapter.tops[-1]} at most"
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
        self._serial = self._open_port()
        self._step = "chip detection"
        esp = self.esp = self._detect()
        chip = chip_name(esp)
        opts.known_chips[self._slot] = chip
        if opts.chips and chip not in opts.chips:
            log.info("%s: %s board, firmware is for %s: not loading the stub", self.port, chip,
                     ", ".join(opts.chips))
            return ROM_BAUD if rate is not None else None
        changed = rate is not None and rate != ROM_BAUD
        fast = chip in FAST_STUB_CHIPS and chip not in _fast_stub_failed
        self._step = "the stub upload"
        if changed and (fast or self._rom_probe):
            assert rate is not None
            # On the ROM: a line that fails at `rate` costs no stub upload. The stub then
            # travels at `rate` where it keeps the ROM's UART, else back at 115200.
            self._change_and_probe(rate)
            if not fast:
                self._step = f"the change back to {ROM_BAUD} baud"
                esp.change_baud(ROM_BAUD)
                self._baud_unconfirmed, self.rate = False, ROM_BAUD
        self._step = "the stub upload"
        if changed and fast:
            assert rate is not None
            esp = self.esp = self._fast_stub(esp, chip, rate)
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

    def _fast_stub(self, esp: Any, chip: str, rate: int) -> Any:
        """The stub at `rate` (the ROM already changed to it); a stub that does not greet
        there makes this chip take the 115200 path for the rest of the run."""
        port = self._serial
        local = port is not None and not is_remote(self.port)
        if local:
            assert port is not None
            port.timeout = STUB_GREETING_TIMEOUT  # the OHAI wait (run_stub's bare read)
        try:
            return run_stub(esp)
        except FatalError as e:
            log.warning("%s: the %s stub did not start at %d baud (%s); loading it at "
                        "%d from now on", self.port, chip, rate, first_line(e), ROM_BAUD)
            _fast_stub_failed.add(chip)
            raise _StubAtRateFailed() from e
        finally:
            if local:
                assert port is not None
                port.timeout = DEFAULT_TIMEOUT

    def _detect(self) -> Any:
        """The ROM's loader: esptool's detect_chip, or, on a slot whose chip is known and
        answers only by its magic register, that chip's class checked by the register
        (no GET_SECURITY_INFO and its drain, see MAGIC_ONLY_CHIPS)."""
        opts = self.flasher
        expected = opts.known_chips.get(self._slot) or \
            (opts.chips[0] if len(opts.chips) == 1 else None)
        mode = self._connect_mode
        if mode == "default-reset" and opts.first_boot_wait is not None and \
                self.native is None:  # (the chip's own USB reset always enters download)
            # a key = "device" line: our resets, never one that cuts a first boot short
            loader = ESPLoader(self._serial, ROM_BAUD, trace_enabled=opts.trace)
            caught = opts.first_boot_slots & set(self.keys)
            opts.first_boot_slots -= caught
            FirstBootGuard(self._serial, self.port, opts.first_boot_wait,
                           is_remote(self.port)).reset_into_download(
                loader._construct_reset_strategy_sequence(mode), opts.connect_attempts,
                under_way=bool(caught))
            mode = "no-reset"
        if expected in MAGIC_ONLY_CHIPS:
            cls = CHIP_DEFS[expected]
            esp = cls(self._serial, ROM_BAUD, trace_enabled=opts.trace)
            esp.USES_RFC2217 = is_remote(self.port)  # as detect_chip: no input flush
            esp.connect(mode, opts.connect_attempts, detecting=True)
            try:
                magic = esp.read_reg(ESPLoader.CHIP_DETECT_MAGIC_REG_ADDR)
            except FatalError:  # a chip in secure download mode: not a classic ESP32
                magic = None
            if magic == cls.MAGIC_VALUE:
                if esp.sync_stub_detected and cls.STUB_CLASS is not None:
                    esp = cls.STUB_CLASS(esp)  # as detect_chip's check_if_stub
                    esp.sync_stub_detected = True
                esp._post_connect()
                return esp
            log.info("%s: not the %s this slot had (magic %s): detecting the chip",
                     self.port, expected, None if magic is None else f"{magic:#x}")
            mode = "no-reset"  # the ROM is in download mode and synced: no second reset
        return detect_chip(self._serial, ROM_BAUD, trace_enabled=opts.trace, connect_mode=mode,
                           connect_attempts=opts.connect_attempts)

    def _change_and_probe(self, rate: int) -> None:
        self._step = f"the change to {rate} baud"
        self.esp.change_baud(rate)
        self._baud_unconfirmed = True
        self.rate = rate
        # esptool does not check that the bridge followed: one register read, with a
        # timeout a working line never needs, tells a garbling line in milliseconds.
        # (Secure download mode refuses register reads: the next command tells then.)
        if not self.esp.secure_download_mode:
            self.esp.read_reg(self.esp.EFUSE_RD_REG_BASE, timeout=PROBE_TIMEOUT
                              if is_remote(self.port) else LOCAL_PROBE_TIMEOUT)

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


class _StubAtRateFailed(Exception):
    """The stub did not start at the fast rate: connect again, stub at 115200."""
