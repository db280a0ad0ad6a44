"""A real terminal for the live dashboard: a tmux server of our own (`-L`, so no other
tmux is touched), one window of a fixed size, read back with capture-pane as the
operator would see it (tests/test_slot_health_live.py, tests/test_dashboard_sizes.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

POLL = 0.1
"""Seconds between two looks at the pane (a polling interval)."""


class Tmux:
    """One tmux server of our own, one window, a fixed size."""

    def __init__(self) -> None:
        self.tmux = shutil.which("tmux")
        if self.tmux is None:
            pytest.skip("tmux is not installed (.ci/run installs it with apt-get as root; "
                        "here it could not be)")
        self.socket = f"station-test-{os.getpid()}-{id(self)}"

    def __call__(self, *args: str) -> str:
        assert self.tmux is not None
        # the server's environment is the station's: a terminal's size comes from the
        # terminal, not from COLUMNS/LINES something in this process exported
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        done = subprocess.run([self.tmux, "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=30, check=True, env=env)
        return done.stdout

    def start(self, command: list[str], cwd: Path, width: int = 200, height: int = 45,
              env: Mapping[str, str] | None = None) -> None:
        """`command` in a window of `width` x `height`; `env` adds to its environment."""
        extra = [arg for k, v in (env or {}).items() for arg in ("-e", f"{k}={v}")]
        self("-f", "/dev/null", "new-session", "-d", "-s", "line", "-x", str(width),
             "-y", str(height), "-c", str(cwd), *extra, *command)
        self("set-option", "-t", "line", "remain-on-exit", "on")

    def screen(self) -> list[str]:
        return self("capture-pane", "-p", "-t", "line").splitlines()

    def dead(self) -> bool:
        return self("display-message", "-p", "-t", "line", "#{pane_dead}").strip() == "1"

    def stop(self, timeout: float) -> None:
        """Ctrl-C, as the operator stops the station; returns once the command exited."""
        self("send-keys", "-t", "line", "C-c")
        deadline = time.monotonic() + timeout
        while not self.dead():
            assert time.monotonic() < deadline, "\n".join(self.screen())
            time.sleep(POLL)  # polling interval of a deadline-bound wait

    def close(self) -> None:
        subprocess.run([self.tmux or "tmux", "-L", self.socket, "kill-server"],
                       capture_output=True, timeout=30, check=False)
