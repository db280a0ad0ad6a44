"""The processes a benchmark starts: every child stopped again on error or Ctrl-C
(`Processes`), what each used (`os.wait4`: the kernel's rusage of exactly that process),
the virtual rig in its own process, and the station once it watches its ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

STOP_TIMEOUT = 30.0
READY_TIMEOUT = 30.0
PLUG_TIMEOUT = 60.0


@dataclass
class Usage:
    """What the kernel says a finished child used."""

    returncode: int
    cpu_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float
    wall_s: float


class Processes:
    """Every child a benchmark starts; all are stopped (SIGINT, then kill) on exit."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.children):
            stop(proc)

    def start(self, cmd: Sequence[str], log: Path | None = None, *, stdout_pipe: bool = False,
              env: dict[str, str] | None = None, cwd: Path | None = None
              ) -> subprocess.Popen[bytes]:
        out: IO[bytes] | int
        if stdout_pipe:
            out = subprocess.PIPE
        elif log is not None:
            out = log.open("wb")
        else:
            out = subprocess.DEVNULL
        try:
            proc = subprocess.Popen(list(cmd), stdout=out, stdin=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT if log is not None and not stdout_pipe
                                    else (log.open("wb") if log is not None
                                          else subprocess.DEVNULL),
                                    env=env, cwd=cwd)
        finally:
            if not isinstance(out, int):
                out.close()
        proc.started = time.time()  # type: ignore[attr-defined]
        self.children.append(proc)
        return proc


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT,
         timeout: float = STOP_TIMEOUT) -> None:
    """Ask a child to stop; kill it if it does not within `timeout`."""
    if proc.returncode is not None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def span_s(started: Sequence[subprocess.Popen[bytes]], usages: Sequence[Usage]) -> float:
    """Wall seconds from the first process's start to the last one's end (each process
    carries its `started` time, set by `Processes.start`)."""
    first = min(p.started for p in started)  # type: ignore[attr-defined]
    return float(max(p.started + u.wall_s  # type: ignore[attr-defined]
                     for p, u in zip(started, usages, strict=True)) - first)


def wait_usage(proc: subprocess.Popen[bytes], timeout: float) -> Usage:
    """Wait for a child with `os.wait4`, which also gives its own rusage."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args!r} did not finish within {timeout:.0f}s")
        time.sleep(0.02)
    ended = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Usage(returncode=proc.returncode, cpu_s=ru.ru_utime + ru.ru_stime,
                 user_s=ru.ru_utime, sys_s=ru.ru_stime, max_rss_mb=ru.ru_maxrss / 1024,
                 wall_s=ended - proc.started)  # type: ignore[attr-defined]


class Rig:
    """`python -m station.sim` in its own process; plug times stamped as they arrive."""

    def __init__(self, procs: Processes, boards: int, directory: Path, seed: int = 1,
                 plug_interval: float = 0.0, throttle: bool = True,
                 flash_timing: bool = True, extra_args: Sequence[str] = ()) -> None:
        self.boards = boards
        self.directory = directory
        cmd = [sys.executable, "-m", "station.sim", "--boards", str(boards), "--dir",
               str(directory), "--seed", str(seed), "--plug-interval", str(plug_interval)]
        if not throttle:
            cmd.append("--no-throttle")
        if not flash_timing:
            cmd.append("--no-flash-timing")
        cmd += list(extra_args)  # e.g. --bridge cp2102, --usb jtag, --chip esp32s3
        self.plugged: list[dict[str, Any]] = []
        self._all = threading.Event()
        self.proc = procs.start(cmd, stdout_pipe=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "plugged":
                    event["at"] = time.time()
                    self.plugged.append(event)
                    if len(self.plugged) >= self.boards:
                        self._all.set()
        self._all.set()

    def wait_plugged(self, timeout: float = PLUG_TIMEOUT) -> list[dict[str, Any]]:
        if not self._all.wait(timeout) or len(self.plugged) < self.boards:
            raise TimeoutError(f"the rig plugged {len(self.plugged)} of {self.boards} boards")
        return self.plugged

    @property
    def first_plug(self) -> float:
        return min(e["at"] for e in self.plugged)

    def ports(self) -> list[str]:
        return [e["port"] for e in sorted(self.plugged, key=lambda e: e["index"])]

    def close(self) -> Usage | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
        try:
            return wait_usage(self.proc, STOP_TIMEOUT)
        except (TimeoutError, ChildProcessError):
            stop(self.proc, signal.SIGKILL)
            return None


def wait_watching(proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT) -> float:
    """Wait until the station watches its ports (its watchdog opened an inotify fd).

    `station run` prints nothing when it is ready, so this looks at the process's file
    descriptors; a station that never gets there is left to fail on its own.
    """
    started = time.monotonic()
    fd_dir = Path(f"/proc/{proc.pid}/fd")
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the station exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if "inotify" in os.readlink(fd):
                        time.sleep(0.2)  # the first rescan runs right after
                        return time.monotonic() - started
        time.sleep(0.05)
    return time.monotonic() - started


def read_events(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
