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

A change is applied and delivered under the pty's lock, so the circuit sees the states in
the order they were set. A bridge cannot reorder them: cp210x's ``tiocmset`` is one
synchronous ``SET_MHS`` control request carrying only the lines it changes (a write mask
per line: ``CONTROL_WRITE_DTR``/``CONTROL_WRITE_RTS``, drivers/usb/serial/cp210x.c), so two
threads changing DTR and RTS at once both land and the chip holds the last level of each.
esptool's relay does exactly that on every hard reset: its writer thread clears DTR for the
client's trailing ``setDTR`` just as its ``hard_reset_thread`` releases RTS (both 0.1 s
after the client's RTS drop). Without the lock a thread that applied "DTR off, RTS still
on" and was preempted before its datagram left delivered that state *after* the release:
EN low again before the chip woke, held in reset for good; the station read nothing
after the reset (issue #25, under load).

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
import threading
import time
from typing import Any

ENV = "STATION_SIM_PTY_LINES"
_MODEM = struct.Struct("I")
_REQUESTS = {termios.TIOCMGET, termios.TIOCMSET, termios.TIOCMBIS, termios.TIOCMBIC}
_kernel_ioctl = fcntl.ioctl
_lines: dict[str, int] = {}  # pty path -> TIOCM_* bits the "driver" holds
_locks: dict[str, threading.Lock] = {}  # pty path -> its changes, applied and sent in order


def _pty_of(fd: Any) -> str | None:
    number = fd if isinstance(fd, int) else fd.fileno()
    try:
        path = os.readlink(f"/proc/self/fd/{number}")
    except OSError:
        return None
    return path if path.startswith("/dev/pts/") else None


def _send(target: str, pty: str, bits: int) -> None:
    # stamped with the moment the host set them (CLOCK_MONOTONIC is one clock for every
    # process): the circuit acts at that moment however late the rig reads the datagram
    message = json.dumps({"pty": pty, "dtr": bool(bits & termios.TIOCM_DTR),
                          "rts": bool(bits & termios.TIOCM_RTS),
                          "at": time.monotonic()}).encode()
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
    with _locks.setdefault(pty, threading.Lock()):  # setdefault is atomic (the GIL)
        held = _lines.get(pty, 0)
        if request == termios.TIOCMGET:
            return _MODEM.pack(held)
        (bits,) = _MODEM.unpack_from(arg)
        if request == termios.TIOCMBIS:
            bits = held | bits
        elif request == termios.TIOCMBIC:
            bits = held & ~bits
        _lines[pty] = bits
        _send(target, pty, bits)  # still under the lock: the circuit gets them in order
    return bytes(arg)


if os.environ.get(ENV):
    fcntl.ioctl = ioctl
