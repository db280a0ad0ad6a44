"""The RFC 2217 face, the auto-reset circuit and the boot story, driven by the real
esptool over ``rfc2217://`` URLs (pyserial's client; esptool's real reset sequences)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from station.sim import Faults, Rig

from . import boot_images as bi
from .conftest import esptool
from .test_cli import read_events


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


@pytest.mark.slow  # pyserial's RFC 2217 client waits 50 ms per setting change
@pytest.mark.long
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
    # a second client session resets into download mode and boots the app again (one
    # short command: every command pays pyserial's waits, a verify-flash took ~25 s)
    again = esptool(board.rfc2217, "read-mac")
    assert again.returncode == 0, again.output
    assert f"MAC:                {board.mac}" in again.output
    assert rig.resets(board) == ["en"] * 4
    assert rig.console(board).count("cpu_start: Project name:     blinky") == 2


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


@pytest.mark.parametrize(("faults", "en_cap_uf"), [
    (Faults(reset_timing=True), 10.0),  # the fault: lines too far apart for the EN delay
    (Faults(), 1.0),  # 13.9 ms of EN delay: shorter than one RFC 2217 line change
])
def test_late_reset_lines_boot_the_app_instead(rig: Rig, faults: Faults,
                                               en_cap_uf: float) -> None:
    board = rig.plug(chip="esp32", faults=faults, en_cap_uf=en_cap_uf)
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
        assert sock.recv(64).startswith(b"\xff")  # the server's telnet option requests
        rig.unplug(board)
        while sock.recv(64):  # the rest of them, then end-of-file: the far end closed
            pass  # (a socket.timeout here would mean the connection stayed open)
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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyserial's rfc2217 client
def test_cli_serves_rfc2217_and_takes_button_presses(tmp_path: Path) -> None:
    fifo = tmp_path / "control"
    proc = subprocess.Popen(
        [sys.executable, "-m", "station.sim", "--boards", "2", "--dir", str(tmp_path / "hub"),
         "--no-throttle", "--no-flash-timing", "--rfc2217", "0", "--reset-circuit", "none,auto",
         "--board-app-line", "1=SELFTEST: FAIL", "--control", str(fifo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        plugged = read_events(proc.stdout, 2)  # type: ignore[arg-type]
        assert [e["reset_circuit"] for e in plugged] == ["none", "auto"]
        assert [e["app_line"] for e in plugged] == [None, "SELFTEST: FAIL"]
        url = plugged[0]["rfc2217"]
        assert url.startswith("rfc2217://127.0.0.1:")
        with serial.serial_for_url(url, baudrate=115200, timeout=5) as port:
            port.dtr = port.rts = False  # no circuit: the lines do nothing
            with fifo.open("w") as control:
                control.write("press_boot_en 0\npress_boot_en 7\n")
            events = read_events(proc.stdout, 3)  # type: ignore[arg-type]
            resets = [e for e in events if e["event"] == "reset"]
            assert [(e["index"], e["kind"]) for e in resets] == [(0, "en")]
            done = [e for e in events if e["event"] == "control"]
            assert done[0] == {"event": "control", "command": "press_boot_en 0", "ok": True}
            assert done[1]["ok"] is False and "7" in done[1]["error"]
            banner = port.read_until(b"waiting for download\r\n")
            assert b"rst:0x1 (POWERON_RESET),boot:0x3 (DOWNLOAD_BOOT" in banner
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyserial's rfc2217 client
def test_a_broken_image_boot_loops_on_the_console(rig: Rig) -> None:
    board = rig.plug(chip="esp32", app_line="SELFTEST: PASS")
    flash = rig.board(board).flash.data  # as if written: bootloader, no partition table
    boot = bi.bootloader()
    flash[0x1000:0x1000 + len(boot)] = boot
    assert board.rfc2217 is not None
    with serial.serial_for_url(board.rfc2217, baudrate=115200, timeout=5) as port:
        rig.press_en(board)
        seen = b""
        for _ in range(3):
            seen += port.read_until(b"load partition table error!\r\n")
    text = seen.decode()
    assert text.count("E (") == 9 and text.count("2nd stage bootloader") == 3
    assert "rst:0x1 (POWERON_RESET),boot:0x13" in text  # EN: a power-on reset
    assert text.count("rst:0x3 (SW_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)") == 2
    assert "SELFTEST" not in text  # the app never ran


def test_a_native_board_is_relayed_without_a_circuit(rig: Rig) -> None:
    board = rig.plug(chip="esp32s3", usb="jtag")
    assert board.rfc2217 is not None and board.reset_circuit is None
    run = esptool(board.rfc2217, "--no-stub", "--after", "no-reset", "read-mac")
    assert run.returncode == 0, run.output
    assert "Chip type:          ESP32-S3" in run.output
    assert rig.resets(board) == []  # its lines reach nothing; the ROM answered as on a pty


def test_cli_names_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "station.sim", "--boards", "1", "--dir", str(tmp_path),
             "--no-throttle", "--rfc2217", str(port)],
            capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert f"station sim: board 0: cannot listen on TCP port {port}:" in proc.stderr
    assert "address already in use" in proc.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyserial's rfc2217 client
def test_a_host_pulsing_rts_reads_the_whole_boot_story(rig: Rig) -> None:
    """What a station's boot check does: hold the port, pulse EN through RTS, read."""
    board = rig.plug(chip="esp32", app_line="SELFTEST: PASS")
    flash = rig.board(board).flash.data  # as esptool would have left it
    for offset, data in ((0x1000, bi.bootloader()), (0x8000, bi.partition_table()),
                         (0x10000, bi.app("meter", "3.1", "v5.2.1"))):
        flash[offset:offset + len(data)] = data
    assert board.rfc2217 is not None
    with serial.serial_for_url(board.rfc2217, baudrate=115200, timeout=5) as port:
        port.dtr = False
        port.rts = True  # (DTR off, RTS on): EN low
        port.rts = False  # both off: EN rises, GPIO0 high
        story = port.read_until(b"SELFTEST: PASS\r\n").decode()
    assert story.startswith("ets Jul 29 2019 12:21:46\r\n\r\nrst:0x1 (POWERON_RESET),boot:0x13")
    assert "cpu_start: Project name:     meter\r\n" in story
    sha = bi.elf_sha256("meter", "3.1").hex()
    assert f"cpu_start: ELF file SHA256:  {sha[:9]}...\r\n" in story
    assert story.endswith("SELFTEST: PASS\r\n")
    assert rig.resets(board) == ["en"]
