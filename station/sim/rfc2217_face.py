"""The RFC 2217 face of a virtual board: a TCP listener relaying to its serial side.

Real lines put USB hubs on small hosts next to the benches and serve each port over
RFC 2217 (telnet COM-port control: ser2net, esptool's ``esp_rfc2217_server``); unlike a
pty, that carries DTR/RTS and baud changes. The face is what such a hub host would be:

* The telnet/RFC 2217 protocol is pyserial's own server side,
  :class:`serial.rfc2217.PortManager` (the class ``esp_rfc2217_server`` builds on), so
  option negotiation, escaping and the COM-port subnegotiations are the reference ones.
* The far side of the relay is the board's pty, opened exactly as a local host would
  (pyserial, raw mode). A baud change the client sets over RFC 2217 lands in the pty's
  termios, where the board's line-rate model reads it (:mod:`.pty_link`), so the model
  follows the client's rate. The TCP connection opening is the host opening the port;
  closing it is the host closing the port, as for a local pty.
* DTR and RTS cannot go through a pty, so they go to the board's reset circuit
  (``on_lines(dtr, rts)``; :mod:`.reset_circuit`). pyserial's client waits for the
  server's answer to every SET_CONTROL (``rfc2217_set_control``), so each line change
  costs a round trip, and esptool's reset sequence arrives stretched by them.
* One client at a time, as ser2net and esp_rfc2217_server serve a port: a second
  connection is closed at once.
* Unplugging closes the listener and every connection; a native board whose pty
  vanishes (re-enumeration) ends its connection too: the station sees the far end close.

Everything runs on the rig's event loop; nothing blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable

import serial
from serial import rfc2217

HOST = "127.0.0.1"
IAC = b"\xff"
_READ = 65536

log = logging.getLogger(__name__)
LinesCallback = Callable[[bool, bool], None]


class _Writer:
    """The ``connection`` PortManager answers through (needs only ``write``)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)


