"""A pseudo-terminal standing in for a board's USB serial port, with a line-rate model.

The host (esptool, the station) opens the slave side like any serial port; the board
owns the master side. Three Linux pty facts shape this module:

* ``TCGETS2`` on the master returns the *slave's* termios, so the board sees whatever
  baud rate the host set, arbitrary rates included. The line is throttled to it:
  10 bits per byte (start, 8 data, stop), computed as deadlines on the monotonic clock
  for whole chunks, never by sleeping per byte.
* When the host closes the slave, reads on the master fail with EIO and ``poll``
  reports POLLHUP until somebody opens the slave again. A pty carries no DTR/RTS, so
  that close is the only "reset" a host can give; the board treats it as one.
* We do not keep a slave fd open ourselves: that would hide the host's close. Instead,
  while nobody has the slave open, the master is polled every few milliseconds rather
  than registered with the event loop (which would spin on the permanent POLLHUP).

A bridge's baud limit (``max_baud``, see :mod:`station.sim.bridge`) is applied here: above
it, what crosses the link in either direction is garbled. So is a rate mismatch: the chip's
UART (``uart_baud``, set by the board) and the host's port at rates more than
``UART_TOLERANCE`` apart sample each other's bits wrong, as two real UARTs do (a 10-bit
frame survives about half a bit of drift over its length, ~5% between the two ends).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import random
import select
import struct
from collections import Counter

from .bridge import garble

TCGETS2 = 0x802C542A  # _IOR('T', 0x2A, struct termios2), 44 bytes on Linux
_TERMIOS2_SIZE = 44
_OSPEED_OFFSET = 40  # c_iflag..c_lflag (16) + c_line (1) + c_cc[19] + c_ispeed (4)
BITS_PER_BYTE = 10
ROM_BAUD = 115200
OPEN_POLL_INTERVAL_S = 0.005
UART_TOLERANCE = 0.03  # relative rate error between the two UARTs that still reads right
_WRITE_PIECE = 1024  # throttled writes go out in pieces, so the host sees a stream

log = logging.getLogger(__name__)


class HostClosed(Exception):
    """The host closed the port (or the link was torn down): the board resets."""


def line_time(nbytes: int, baud: int) -> float:
    """Seconds the UART needs for ``nbytes`` at ``baud``: 10 bits per byte."""
    return nbytes * BITS_PER_BYTE / baud


class PtyLink:
    """Master side of one pty, with throttled, non-blocking reads and writes."""

    def __init__(self, throttle: bool = True, corrupt_rate: float = 0.0,
                 rng: random.Random | None = None, max_baud: int | None = None,
                 usb_bytes_per_s: float | None = None) -> None:
        self.master, slave = os.openpty()
        self.slave_path = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(self.master, False)
        self.throttle = throttle
        self.corrupt_rate = corrupt_rate
        self.max_baud = max_baud  # a bridge above this rate garbles both directions
        # The chip's UART rate, kept by the board; None: it follows the host's (a board
        # that does not say). Native USB has no UART rate to miss.
        self.uart_baud: int | None = None
        # Native USB ignores the baud rate: its throughput is the USB device's own.
        self.usb_bytes_per_s = usb_bytes_per_s
        self._rng = rng or random.Random(0)
        self._next_corrupt = self._draw_corrupt_gap()
        self._rx_free = 0.0  # when the host->board line is next idle
        self._tx_free = 0.0  # when the board->host line is next idle
        self._poll = select.poll()
        self._poll.register(self.master, select.POLLIN)
        self._closed = False
        # Bytes carried per baud rate, both directions: lets benchmarks and tests
        # predict line time from the traffic a real esptool run actually produced.
        self.traffic: Counter[int] = Counter()

    # -- state --------------------------------------------------------------------

    def baud(self) -> int:
        """The rate the host configured on the slave (115200 if it cannot be read)."""
        buf = bytearray(_TERMIOS2_SIZE)
        try:
            fcntl.ioctl(self.master, TCGETS2, buf)
        except OSError:
            return ROM_BAUD
        (speed,) = struct.unpack_from("<I", buf, _OSPEED_OFFSET)
        return speed or ROM_BAUD

    def _byte_time(self, baud: int) -> float:
        if self.usb_bytes_per_s is not None:
            return 1 / self.usb_bytes_per_s
        return BITS_PER_BYTE / baud

    def over_limit(self, baud: int) -> bool:
        """True when the host drives the bridge faster than it can clock, or the chip's
        UART runs at another rate than the host's port (native USB has no such rate)."""
        if self.max_baud is not None and baud > self.max_baud:
            return True
        return self.usb_bytes_per_s is None and self.uart_baud is not None and \
            abs(self.uart_baud - baud) > UART_TOLERANCE * baud

    @property
    def closed(self) -> bool:
        return self._closed

    def host_is_open(self) -> bool:
        """True while some process has the slave open (no POLLHUP on the master)."""
        if self._closed:
            return False
        return not any(ev & select.POLLHUP for _, ev in self._poll.poll(0))

    async def wait_host_open(self) -> None:
        """Return once the host opens the port; polls, see the module docstring."""
        while not self.host_is_open():
            await asyncio.sleep(OPEN_POLL_INTERVAL_S)
        now = asyncio.get_running_loop().time()
        self._rx_free = self._tx_free = now

    def close(self) -> None:
        """Close the master: the host sees the device vanish (EIO on its next I/O)."""
        if not self._closed:
            self._closed = True
            self._poll.unregister(self.master)
            os.close(self.master)

    # -- I/O ------------------------------------------------------------------------

    async def read(self) -> tuple[bytes, float, float]:
        """Wait for bytes from the host.

        Returns ``(chunk, start, byte_time)``: byte ``i`` of the chunk has fully
        arrived at ``start + (i + 1) * byte_time`` on the loop clock.
        Raises HostClosed when the host closes the port.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except BlockingIOError:
                await self._wait_fd(loop, readable=True)
                continue
            except OSError as e:
                if e.errno == errno.EIO:
                    raise HostClosed from e
                raise
            if not chunk:
                raise HostClosed
            now = loop.time()
            baud = self.baud()
            self.traffic[baud] += len(chunk)
            if self.over_limit(baud):
                chunk = garble(chunk)
            if not self.throttle:
                return chunk, now, 0.0
            byte_time = self._byte_time(baud)
            start = max(self._rx_free, now)
            self._rx_free = start + len(chunk) * byte_time
            return chunk, start, byte_time

    async def write(self, data: bytes) -> None:
        """Send bytes to the host, each piece released when its last bit is on the wire."""
        loop = asyncio.get_running_loop()
        if self.corrupt_rate > 0:
            data = self._corrupt(data)
        self.traffic[self.baud()] += len(data)
        if self.over_limit(self.baud()):
            data = garble(data)
        for pos in range(0, len(data), _WRITE_PIECE if self.throttle else len(data) or 1):
            piece = data[pos : pos + _WRITE_PIECE] if self.throttle else data
            if self.throttle:
                now = loop.time()
                start = max(self._tx_free, now)
                self._tx_free = start + len(piece) * self._byte_time(self.baud())
                if self._tx_free > now:
                    await asyncio.sleep(self._tx_free - now)
            await self._write_all(loop, piece)

    async def _write_all(self, loop: asyncio.AbstractEventLoop, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise HostClosed
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                await self._wait_fd(loop, readable=False)
                continue
            except OSError as e:
                if e.errno == errno.EIO:
                    raise HostClosed from e
                raise
            view = view[n:]

    async def _wait_fd(self, loop: asyncio.AbstractEventLoop, readable: bool) -> None:
        if self._closed:
            raise HostClosed
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if readable:
            loop.add_reader(self.master, ready)
        else:
            loop.add_writer(self.master, ready)
        try:
            await fut
        finally:
            if not self._closed:
                if readable:
                    loop.remove_reader(self.master)
                else:
                    loop.remove_writer(self.master)

    # -- faults -----------------------------------------------------------------------

    def _draw_corrupt_gap(self) -> int:
        if self.corrupt_rate <= 0:
            return -1
        return int(self._rng.expovariate(self.corrupt_rate))

    def _corrupt(self, data: bytes) -> bytes:
        """Flip one random bit in bytes chosen at ``corrupt_rate`` (geometric gaps)."""
        if self._next_corrupt >= len(data):
            self._next_corrupt -= len(data)
            return data
        out = bytearray(data)
        pos = self._next_corrupt
        while pos < len(out):
            out[pos] ^= 1 << self._rng.randrange(8)
            pos += 1 + self._draw_corrupt_gap()
        self._next_corrupt = pos - len(out)
        return bytes(out)
