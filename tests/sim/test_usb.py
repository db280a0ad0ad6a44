"""USB link kinds: native boards re-enumerate on the resets they see; bridges have a limit.

The real esptool drives every scenario: a write (its default hard reset at the end is
invisible to a pty, the port close that follows is the reset), ``--after
watchdog-reset`` (register writes through the loader arm the RTC watchdog), and a baud
change above a bridge's limit.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from station.sim import Rig

from .conftest import esptool

pytestmark = pytest.mark.timeout(120)


class Events:
    """Thread-safe event log with waits that time out instead of hanging."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.items.append(event)
            self._cond.notify_all()

    def of(self, kind: str, index: int) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.items if e["event"] == kind and e["index"] == index]

    def wait(self, kind: str, index: int, count: int,
             timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.of(kind, index)) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"waited for {count} {kind} of board {index}: {self.items}"
                self._cond.wait(remaining)
            return self.of(kind, index)


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def rig(tmp_path: Path, events: Events) -> Iterator[Rig]:
    with Rig(tmp_path / "hub", seed=3, throttle=False, flash_timing=False, on_event=events,
             reenumerate_gap=0.3) as r:
        yield r


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "app.bin"
    path.write_bytes(os.urandom(12_000))
    return path


def test_plugged_announces_usb_identity(rig: Rig, events: Events) -> None:
    rig.plug(chip="esp32s3", usb="jtag")
    rig.plug(chip="esp32s3", usb="otg")
    rig.plug(chip="esp32", bridge="ch340")
    rig.plug(chip="esp32c3")
    jtag, otg, ch340, default = (events.of("plugged", i)[0] for i in range(4))
    assert (jtag["usb"], jtag["vid_pid"], jtag["bridge"], jtag["max_baud"]) == \
        ("jtag", "303a:1001", None, None)
    # esptool's uses_usb_otg(): product id == IMAGE_CHIP_ID in download mode
    assert (otg["vid_pid"], otg["app_vid_pid"]) == ("303a:0009", "303a:4001")
    assert (ch340["vid_pid"], ch340["bridge"], ch340["max_baud"]) == ("1a86:7523", "ch340", 460800)
    assert (default["usb"], default["bridge"], default["max_baud"]) == \
        ("bridge", "cp2102n", 3000000)
    assert {"index", "port", "pty", "mac", "chip"} <= set(jtag)
    with pytest.raises(ValueError, match="esp32 has no USB-Serial/JTAG"):
        rig.plug(chip="esp32", usb="jtag")
    with pytest.raises(ValueError, match="unknown bridge 'pl2303'"):
        rig.plug(chip="esp32", bridge="pl2303")


def test_native_board_reenumerates_after_a_write(rig: Rig, events: Events, app: Path) -> None:
    board = rig.plug(chip="esp32c6", usb="jtag")
    write = esptool(board.port, "write-flash", "0x10000", str(app))
    assert write.returncode == 0, write.output
    (reset,) = events.wait("reset", 0, 1)
    assert reset["kind"] == "host-close" and reset["count"] == 1
    (gone,) = events.wait("disconnected", 0, 1)
    (back,) = events.wait("reenumerated", 0, 1)
    assert back["port"] == board.port and back["mac"] == board.mac
    assert back["pty"] != board.pty and back["old_pty"] == board.pty
    assert os.readlink(board.port) == back["pty"] == rig.info(board).pty
    assert gone["gap"] == 0.3
    # same board: same MAC, same flash, and a read-only session is no reset
    again = esptool(board.port, "read-mac")
    assert again.returncode == 0 and board.mac in again.output, again.output
    assert rig.flash(board)[0x10000 : 0x10000 + app.stat().st_size] == app.read_bytes()
    assert rig.reset_count(board) == 1 and rig.reenumerations(board) == 1
    assert len(events.of("plugged", 0)) == 1


