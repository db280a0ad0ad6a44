"""The RFC 2217 face, the auto-reset circuit and the boot story, driven by the real
esptool over ``rfc2217://`` URLs (pyserial's client; esptool's real reset sequences)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from station.sim import Faults, Rig

from . import boot_images as bi
from .conftest import esptool


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "hub", seed=3, throttle=False, flash_timing=False,
             rfc2217_base=0) as rig:
        yield rig


@pytest.fixture
def firmware(tmp_path: Path) -> list[str]:
    parts = {0x1000: bi.bootloader(), 0x8000: bi.partition_table(),
             0x10000: bi.app(project="blinky", version="2.0.1", idf="v5.1.4")}
    args: list[str] = []
    for offset, data in parts.items():
        path = tmp_path / f"part-{offset:x}.bin"
        path.write_bytes(data)
        args += [hex(offset), str(path)]
    return args


def test_esptool_flashes_and_the_board_boots_over_rfc2217(rig: Rig, firmware: list[str]) -> None:
    board = rig.plug(chip="esp32", app_line="SELFTEST: PASS")
    assert board.rfc2217 is not None and board.rfc2217.startswith("rfc2217://127.0.0.1:")
    # esptool's ClassicReset over RFC 2217 (a round trip per line change) reaches
    # download mode; --after hard-reset then boots what it wrote.
    run = esptool(board.rfc2217, "--baud", "460800", "write-flash", *firmware)
    assert run.returncode == 0, run.output
    assert "Hash of data verified" in run.output
    assert 460800 in rig.board(board).link.traffic  # the client's baud reached the line model
    console = rig.console(board)
    assert "waiting for download" in console
    story = console.rsplit("waiting for download", 1)[1]
    assert "rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)" in story
    assert "boot: ESP-IDF v5.1.4 2nd stage bootloader" in story
    assert "boot: Loaded app from partition at offset 0x10000" in story
    assert "cpu_start: Project name:     blinky" in story  # v5.1: cpu_start, 16 hex digits
    assert "cpu_start: App version:      2.0.1" in story
    sha = bi.elf_sha256("blinky", "2.0.1").hex()
    assert f"cpu_start: ELF file SHA256:  {sha[:16]}..." in story
    assert story.rstrip().endswith("SELFTEST: PASS")
    assert rig.resets(board) == ["en", "en"]  # into download mode, then the hard reset


def test_a_board_without_auto_reset_needs_boot_and_en(rig: Rig, firmware: list[str]) -> None:
    board = rig.plug(chip="esp32", reset_circuit="none")
    failed = esptool(board.rfc2217 or "", "--connect-attempts", "1", "read-mac")
    assert failed.returncode != 0
    assert "Failed to connect" in failed.output
    rig.press_boot_en(board)
    assert rig.console(board).endswith("waiting for download\r\n")
    ok = esptool(board.rfc2217 or "", "--before", "no-reset", "--after", "no-reset",
                 "--no-stub", "read-mac")
    assert ok.returncode == 0, ok.output
    assert f"MAC:                {board.mac}" in ok.output


def test_late_reset_lines_boot_the_app_instead(rig: Rig) -> None:
    board = rig.plug(chip="esp32", faults=Faults(reset_timing=True))
    run = esptool(board.rfc2217 or "", "--connect-attempts", "1", "read-mac")
    assert run.returncode != 0
    assert "Wrong boot mode detected (0x13)" in run.output
    assert "invalid header: 0xffffffff" in rig.console(board)  # blank flash: boot loop


def test_unplug_closes_the_connection_and_the_listener(rig: Rig) -> None:
    board = rig.plug(chip="esp32")
    assert board.rfc2217 is not None
    port = int(board.rfc2217.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        sock.recv(64)  # the server's telnet option requests
        rig.unplug(board)
        assert sock.recv(64) == b""  # the far end closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_plugged_event_announces_the_url(tmp_path: Path) -> None:
    events: list[dict[str, object]] = []
    with Rig(tmp_path / "hub", throttle=False, flash_timing=False, rfc2217_base=0,
             on_event=events.append) as rig:
        board = rig.plug(chip="esp32", app_line="SELFTEST: FAIL")
    plugged = json.loads(json.dumps(events[0]))
    assert plugged["rfc2217"] == board.rfc2217
    assert plugged["reset_circuit"] == "auto"
    assert plugged["app_line"] == "SELFTEST: FAIL"
