"""The rig: by-path links, plug/unplug, resets on close, baud detection, parallel flashing."""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

import pytest
import serial

from station.sim import Rig, by_path_name
from station.sim.board import Mode

from .conftest import esptool, make_images

pytestmark = pytest.mark.timeout(300)


def test_links_appear_and_disappear(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    with Rig(hub, seed=1, throttle=False, flash_timing=False) as rig:
        a = rig.plug(chip="esp32")
        b = rig.plug(chip="esp32s3", mac="24:0a:c4:00:00:04")
        links = [n for n in os.listdir(hub) if os.path.islink(hub / n)]
        assert sorted(links) == sorted([by_path_name(0), by_path_name(1)])
        assert os.readlink(a.port) == a.pty and Path(a.pty).exists()
        assert b.mac == "24:0a:c4:00:00:04"
        assert a.port.endswith("pci-0000:00:14.0-usb-0:1.1:1.0-port0")
        rig.unplug(a)
        assert not Path(a.port).exists()
        assert a.dump_path.exists() and a.dump_path.read_bytes() == b"\xff" * (4 << 20)
        rig.unplug(a)  # idempotent
        assert [x.index for x in rig.boards] == [1]
        with pytest.raises(ValueError):
            rig.plug(mac="24:0a:c4:00:00:04")
    # flash dumps and the boards' eFuses (efuse-<mac>.bin, written from the plug on)
    assert sorted(os.listdir(hub)) == sorted([
        a.dump_path.name, b.dump_path.name,
        a.dump_path.name.replace("flash-", "efuse-"), b.dump_path.name.replace("flash-", "efuse-")])


def test_same_seed_same_macs(tmp_path: Path) -> None:
    macs = []
    for run in range(2):
        with Rig(tmp_path / f"hub{run}", seed=42, throttle=False) as rig:
            macs.append([rig.plug().mac for _ in range(4)])
    assert macs[0] == macs[1] and len(set(macs[0])) == 4


def test_close_resets_to_rom_and_runs_repeat(fast_rig: Rig) -> None:
    board = fast_rig.plug(chip="esp32")
    for _ in range(4):
        result = esptool(board.port, "--baud", "460800", "flash-id")
        assert result.returncode == 0, result.output
        assert "Stub flasher is already running" not in result.output
    live = fast_rig.board(board)
    assert live.sessions == 4
    deadline = time.monotonic() + 5
    while live.mode is not Mode.ROM and time.monotonic() < deadline:
        time.sleep(0.01)  # polling with a deadline: the reset follows the close
    assert live.mode is Mode.ROM


@pytest.mark.parametrize("baud", [115200, 460800, 921600, 1500000, 250000])
def test_link_sees_host_baud_rate(fast_rig: Rig, baud: int) -> None:
    board = fast_rig.plug()
    with serial.Serial(board.port, baud, timeout=1):
        assert fast_rig.board(board).link.baud() == baud


def test_sixteen_boards_flashed_in_parallel(tmp_path: Path, fast_rig: Rig) -> None:
    images = make_images(tmp_path, "esp32", app_size=256 * 1024)
    boards = [fast_rig.plug(chip="esp32") for _ in range(16)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(
            lambda b: esptool(b.port, "--baud", "921600", "write-flash", *images.args(),
                              timeout=240),
            boards,
        ))
    for board, result in zip(boards, results, strict=True):
        assert result.returncode == 0, f"{board.port}: {result.output}"
        assert result.output.count("Hash of data verified.") == 3
        flash = fast_rig.flash(board)
        for offset, data in images.parts.items():
            assert flash[offset : offset + len(data)] == data
