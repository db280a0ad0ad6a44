"""``python -m station.sim``: JSON events, links, faults, clean exit on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from .conftest import esptool

pytestmark = pytest.mark.timeout(120)


_pending: dict[int, bytes] = {}  # bytes read past the last full line, per pipe


def read_events(stream: IO[str], count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Read ``count`` JSON lines, failing instead of hanging if they do not come.

    Reads the pipe's fd directly: lines that arrive together must not sit in a Python
    buffer that ``select`` cannot see.
    """
    fd = stream.fileno()
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            while b"\n" in _pending.get(fd, b"") and len(events) < count:
                line, _, rest = _pending[fd].partition(b"\n")
                _pending[fd] = rest
                events.append(json.loads(line))
            if len(events) == count:
                return events
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only got {events}"
            if sel.select(remaining):
                chunk = os.read(fd, 65536)
                assert chunk, f"sim exited early after {events}"
                _pending[fd] = _pending.get(fd, b"") + chunk


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_runs_until_signal(tmp_path: Path, sig: signal.Signals) -> None:
    hub = tmp_path / "hub"
    with sim_process("--boards", "3", "--dir", str(hub), "--chip", "esp32c3", "--seed", "5",
                     "--no-throttle", "--no-flash-timing", "--fault", "2:mute",
                     "--flash-size", "2MB") as proc:
        assert proc.stdout is not None
        plugged = read_events(proc.stdout, 3)
        assert [e["event"] for e in plugged] == ["plugged"] * 3
        assert [e["index"] for e in plugged] == [0, 1, 2]
        assert all(e["chip"] == "esp32c3" and os.readlink(e["port"]) == e["pty"]
                   for e in plugged)
        result = esptool(plugged[0]["port"], "flash-id")
        assert result.returncode == 0, result.output
        assert plugged[0]["mac"] in result.output and "2MB" in result.output
        muted = esptool(plugged[2]["port"], "read-mac", pre=("--connect-attempts", "1"))
        assert muted.returncode != 0
        proc.send_signal(sig)
        unplugged = read_events(proc.stdout, 3)
        assert proc.wait(timeout=30) == 0
    assert {e["event"] for e in unplugged} == {"unplugged"}
    for event in plugged:
        mac = event["mac"].replace(":", "")
        assert (hub / f"flash-{mac}.bin").stat().st_size == 2 << 20
        assert not Path(event["port"]).exists()


@contextlib.contextmanager
def sim_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m station.sim ARGS` with its output piped; killed if a test leaves it."""
    proc = subprocess.Popen([sys.executable, "-m", "station.sim", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_cli_rejects_bad_fault_spec(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "station.sim", "--dir", str(tmp_path), "--fault", "1:explode"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 2
    assert "unknown fault kind 'explode'" in proc.stderr


def test_cli_mixed_chips_and_native_usb(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    with sim_process("--boards", "3", "--dir", str(hub), "--chip", "esp32s3,esp32c6,esp32p4",
                     "--usb", "jtag,jtag,otg", "--no-throttle", "--no-flash-timing",
                     "--reenumerate-gap", "0.1-0.2") as proc:
        assert proc.stdout is not None
        plugged = read_events(proc.stdout, 3)
        assert [e["chip"] for e in plugged] == ["esp32s3", "esp32c6", "esp32p4"]
        assert [e["vid_pid"] for e in plugged] == ["303a:1001", "303a:1001", "303a:0012"]
        result = esptool(plugged[1]["port"], "--after", "watchdog-reset", "read-mac")
        assert result.returncode == 0, result.output  # the C6's esptool falls back: no reset
        result = esptool(plugged[0]["port"], "--after", "watchdog-reset", "read-mac")
        assert result.returncode == 0, result.output
        reset, gone, back = read_events(proc.stdout, 3)
        assert (reset["event"], reset["kind"], reset["index"]) == ("reset", "watchdog", 0)
        assert gone["event"] == "disconnected" and 0.1 <= gone["gap"] <= 0.2
        assert back["event"] == "reenumerated" and os.readlink(back["port"]) == back["pty"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_cli_rejects_a_usb_kind_the_chip_lacks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "station.sim", "--dir", str(tmp_path), "--boards", "2",
         "--chip", "esp32s3,esp32", "--usb", "jtag"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 2
    assert "board 1: esp32 has no USB-Serial/JTAG" in proc.stderr


def test_cli_pty_lines_give_bridge_boards_a_reset_circuit(tmp_path: Path) -> None:
    lines = tmp_path / "lines.sock"
    with sim_process("--boards", "2", "--dir", str(tmp_path / "hub"), "--usb", "bridge,jtag",
                     "--chip", "esp32s3", "--pty-lines", str(lines), "--en-cap", "1",
                     "--no-throttle", "--no-flash-timing") as proc:
        assert proc.stdout is not None
        bridge, native = read_events(proc.stdout, 2)
        assert (bridge["reset_circuit"], bridge["en_cap_uf"]) == ("auto", 1.0), bridge
        assert "reset_circuit" not in native, native  # a native board's USB is not modelled
        assert lines.is_socket()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not lines.exists()


def test_cli_rejects_a_pty_lines_socket_it_cannot_bind(tmp_path: Path) -> None:
    where = tmp_path / "no-such-dir" / "lines.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "station.sim", "--dir", str(tmp_path), "--boards", "1",
         "--pty-lines", str(where)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 2
    assert f"pty lines socket {where}: No such file or directory" in proc.stderr
