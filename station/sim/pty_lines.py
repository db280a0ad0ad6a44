"""DTR/RTS for the boards' ptys, so a real relay on the "hub host" can reset them.

A line puts ``esp_rfc2217_server`` (esptool's RFC 2217 relay) or ser2net on a small host
next to each hub; the relay opens the board's serial port and sets DTR and RTS on it.
A pty has no modem lines, so esptool's own relay cannot serve a virtual board as it
is: on the client's connect it sets ``ser.rts = True``, the kernel answers ENOTTY, and
it drops the client. This module gives the ptys the lines a bridge's driver has:

* :mod:`station.sim.pty_lines_site` (its ``sitecustomize``, started with the relay by
  :func:`relay_env`) answers the modem-line ioctls the kernel refuses on a pty and
  sends each change here as a datagram.
* :class:`PtyLinesListener` receives them on the rig's loop and hands them to the
  board whose pty it is, to its auto-reset circuit (:mod:`.reset_circuit`).

So the relay runs unchanged, its reset sequences (run on the hub host with their own
timing: ``esp_port_manager.py``) reach the chip with that timing, and it serves the
board as it would a devkit on a CP2102.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

SITE_DIR = Path(__file__).parent / "pty_lines_site"
ENV = "STATION_SIM_PTY_LINES"  # the same name as in pty_lines_site/sitecustomize.py

log = logging.getLogger(__name__)
Route = Callable[[str, bool, bool, float | None], None]  # pty, DTR, RTS, when set


def relay_env(socket_path: str | os.PathLike[str],
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a relay process whose ptys get modem lines from the rig."""
    env = dict(os.environ if base is None else base)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SITE_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *rest])
    env[ENV] = str(socket_path)
    return env


def give_this_process_lines(socket_path: str | os.PathLike[str]) -> None:
    """What :func:`relay_env` does for a new process, for this one (``station demo``,
    whose station runs in the demo's own process): its ptys' DTR/RTS go to the rig."""
    os.environ[ENV] = str(socket_path)
    spec = importlib.util.spec_from_file_location("station_sim_pty_lines_site",
                                                  SITE_DIR / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


class PtyLinesListener:
    """A datagram socket at ``path``; each message is one pty's DTR and RTS."""

    def __init__(self, path: str | os.PathLike[str], route: Route) -> None:
        self.path = Path(path)
        self._route = route
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Bind and listen on the running loop (call from the rig's loop)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise ValueError(f"pty lines socket {self.path}: {e.strerror}") from None
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read)

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return
            try:
                message = json.loads(data)
                pty, dtr, rts = str(message["pty"]), bool(message["dtr"]), bool(message["rts"])
                at = float(message["at"]) if "at" in message else None
            except (ValueError, KeyError, TypeError):
                log.warning("pty lines: dropped a malformed message %r", data[:80])
                continue
            self._route(pty, dtr, rts, at)
