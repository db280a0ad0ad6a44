"""esptool's `esp_rfc2217_server` on a virtual board's pty, with and without modem lines.

The relay runs unchanged in its own process. A bare pty refuses DTR/RTS (ENOTTY) and
the relay drops its client; with the rig's pty lines (`station.sim.pty_lines`) its reset
sequences reach the board's auto-reset circuit with the relay's own timing: GPIO0 is
held low for 50 ms after EN is released (`UnixTightReset`), 0.55 s with `--r0`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import serial

from station.sim import Rig
from station.sim.pty_lines import ENV, SITE_DIR
from tests.remotekit import EspRelay

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # pyserial rfc2217
WAKE_TIMEOUT_S = 10.0


class Wakes:
    """Counts the boards' EN wakes from the rig's events (no polling)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") == "reset" and event.get("kind") == "en":
            with self._changed:
                self.count += 1
                self._changed.notify_all()

    def wait(self, count: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.count >= count, WAKE_TIMEOUT_S):
                raise TimeoutError(f"{self.count} EN wakes, expected {count}")


def test_esptools_relay_drops_its_client_on_a_pty_without_modem_lines(tmp_path: Path) -> None:
    with Rig(tmp_path, seed=1, throttle=False, flash_timing=False) as rig:
        board = rig.plug(chip="esp32")
        relay = EspRelay(board.pty, tmp_path / "nobody-listens.sock", bare=True)
        try:
            host, port = relay.url.removeprefix("rfc2217://").split(":")
            with socket.create_connection((host, int(port)), timeout=WAKE_TIMEOUT_S):
                # its first `ser.rts = True` on the client's connect: the kernel says no
                relay.wait_output("Inappropriate ioctl for device")
        finally:
            relay.close()


@pytest.mark.parametrize(("en_cap_uf", "options", "latched"), [
    (1.0, (), "download"),  # wakes 14 ms after EN: GPIO0 still held low
    (10.0, (), "flash"),  # wakes after 139 ms: GPIO0 let go at 50 ms
    (10.0, ("--r0",), "download"),  # GPIO0 held 0.55 s
])
def test_the_relays_own_reset_sequence_reaches_the_chip(
        tmp_path: Path, en_cap_uf: float, options: tuple[str, ...], latched: str) -> None:
    wakes = Wakes()
    lines = tmp_path / "lines.sock"
    with Rig(tmp_path, seed=2, throttle=False, flash_timing=False, on_event=wakes,
             pty_lines=lines) as rig:
        board = rig.plug(chip="esp32", en_cap_uf=en_cap_uf)
        relay = EspRelay(board.pty, lines, *options)
        try:
            client = serial.serial_for_url(f"{relay.url}?ign_set_control", timeout=1)
            try:
                wakes.wait(1)  # the relay's connect: RTS then DTR, a reset into the app
                client.dtr = False  # esptool's classic reset starts: the relay takes over
                client.dtr = True
                wakes.wait(2)
            finally:
                client.close()
            assert rig.boot_modes(board)[:2] == ["flash", latched], relay.output
        finally:
            relay.close()


class _Contended:
    """A lock that says when a second thread has to wait for it."""

    def __init__(self, waiting: threading.Event) -> None:
        self._lock = threading.Lock()
        self._waiting = waiting

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self._waiting.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@pytest.fixture
def line_driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, int, str]]:
    """The relay's `sitecustomize`, loaded without taking over this process's ioctl, and
    a pty whose modem-line ioctls it answers."""
    spec = importlib.util.spec_from_file_location("pty_lines_site_under_test",
                                                  SITE_DIR / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.delenv(ENV, raising=False)  # loaded: fcntl.ioctl stays the kernel's
    spec.loader.exec_module(module)
    monkeypatch.setenv(ENV, "unused: _send is replaced")
    master, slave = os.openpty()
    try:
        yield module, slave, os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


def test_line_changes_reach_the_circuit_in_the_order_they_were_set(
        line_driver: tuple[ModuleType, int, str]) -> None:
    """esptool's relay on every hard reset: its writer thread clears DTR (the client's
    trailing `setDTR`) as its `hard_reset_thread` releases RTS. A writer preempted between
    applying "RTS on, DTR off" and sending it must not deliver that after the release: the
    chip would be held in reset for good (issue #25)."""
    site, fd, pty = line_driver
    rts, dtr = struct.pack("I", termios.TIOCM_RTS), struct.pack("I", termios.TIOCM_DTR)
    site.ioctl(fd, termios.TIOCMBIS, rts)  # the hard reset: RTS on, EN low
    delivered: list[int] = []
    writer_sending = threading.Event()
    release_done_or_waiting = threading.Event()  # either way the writer may go on
    # the pty's lock, watched: the release waiting for it lets the writer go on too
    vars(site).setdefault("_locks", {})[pty] = _Contended(release_done_or_waiting)
    real_send = site._send

    def send(target: str, path: str, bits: int) -> None:
        if threading.current_thread().name == "writer":  # preempted right here
            writer_sending.set()
            assert release_done_or_waiting.wait(WAKE_TIMEOUT_S)
        delivered.append(bits)
        real_send("/nonexistent", path, bits)  # no listener: a datagram to nowhere

    site._send = send
    writer = threading.Thread(target=site.ioctl, name="writer",
                              args=(fd, termios.TIOCMBIC, dtr))

    def release() -> None:
        site.ioctl(fd, termios.TIOCMBIC, rts)
        release_done_or_waiting.set()

    releaser = threading.Thread(target=release, name="hard_reset_thread")
    writer.start()
    assert writer_sending.wait(WAKE_TIMEOUT_S)
    releaser.start()
    writer.join(WAKE_TIMEOUT_S)
    releaser.join(WAKE_TIMEOUT_S)
    assert not writer.is_alive() and not releaser.is_alive()
    assert site._lines[pty] == 0, site._lines  # the driver holds both lines off
    assert delivered[-1] == site._lines[pty], delivered  # and so does the circuit: EN up


@pytest.mark.parametrize(("en_cap_uf", "latched"), [(1.0, "download"), (10.0, "flash")])
def test_the_circuit_keeps_the_hosts_timing_when_the_rig_hears_the_lines_late(
        tmp_path: Path, en_cap_uf: float, latched: str) -> None:
    """A busy rig reads a whole reset sequence at once, after it happened: the chip still
    wakes on the host's clock (issue #25: under load a 1 uF board missed esptool's 50 ms
    GPIO0 hold because "GPIO0 released" was read before the 14 ms wake's timer ran)."""
    wakes = Wakes()
    lines = tmp_path / "lines.sock"
    with Rig(tmp_path, seed=3, throttle=False, flash_timing=False, on_event=wakes,
             pty_lines=lines) as rig:
        board = rig.plug(chip="esp32", en_cap_uf=en_cap_uf)
        busy = threading.Event()  # the rig's loop is held up until the sequence is sent
        rig._loop.call_soon_threadsafe(busy.wait, WAKE_TIMEOUT_S)
        start = time.monotonic() - 1.0  # UnixTightReset, one second ago
        steps = [(False, True, 0.0), (True, False, 0.1), (False, False, 0.15)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            for dtr, rts, after in steps:
                sock.sendto(json.dumps({"pty": board.pty, "dtr": dtr, "rts": rts,
                                        "at": start + after}).encode(), str(lines))
        busy.set()
        wakes.wait(1)
        assert rig.boot_modes(board) == [latched]
