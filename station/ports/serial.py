"""The serial edge below esptool: its process-wide logger and the ports it talks through.

Why it looks like this:

- esptool's logger is one process-wide object. It is replaced (once) by a logger that
  sends everything to `logging.getLogger("station.flasher")` with the port in the
  message (each board's session thread names its port), so sixteen threads do not print
  "Connecting...." into the live dashboard.
- A board that is pulled, or a job that is cancelled, must not leave a thread blocked in
  esptool: `abort()` wakes a read or write blocked in select() and makes every later one
  fail at once, so esptool (retries and all) gives up in milliseconds. A local port is a
  device node; a remote one is pyserial's RFC 2217 client, taught to send only real
  line-setting changes (esptool touches the timeout before most commands) and not to
  wait for DTR/RTS answers a hub host never sends (esptool's `esp_rfc2217_server`).
- Why a port will not open decides what to do next: permissions cannot be fixed by a
  retry; a port held by another program names the program and the udev fix.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import threading
from typing import Any

import serial
from esp_pylib.logger import EspLog, EspLogBase
from esptool import reset as esptool_reset
from esptool.util import PrintOnce
from serial import rfc2217

from station.errors import PortError
from station.ports.usb import holders

log = logging.getLogger("station.flasher")
CONTROL_ANSWER_S = 1.0  # a hub host answers a DTR/RTS change in milliseconds, or never


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- esptool's process-wide logger, routed to logging ------------------------------------

_local = threading.local()


def set_port_tag(port: str) -> None:
    """Name the port esptool's messages on this thread are about (one thread per board)."""
    _local.port = port


def _port_tag() -> str:
    return getattr(_local, "port", None) or threading.current_thread().name


class _EsptoolToLogging(EspLogBase):
    """Everything esptool says becomes a DEBUG/WARNING record naming the port."""

    def _emit(self, level: int, args: tuple[Any, ...]) -> None:
        text = " ".join(str(a) for a in args).strip()
        if text and text.strip(".") and log.isEnabledFor(level):
            log.log(level, "%s: esptool: %s", _port_tag(), text)

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._emit(logging.DEBUG, args)

    def note(self, *args: Any) -> None:
        self._emit(logging.DEBUG, args)

    def hint(self, *args: Any) -> None:
        self._emit(logging.DEBUG, args)

    def debug(self, *args: Any) -> None:
        self._emit(logging.DEBUG, args)

    def warn(self, *args: Any, suggestion: str | None = None) -> None:
        self._emit(logging.WARNING, args)

    def err(self, *args: Any, suggestion: str | None = None) -> None:
        self._emit(logging.WARNING, args)

    warning = warn
    error = err

    def set_verbosity(self, mode: int | str) -> None:
        pass

    def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "",
                     suffix: str = "", bar_length: int = 30) -> None:
        pass


_install_lock = threading.Lock()


def quiet_esptool() -> None:
    """Replace esptool's stdout logger with ours (idempotent, process-wide)."""
    with _install_lock:
        if isinstance(EspLog.instance, _EsptoolToLogging):
            return
        EspLog.instance = _EsptoolToLogging()
        # bound to the old logger when esptool was imported; it warns about DTR/RTS
        esptool_reset.ResetStrategy.print_once = PrintOnce(EspLog.instance.warn)


# -- the serial port ----------------------------------------------------------------------


class _Abortable:
    """A serial port that can be aborted from another thread.

    After `abort()`, a read or write blocked in select() wakes up and every later one
    raises at once, so esptool (retries and all) gives up within milliseconds.
    """

    port: str | None

    aborted = False

    def abort(self) -> None:
        self.aborted = True
        # a local port wakes a blocked select(); pyserial's RFC 2217 client has no
        # cancel (its reads wait on a queue for at most the timeout): AttributeError
        for cancel in ("cancel_read", "cancel_write"):
            with contextlib.suppress(Exception):
                getattr(self, cancel)()

    def _check(self) -> None:
        if self.aborted:
            raise serial.SerialException(f"{self.port}: closed by the station")

    def read(self, size: int = 1) -> bytes:
        self._check()
        data: bytes = super().read(size)  # type: ignore[misc]
        self._check()
        return data

    def write(self, data: Any) -> int | None:
        self._check()
        return super().write(data)  # type: ignore[misc]


