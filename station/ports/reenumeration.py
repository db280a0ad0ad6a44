"""The same-board rule: a port that vanishes after the station reset it is coming back.

A native-USB board (USB-Serial/JTAG 303a:1001, USB-OTG) drops off the bus whenever it
resets and re-enumerates 0.2-2 s later: a new device node at the same USB location
(`/dev/serial/by-path` keeps its name; `/dev/ttyACM0` may become `ttyACM1`), and USB-OTG
boards even come back with another product id. To the port watcher that is an unplug
and a new port. Taken at face value, a board the station just finished gets a second
job, and if that job reset the board again, it would loop for ever.

The rule, for ANY port (a pty or an RFC 2217 port has no VID:PID, and a bridge board can
be pulled by a hand right after its reset too, so the rule cannot hang on "native"):

- the station itself resets the board (the worker's reset stage): from then until
  `window` seconds after the job ended, a disappearance of that port is the reset's;
- a port that then appears at the same USB location (the slot key: the by-path name's
  USB location or pyserial's) within `window` of the disappearance is the same board,
  unless its MAC can be read without touching the board and differs (the serial number
  a USB-Serial/JTAG reports is the chip's MAC): no new job, and it keeps its job; a
  board back from its reset may re-enumerate again (USB-OTG: ROM, then the app) within
  `window` of coming back;
- anything else (another MAC, later than the window, a port that was never reset by
  us) is a re-plug and gets a new job, as before.

A port the host knows as a USB-UART bridge (a USB vendor id that is not Espressif's) is
left out: the bridge stays on the bus through the chip's reset, so its port vanishing is
always a hand pulling the board, and the next board in that socket must get its job.

What this cannot tell: on a port with no USB facts (a pty, an RFC 2217 port) and no MAC
to read, a different board swapped into the same socket within the window is taken for
the first (nothing names it before a connect); the window is short (5 s by default) for
that reason, and a line of bridge boards on such ports sets `reenumerate_window = 0`.

The tracker is plain bookkeeping on the event loop thread with an injectable clock; the
daemon feeds it from the events workers emit and from the port watcher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

J = TypeVar("J")


@dataclass
class _Reset(Generic[J]):
    job: J
    mac: str | None
    ended: float | None = None  # None while the reset stage runs
    gone: float | None = None  # when the port vanished, while it is away
    back: float | None = None  # when it last came back


class Reenumerations(Generic[J]):
    """Ports the station reset, by USB location, for `window` seconds."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._resets: dict[str, _Reset[J]] = {}

    def resetting(self, key: str, job: J, mac: str | None) -> None:
        """The station is resetting the board at `key` (the job's reset stage began)."""
        if self.window > 0:
            self._resets[key] = _Reset(job, mac)

    def ended(self, key: str, job: J) -> None:
        """The job that reset the board at `key` is over: the window starts now."""
        entry = self._resets.get(key)
        if entry is not None and entry.job is job and entry.ended is None:
            entry.ended = self.clock()

    def vanished(self, key: str, job: J | None) -> bool:
        """The port at `key` (running or holding `job`) is gone. True if that is the
        station's own reset: the job must not be cancelled or forgotten as unplugged."""
        self._expire()
        entry = self._resets.get(key)
        if entry is None or job is None or entry.job is not job:
            return False
        entry.gone = self.clock()
        return True

    def returned(self, key: str, mac: str | None) -> J | None:
        """A port appeared at `key`; the job of the board it is, if it is the same board
        coming back from the station's reset, else None (a new board: a new job)."""
        self._expire()
        entry = self._resets.get(key)
        if entry is None or entry.gone is None:
            return None
        if mac is not None and entry.mac is not None and mac != entry.mac:
            del self._resets[key]  # another board in that socket
            return None
        entry.gone, entry.back = None, self.clock()  # it may re-enumerate again (OTG)
        return entry.job

    def away(self) -> list[J]:
        """Jobs whose port is gone and may come back (the daemon waits for them to end)."""
        self._expire()
        return [e.job for e in self._resets.values() if e.gone is not None]

    def _expire(self) -> None:
        now = self.clock()
        for key, entry in list(self._resets.items()):
            since = entry.gone if entry.gone is not None else entry.ended
            if since is not None and entry.back is not None:
                since = max(since, entry.back)
            if since is not None and now - since > self.window:
                del self._resets[key]
