"""Modem lines for a virtual board's pty, in a program that drives them (a hub host's relay).

Python imports ``sitecustomize`` at start-up from the first directory on ``sys.path``
that has one; :func:`station.sim.pty_lines.relay_env` puts this directory there for a
relay process (esptool's ``esp_rfc2217_server``) that the rig serves. Nothing of the
relay is changed: only the kernel's pty, which has no modem lines, gets them.

A Linux pty refuses TIOCMGET/TIOCMSET/TIOCMBIS/TIOCMBIC (``ENOTTY``: its driver has no
``tiocmset``), where a USB-UART bridge's driver (cp210x, ch341, ftdi_sio) sets DTR and
RTS on the chip. Here ``fcntl.ioctl`` first asks the kernel; only on ``ENOTTY`` for a
``/dev/pts/N`` does it keep the lines itself and send each change, as one datagram
``{"pty": "/dev/pts/N", "dtr": bool, "rts": bool}``, to the rig's socket named in
``STATION_SIM_PTY_LINES``; the rig hands it to that board's auto-reset circuit. A
datagram on a local socket takes microseconds, the time a bridge takes to act on a USB
control transfer is not modelled. Any other error (``EIO`` once the board is unplugged
and the pty hung up) is the kernel's, as on hardware.

Standard library only: it runs before anything else in the relay is imported.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import struct
import termios
from typing import Any

ENV = "STATION_SIM_PTY_LINES"
_MODEM = struct.Struct("I")
_REQUESTS = {termios.TIOCMGET, termios.TIOCMSET, termios.TIOCMBIS, termios.TIOCMBIC}
_kernel_ioctl = fcntl.ioctl
_lines: dict[str, int] = {}  # pty path -> TIOCM_* bits the "driver" holds


def _pty_of(fd: Any) -> str | None:
    number = fd if isinstance(fd, int) else fd.fileno()
    try:
        path = os.readlink(f"/proc/self/fd/{number}")
    except OSError:
        return None
    return path if path.startswith("/dev/pts/") else None


def _send(target: str, pty: str, bits: int) -> None:
    message = json.dumps({"pty": pty, "dtr": bool(bits & termios.TIOCM_DTR),
                          "rts": bool(bits & termios.TIOCM_RTS)}).encode()
    # no rig listening: the lines reach no circuit, like unwired pins
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            contextlib.suppress(OSError):
        sock.sendto(message, target)


def ioctl(fd: Any, request: int, arg: Any = 0, mutate_flag: bool = True) -> Any:
    try:
        return _kernel_ioctl(fd, request, arg, mutate_flag)
    except OSError as e:
        target = os.environ.get(ENV)
        pty = _pty_of(fd) if request in _REQUESTS and e.errno == errno.ENOTTY else None
        if target is None or pty is None or not isinstance(arg, bytes | bytearray):
            raise
    held = _lines.get(pty, 0)
    if request == termios.TIOCMGET:
        return _MODEM.pack(held)
    (bits,) = _MODEM.unpack_from(arg)
    if request == termios.TIOCMBIS:
        bits = held | bits
    elif request == termios.TIOCMBIC:
        bits = held & ~bits
    _lines[pty] = bits
    _send(target, pty, bits)
    return bytes(arg)


if os.environ.get(ENV):
    fcntl.ioctl = ioctl