class PtySide:
    """What PortManager drives: the pty opened as a host opens it; DTR/RTS to the board.

    PortManager sets ``baudrate``, ``bytesize``, ``parity``, ``stopbits``, ``xonxoff``,
    ``rtscts``, ``break_condition``, ``dtr``, ``rts`` and purges; it reads the modem
    status lines only from ``check_modem_lines``, which the face never calls (a USB-UART
    bridge's CTS/DSR are not wired on an ESP devkit).
    """

    def __init__(self, path: str, on_lines: LinesCallback) -> None:
        self._serial = serial.Serial(path, baudrate=115200, timeout=0)
        self.fd: int = self._serial.fd
        os.set_blocking(self.fd, False)
        self._on_lines = on_lines
        self._dtr = False
        self._rts = False
        self.break_condition = False
        self.cts = self.dsr = self.ri = self.cd = False

    # serial settings land on the pty: the board's line model reads them
    @property
    def baudrate(self) -> int:
        return int(self._serial.baudrate)

    @baudrate.setter
    def baudrate(self, value: int) -> None:
        self._serial.baudrate = value

    @property
    def bytesize(self) -> int:
        return int(self._serial.bytesize)

    @bytesize.setter
    def bytesize(self, value: int) -> None:
        self._serial.bytesize = value

    @property
    def parity(self) -> str:
        return str(self._serial.parity)

    @parity.setter
    def parity(self, value: str) -> None:
        self._serial.parity = value

    @property
    def stopbits(self) -> float:
        return float(self._serial.stopbits)

    @stopbits.setter
    def stopbits(self, value: float) -> None:
        self._serial.stopbits = value

    @property
    def xonxoff(self) -> bool:
        return bool(self._serial.xonxoff)

    @xonxoff.setter
    def xonxoff(self, value: bool) -> None:
        self._serial.xonxoff = value

    @property
    def rtscts(self) -> bool:
        return bool(self._serial.rtscts)

    @rtscts.setter
    def rtscts(self, value: bool) -> None:
        self._serial.rtscts = value

    # the modem-control lines: to the board's reset circuit
    @property
    def dtr(self) -> bool:
        return self._dtr

    @dtr.setter
    def dtr(self, value: bool) -> None:
        self._dtr = bool(value)
        self._on_lines(self._dtr, self._rts)

    @property
    def rts(self) -> bool:
        return self._rts

    @rts.setter
    def rts(self, value: bool) -> None:
        self._rts = bool(value)
        self._on_lines(self._dtr, self._rts)

    def reset_input_buffer(self) -> None:
        with contextlib.suppress(OSError, serial.SerialException):
            self._serial.reset_input_buffer()

    def reset_output_buffer(self) -> None:
        with contextlib.suppress(OSError, serial.SerialException):
            self._serial.reset_output_buffer()

    def close(self) -> None:
        # A hub host's close drops DTR and RTS (HUPCL); both released leave the chip alone.
        self._dtr = self._rts = False
        self._on_lines(False, False)
        with contextlib.suppress(OSError, serial.SerialException):
            self._serial.close()


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Rfc2217Face:
    """A TCP listener serving one board's serial side over RFC 2217."""

    def __init__(self, port: int, pty_path: Callable[[], str | None],
                 on_lines: LinesCallback, name: str = "") -> None:
        self.requested_port = port  # 0: the system picks a free one
        self.port = port
        self._pty_path = pty_path
        self._on_lines = on_lines
        self._name = name
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self.connections = 0  # clients served, ever (tests, logs)

    @property
    def url(self) -> str:
        return f"rfc2217://{HOST}:{self.port}"

    async def start(self) -> None:
        """Listen; a taken port is a ValueError naming it (the rig's user chose it)."""
        try:
            self._server = await asyncio.start_server(self._serve, HOST, self.requested_port)
        except OSError as e:
            raise ValueError(f"{self._name}: cannot listen on TCP port "
                             f"{self.requested_port}: {e.strerror}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every client (the far end closes)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = self._pty_path()
        if self._clients or path is None:  # busy, or the board is off the bus
            writer.close()
            return
        try:
            side = PtySide(path, self._on_lines)
        except (OSError, serial.SerialException) as e:
            log.warning("%s: cannot open %s for an RFC 2217 client: %s", self._name, path, e)
            writer.close()
            return
        self._clients.add(writer)
        self.connections += 1
        loop = asyncio.get_running_loop()
        manager = rfc2217.PortManager(side, _Writer(writer))
        loop.add_reader(side.fd, self._to_client, side, writer)
        try:
            while True:
                data = await reader.read(_READ)
                if not data:
                    break
                if IAC not in data and manager.mode == rfc2217.M_NORMAL \
                        and manager.suboption is None:
                    out = data  # plain data: no telnet state to track
                else:
                    out = b"".join(manager.filter(data))
                if out and not await self._to_board(side, out):
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            loop.remove_reader(side.fd)
            side.close()  # the host closed the port
            self._clients.discard(writer)
            writer.close()

    @staticmethod
    def _to_client(side: PtySide, writer: asyncio.StreamWriter) -> None:
        try:
            data = os.read(side.fd, _READ)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:
                log.debug("pty read failed: %s", e)
            data = b""
        if not data:  # the pty is gone (re-enumeration): the far end closes
            asyncio.get_running_loop().remove_reader(side.fd)
            writer.close()
            return
        if not writer.is_closing():
            writer.write(data.replace(IAC, IAC + IAC))

    @staticmethod
    async def _to_board(side: PtySide, data: bytes) -> bool:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(side.fd, view):]
            except BlockingIOError:
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_writer(side.fd, _settle, fut)
                try:
                    await asyncio.wait_for(fut, 30)
                except TimeoutError:
                    return False
                finally:
                    loop.remove_writer(side.fd)
            except OSError:
                return False
        return True
