"""What happens to a hub port's name outside the board: udev links it, another process
holds it. The rig's by-path folder stands in for /dev/serial/by-path."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def link_port(port: Path, target: str) -> None:
    """Point the by-path name at the board's pty, atomically as udev does: watchers
    never see a half-made link."""
    tmp = port.parent / f".{port.name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.rename(tmp, port)


def hold_port(pty: str) -> int:
    """Open `pty` and take the exclusive lock pyserial takes (fault ``busy``: the port
    is in use by another program); returns the fd to close when it lets go."""
    fd = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd
