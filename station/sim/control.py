"""``station sim --control FIFO``: the hands of the person at the bench.

Tests and demos driving a running ``station sim`` process from outside (a shell, the
station's own test suite) need what a person does with a board: press its buttons,
pull it out, plug it back. One command per line written to a named pipe:

=======================  ========================================================
``press_boot_en INDEX``  hold BOOT, tap EN, release BOOT: download mode (the way
                         in for a board without an auto-reset circuit)
``press_en INDEX``       tap EN: the board boots from flash
``unplug INDEX``         pull the board out
``replug INDEX``         pull it out and plug it back into the same hub port
=======================  ========================================================

Each command answers with a JSON ``control`` event on stdout (``"ok": true`` or the
error). The pipe is opened read-write so it never reports end-of-file between writers.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .rig import Rig

COMMANDS = ("press_boot_en", "press_en", "unplug", "replug")


def run_command(rig: Rig, line: str) -> dict[str, Any]:
    """Carry out one control line; returns the ``control`` event describing it."""
    words = line.split()
    event: dict[str, Any] = {"event": "control", "command": line.strip()}
    if len(words) != 2 or words[0] not in COMMANDS or not words[1].isdigit():
        return {**event, "ok": False,
                "error": f"expected one of {', '.join(COMMANDS)} and a board index"}
    name, index = words[0], int(words[1])
    try:
        if name == "press_boot_en":
            rig.press_boot_en(index)
        elif name == "press_en":
            rig.press_en(index)
        elif name == "unplug":
            rig.unplug(index)
        else:
            rig.replug(index)
    except (KeyError, ValueError) as e:
        return {**event, "ok": False, "error": str(e).strip("'\"")}
    return {**event, "ok": True}


def open_fifo(path: Path) -> int:
    """Create the FIFO if needed and open it read-write; ValueError if it is no FIFO."""
    try:
        if not path.exists():
            os.mkfifo(path, 0o600)
        elif not stat.S_ISFIFO(path.stat().st_mode):
            raise ValueError(f"--control {path}: exists and is not a named pipe")
        return os.open(path, os.O_RDWR)
    except OSError as e:
        raise ValueError(f"--control {path}: {e.strerror}") from None


def serve(rig: Rig, fd: int, emit: Callable[[dict[str, Any]], None],
          stop: threading.Event) -> threading.Thread:
    """Read commands from ``fd`` on a daemon thread until ``stop`` is set."""

    def loop() -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while not stop.is_set():
                chunk = os.read(fd, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    if line.strip():
                        emit(run_command(rig, line.decode("utf-8", "replace")))

    thread = threading.Thread(target=loop, name="sim-control", daemon=True)
    thread.start()
    return thread