# Run alone (timing): esptool's watchdog_reset enables the RTC watchdog (2000 slow-clock
# cycles: the chip resets 13 ms later and its USB device goes) and then sends one more
# WRITE_REG to lock it. A real chip behaves the same, so an esptool held off the CPU for
# 13 ms between the two fails on the dead port ("Could not configure port: EIO"), as this
# test did once in a loaded parallel pass.
@pytest.mark.timing
@pytest.mark.parametrize(("chip", "usb"), [("esp32s3", "jtag"), ("esp32p4", "otg")])
def test_watchdog_reset_reenumerates(rig: Rig, events: Events, chip: str, usb: str) -> None:
    board = rig.plug(chip=chip, usb=usb)
    result = esptool(board.port, "--after", "watchdog-reset", "read-mac")
    assert result.returncode == 0, result.output
    assert "Hard resetting with a watchdog" in result.output
    (back,) = events.wait("reenumerated", 0, 1)
    assert [e["kind"] for e in events.of("reset", 0)] == ["watchdog"]
    expected = "303a:4001" if usb == "otg" else "303a:1001"
    assert back["vid_pid"] == expected
    assert esptool(board.port, "flash-id").returncode == 0


def test_watchdog_reset_on_a_bridge_board_keeps_the_port(rig: Rig, events: Events) -> None:
    board = rig.plug(chip="esp32c3")
    result = esptool(board.port, "--after", "watchdog-reset", "read-mac")
    assert result.returncode == 0, result.output
    assert rig.resets(board) == ["watchdog"]
    assert events.of("reenumerated", 0) == [] and os.readlink(board.port) == board.pty
    assert esptool(board.port, "read-mac").returncode == 0  # the close put it back in ROM


def test_esptools_no_reset_exit_is_not_a_reset(rig: Rig, app: Path) -> None:
    board = rig.plug(chip="esp32s3", usb="jtag")
    result = esptool(board.port, "--after", "no-reset", "write-flash", "0x10000", str(app))
    assert result.returncode == 0, result.output
    assert "Staying in bootloader" in result.output
    assert esptool(board.port, "read-mac").returncode == 0
    assert rig.reset_count(board) == 0 and rig.reenumerations(board) == 0


def test_replug_of_a_native_board_is_a_new_plug(rig: Rig, events: Events, app: Path) -> None:
    board = rig.plug(chip="esp32h2", usb="jtag")
    assert esptool(board.port, "write-flash", "0x10000", str(app)).returncode == 0
    events.wait("reenumerated", 0, 1)
    again = rig.replug(board)
    assert (again.mac, again.port, again.usb) == (board.mac, board.port, "jtag")
    assert [e["reason"] for e in events.of("unplugged", 0)] == ["requested"]
    assert len(events.of("plugged", 0)) == 2
    assert rig.reset_count(again) == 0  # counters are per plug
    assert rig.flash(again)[0x10000 : 0x10000 + app.stat().st_size] == app.read_bytes()


def test_bridge_above_its_highest_baud_garbles(rig: Rig, app: Path) -> None:
    board = rig.plug(chip="esp32", bridge="ch340")
    fast = esptool(board.port, "--baud", "921600", "write-flash", "0x10000", str(app))
    assert fast.returncode != 0
    assert "Changing baud rate to 921600" in fast.output
    assert rig.flash(board)[0x10000:0x11000] == b"\xff" * 0x1000
    ok = esptool(board.port, "--baud", "460800", "write-flash", "0x10000", str(app))
    assert ok.returncode == 0, ok.output


@pytest.mark.timing  # wall time against the model: alone, after the parallel pass
def test_native_usb_ignores_the_baud_rate(tmp_path: Path) -> None:
    """USB-Serial/JTAG moves ~1.4 Mbit/s whatever baud the host sets (esptool#779)."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(32 * 1024))  # incompressible: sent raw, 32 KB on the wire
    with Rig(tmp_path / "timed", seed=4, throttle=True, flash_timing=False) as rig:
        native = rig.plug(chip="esp32c3", usb="jtag")
        bridged = rig.plug(chip="esp32c3")
        took = {}
        for board in (native, bridged):
            start = time.monotonic()
            result = esptool(board.port, "write-flash", "0x10000", str(big))  # at 115200
            took[board.usb] = time.monotonic() - start
            assert result.returncode == 0, result.output
    # 32 KB at 115200 is 2.8 s of wire alone; over native USB 0.2 s
    assert took["bridge"] > 2.8
    assert took["jtag"] < took["bridge"] / 2