class LocalPort(_Abortable, serial.Serial):
    """A local port (a device node).

    esptool sets the port's timeout before a command and back after it whenever the
    two differ (`loader.py` `command`: every READ_REG of an eFuse burn), and pyserial's
    POSIX port answers each change with a full `_reconfigure_port`: flock (the port is
    exclusive), tcgetattr, the termios arithmetic, though its reads and writes take
    their timeouts from select() and the termios settings do not depend on them
    (`serialposix.py`: "timeout is done via select"). Only a change of what termios
    holds reaches the device here; opening still configures everything."""

    _line: tuple[object, ...] | None = None

    def open(self) -> None:
        self._line = None
        super().open()

    def _reconfigure_port(self, force_update: bool = False) -> None:
        line = (self._baudrate, self._bytesize, self._parity, self._stopbits,
                self._xonxoff, self._rtscts, self._inter_byte_timeout, self._exclusive,
                self._rs485_mode)
        if force_update or line != self._line:
            super()._reconfigure_port(force_update)
            self._line = line


class RemotePort(_Abortable, rfc2217.Serial):
    """An `rfc2217://host:port` port (remote.py): pyserial's RFC 2217 client, which
    esptool resets with its classic sequence (every DTR/RTS change is a round trip).

    esptool sets the port's timeout before most commands, and pyserial's client answers
    every setter with a full renegotiation (baud, data bits, parity, stop bits, flow
    control: five round trips, ~0.25 s with its 50 ms answer polling), though its reads
    take the timeout from a local queue: a 2-second `flash-id` took 20 s. Only a change of
    a line setting goes to the far end here."""

    _line: tuple[object, ...] | None = None
    control_unanswered = False
    far_end_closed = False
    """The hub ended the connection (EOF or a socket error while the port was open). Not
    the same as closed: esptool closes the port itself after a failed connect, and that
    is a mute board, not an unplugged one (remoteports.link_failed)."""

    def rfc2217_set_control(self, value: bytes) -> None:
        """Send a DTR/RTS change; stop waiting for answers once a hub host sends none.

        ser2net and pyserial's server answer every SET_CONTROL. esptool's
        `esp_rfc2217_server` answers none: it swallows the client's DTR/RTS changes and
        runs esptool's reset sequences on the hub host with their own timing (its
        `esp_port_manager.py`; its banner asks for `?ign_set_control`). pyserial's client
        would give up after 3 s ("timeout while waiting for option 'control'"); after one
        unanswered change this port sends the rest as pyserial's `ign_set_control` does.
        """
        if self.control_unanswered:
            self._ignore_set_control_answer = True  # pyserial's open() clears it
            super().rfc2217_set_control(value)
            return
        item = self._rfc2217_options["control"]
        item.set(value)
        try:
            item.wait(CONTROL_ANSWER_S)
        except serial.SerialException:
            self.control_unanswered = True
            log.info("%s: the hub host does not answer DTR/RTS changes (esp_rfc2217_server "
                     "resets the board itself); not waiting for answers", self.port)

    def open(self) -> None:
        self._line = None
        self.far_end_closed = False
        super().open()

    def _telnet_read_loop(self) -> None:
        super()._telnet_read_loop()  # returns on EOF, a socket error, or our close
        if self.is_open:
            self.far_end_closed = True

    def _reconfigure_port(self) -> None:
        line = (self._baudrate, self._bytesize, self._parity, self._stopbits,
                self._xonxoff, self._rtscts)
        if line != self._line or self._write_timeout is not None:  # pyserial refuses a
            super()._reconfigure_port()  # write timeout there, and esptool relies on that
            self._line = line


@functools.lru_cache(maxsize=64)
def open_error(port: str, e: serial.SerialException) -> PortError:
    """What to do about a port that will not open: a retry cannot fix permissions."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return PortError(f"{port}: cannot open: permission denied; run the station as a "
                         "user in the 'dialout' group (see config/udev-notes.md)",
                         transient=False)
    if "exclusively lock" in str(e):
        who = ", ".join(holders(port)) or "a serial monitor, or ModemManager probing it"
        return PortError(f"{port}: cannot open: another program holds the port ({who}); "
                         "stop it, and keep ModemManager off the rig's ports with a udev rule "
                         "setting ENV{ID_MM_DEVICE_IGNORE}=\"1\" (see config/udev-notes.md)")
    return PortError(f"{port}: cannot open: {first_line(e)}")
