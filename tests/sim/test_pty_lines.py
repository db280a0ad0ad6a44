"""esptool's `esp_rfc2217_server` on a virtual board's pty, with and without modem lines.

The relay runs unchanged in its own process. A bare pty refuses DTR/RTS (ENOTTY) and
the relay drops its client; with the rig's pty lines (`station.sim.pty_lines`) its reset
sequences reach the board's auto-reset circuit with the relay's own timing: GPIO0 is
held low for 50 ms after EN is released (`UnixTightReset`), 0.55 s with `--r0`.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import serial

from station.sim import Rig
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
