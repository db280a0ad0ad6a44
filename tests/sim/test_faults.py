"""Fault injection: every failure must make esptool fail promptly, never hang."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from station.sim import Faults, Rig, parse_fault_spec

from .conftest import esptool, make_images

pytestmark = pytest.mark.timeout(120)


def test_unplug_mid_write_fails_promptly(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    with Rig(tmp_path / "hub", seed=3, throttle=False, flash_timing=False,
             on_event=events.append) as rig:
        board = rig.plug(chip="esp32", faults=Faults(unplug_after=200_000))
        images = make_images(tmp_path, "esp32", app_size=512 * 1024)
        start = time.monotonic()
        result = esptool(board.port, "write-flash", *images.args(), timeout=60)
        elapsed = time.monotonic() - start
        assert result.returncode != 0
        # esptool retries reopening the port for ~7 s, then gives up with a serial error
        assert "Lost connection, retrying" in result.output, result.output
        assert "A serial exception error occurred" in result.output, result.output
        assert elapsed < 30
        assert not Path(board.port).exists()
        assert [e["event"] for e in events] == ["plugged", "unplugged"]
        assert events[1]["reason"] == "fault"
        assert board.dump_path.exists()
        assert rig.boards == []


def test_mute_board_fails_to_connect(fast_rig: Rig) -> None:
    board = fast_rig.plug(chip="esp32", faults=Faults(mute=True))
    result = esptool(board.port, "read-mac", pre=("--connect-attempts", "1"), timeout=30)
    assert result.returncode != 0
    assert "Failed to connect" in result.output
    assert "No serial data received" in result.output


def test_garbage_board_is_not_an_esp(fast_rig: Rig) -> None:
    board = fast_rig.plug(chip="esp32", faults=Faults(garbage=True))
    result = esptool(board.port, "read-mac", pre=("--connect-attempts", "2"), timeout=30)
    assert result.returncode != 0
    assert "Failed to connect" in result.output
    assert "Invalid head of packet" in result.output


def test_corrupting_board_never_hangs_esptool(fast_rig: Rig) -> None:
    board = fast_rig.plug(chip="esp32", faults=Faults(corrupt=0.02))
    outcomes = [esptool(board.port, "read-mac", pre=("--connect-attempts", "2"), timeout=60)
                for _ in range(3)]
    # At 2 % of bytes corrupted, some runs fail: what matters is that each one ends.
    assert all(isinstance(o.returncode, int) for o in outcomes)


def test_slow_flash_takes_longer(tmp_path: Path) -> None:
    """slow=FACTOR scales the erase the ROM does up front at FLASH_BEGIN."""
    images = make_images(tmp_path, "esp32c3", app_size=256 * 1024)
    took: dict[float, float] = {}
    with Rig(tmp_path / "hub", seed=3, throttle=False, flash_timing=True) as rig:
        for factor in (1.0, 4.0):
            board = rig.plug(chip="esp32c3", faults=Faults(slow_flash=factor))
            start = time.monotonic()
            result = esptool(board.port, "write-flash", "0x10000", str(images.paths[0x10000]),
                             pre=("--no-stub",))
            took[factor] = time.monotonic() - start
            assert result.returncode == 0, result.output
    # 256 KB: 4 block erases (0.6 s) + 1024 pages (0.72 s) = 1.32 s, x4 = 5.3 s
    assert took[4.0] - took[1.0] > 3.0, took


def test_busy_port_cannot_be_opened_by_esptool(fast_rig: Rig) -> None:
    board = fast_rig.plug(chip="esp32c6", usb="jtag", faults=parse_fault_spec("0:busy")[1])
    result = esptool(board.port, "read-mac", pre=("--connect-attempts", "1"), timeout=30)
    assert result.returncode != 0
    assert "Could not exclusively lock port" in result.output
    fast_rig.unplug(board)
    again = fast_rig.plug(chip="esp32c6", mac=board.mac, index=board.index)
    assert esptool(again.port, "read-mac").returncode == 0
