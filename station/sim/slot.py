"""One hub port of the rig: the board in it, its link, and what the USB bus does to it.

Kept apart from :mod:`.rig` (which plugs and pulls boards) because a native-USB board's
re-enumeration and a "busy" port's holder are facts of the port, not of the rig's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .board import Board
from .boot_console import BootConsole
from .hub_port import hold_port, link_port
from .plugged import PluggedBoard
from .pty_link import PtyLink
from .rfc2217_face import Rfc2217Face
from .usb import UsbLink, draw_gap

log = logging.getLogger(__name__)
EventCallback = Callable[[dict[str, Any]], None]


@dataclass
class HubSlot:
    info: PluggedBoard
    board: Board
    link: PtyLink
    task: asyncio.Task[None]
    usb: UsbLink
    gap: float | tuple[float, float]
    gap_rng: random.Random
    reenumerations: int = 0
    holder: int | None = None  # fd of the "other program" holding a busy port
    face: Rfc2217Face | None = None
    console: BootConsole | None = None

    def hold_if_busy(self) -> None:
        """Fault ``busy``: another process holds the port (pyserial's exclusive lock)."""
        self.release()
        if self.info.faults.busy:
            self.holder = hold_port(self.link.slave_path)

    def release(self) -> None:
        if self.holder is not None:
            os.close(self.holder)
            self.holder = None


async def reenumerate(slot: HubSlot, index: int, link: PtyLink, emit: EventCallback) -> None:
    """A native board reset: its USB device is gone, then back on ``link`` after a gap.

    The node and its by-path link vanish and the host's next I/O on the old node fails.
    ``link`` (the new node) is allocated before the old one is released, so the kernel
    cannot hand out the same pty number: a re-enumerated board is a new node.
    """
    info = slot.info
    with contextlib.suppress(FileNotFoundError):
        os.unlink(info.port)
    slot.link.close()
    gap = draw_gap(slot.gap, slot.gap_rng)
    emit({"event": "disconnected", "index": index, "port": info.port,
          "mac": info.mac, "pty": info.pty, "gap": round(gap, 3)})
    try:
        await asyncio.sleep(gap)
    except asyncio.CancelledError:
        link.close()  # unplugged while off the bus
        raise
    slot.link = slot.board.link = link
    slot.reenumerations += 1
    slot.hold_if_busy()  # whoever held the old node grabs the new one too
    slot.info = dataclasses.replace(info, pty=link.slave_path)
    link_port(Path(info.port), link.slave_path)
    log.info("re-enumerated %s at %s -> %s", info.mac, info.port, link.slave_path)
    emit({"event": "reenumerated", "index": index, "port": info.port,
          "mac": info.mac, "pty": link.slave_path, "old_pty": info.pty,
          "vid_pid": slot.usb.describe()["app_vid_pid"], "count": slot.reenumerations})
