"""A hub host for tests: one board's pty served over RFC 2217 on 127.0.0.1.

Built as esptool's esp_rfc2217_server is, on pyserial's `rfc2217.PortManager`, with two
differences a pty forces: DTR/RTS changes are dropped (a pty has no modem lines: the
ioctl fails with ENOTTY, and esp_rfc2217_server stops serving the client at its first
`ser.rts = True`), and the pty is opened per client and closed when it leaves, as a hub
host's port is by its client (the virtual board sees the open and close as a host's).
Only for the station's remote-port tests until the rig's own RFC 2217 faces serve them.

`EspRelay` is the real thing: esptool's `esp_rfc2217_server` in a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import serial
from serial import rfc2217

from station.daemon import EXIT_OK
from station.demo import partition_table
from station.sim import PluggedBoard, Rig
from station.sim.pty_lines import relay_env
from tests.test_bad_inputs import Background, Site


class _PtySerial(serial.Serial):
    """A pty: the modem lines do not exist, so setting them is a no-op."""

    def _update_dtr_state(self) -> None:
        pass

    def _update_rts_state(self) -> None:
        pass

    # PortManager reports the modem status lines to the client (TIOCMGET: ENOTTY here);
    # a devkit's bridge has CTS/DSR/RI/CD unwired anyway
    cts = dsr = ri = cd = False  # type: ignore[assignment]


class _Connection:
    """What PortManager answers through: `write` (a socket has `sendall`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)


class Relay:
    """Serves `pty` at `url` until `close()` (the far end closes, as an unplug)."""

    def __init__(self, pty: str) -> None:
        self.pty = pty
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"rfc2217://127.0.0.1:{self._server.getsockname()[1]}"
        self._clients: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"relay {self.url}").start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.close()
        for client in list(self._clients):
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                client.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            # one client at a time, the next waits in the backlog: as esp_rfc2217_server
            self.connections += 1
            self._clients.append(client)
            try:
                self._serve(client)
            except (OSError, serial.SerialException):  # a client gone before its greeting
                pass
            finally:
                with contextlib.suppress(OSError):
                    client.close()
                if client in self._clients:
                    self._clients.remove(client)

    def _serve(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = _PtySerial(self.pty, baudrate=115200, timeout=0.05)
        manager = rfc2217.PortManager(port, _Connection(client))
        alive = [True]

        def to_client() -> None:
            while alive[0]:
                try:
                    data = port.read(port.in_waiting or 1)
                    if data:
                        client.sendall(b"".join(manager.escape(data)))
                except (OSError, serial.SerialException):
                    break
            alive[0] = False

        reader = threading.Thread(target=to_client, daemon=True)
        reader.start()
        try:
            while alive[0]:
                data = client.recv(4096)
                if not data:
                    break
                port.write(b"".join(manager.filter(data)))
        except (OSError, serial.SerialException):
            pass
        finally:
            alive[0] = False
            reader.join(2)
            with contextlib.suppress(Exception):
                port.close()
            with contextlib.suppress(OSError):
                client.close()
            if client in self._clients:
                self._clients.remove(client)


class EspRelay:
    """esptool's own `esp_rfc2217_server` serving one virtual board's pty, as a hub host.

    The relay runs unchanged in its own process; the rig (`Rig(pty_lines=...)`) gives
    the pty the modem lines a bridge's driver has (`station.sim.pty_lines`), so the
    relay's reset sequences reach the board's auto-reset circuit (`bare`: a plain pty,
    no modem lines). `close()` is the hub host going away: the process ends and the
    station sees the far end close.
    """

    START_TIMEOUT_S = 20.0

    def __init__(self, pty: str, lines_socket: str | os.PathLike[str],
                 *options: str, bare: bool = False) -> None:
        with socket.socket() as probe:  # a free port: the relay binds it with SO_REUSEADDR
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"rfc2217://127.0.0.1:{port}"
        relay = Path(sys.executable).with_name("esp_rfc2217_server")
        self._output = ""
        self._changed = threading.Condition()
        self._process = subprocess.Popen(
            [str(relay), "-p", str(port), *options, pty],
            env=dict(os.environ) if bare else relay_env(lines_socket),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"esp relay {port}")
        self._reader.start()
        self.wait_output(f"TCP/IP port: {port}")

    @property
    def output(self) -> str:
        return self._output

    def wait_output(self, needle: str, timeout: float = START_TIMEOUT_S) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: needle in self._output
                                          or self._process.poll() is not None, timeout):
                raise TimeoutError(f"esp_rfc2217_server never printed {needle!r}: "
                                   f"{self._output[-500:]!r}")
        if needle not in self._output:
            raise RuntimeError(f"esp_rfc2217_server exited: {self._output[-500:]!r}")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._reader.join(timeout=10)
        if self._process.stdout is not None:
            self._process.stdout.close()

    def _read(self) -> None:
        assert self._process.stdout is not None
        while chunk := self._process.stdout.read1(4096):  # type: ignore[attr-defined]
            with self._changed:
                self._output += chunk.decode("utf-8", "replace")
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()


QUIET = 60.0  # seconds a done line is watched for a board reset or flashed again


def sixteen_boot_and_stay_done(site: Site, rig: Rig, boards: list[PluggedBoard],
                               urls: list[str]) -> None:
    """The station on `urls` with the boot check and a self-test marker: every board done,
    then QUIET seconds with no new job and no reset; one done, booted job per URL."""
    site.set("ports", "watch", [str(site.hub / "none-*")])
    site.set("ports", "remote", urls)
    site.set("verify", "boot", "app").set("verify", "marker", "SELFTEST: PASS")
    station = Background(site)
    try:
        for _ in boards:
            station.wait_line(" done in ", timeout=180)
        resets = [rig.resets(b) for b in boards]
        with pytest.raises(TimeoutError):  # the whole wait: no new job, no reset
            station.wait_line("started job", timeout=QUIET)
        assert [rig.resets(b) for b in boards] == resets
    finally:
        result = station.stop()
    assert result.code == EXIT_OK, str(result)
    jobs = site.ledger()
    assert len(jobs) == len(boards), jobs
    assert {(j["result"], j["boot"], j["booted_project"], j["booted_version"])
            for j in jobs} == {("done", "ok", "station-demo-esp32", "1.0.0")}, jobs
    assert sorted(j["port"] for j in jobs) == sorted(urls)


def point_the_table_elsewhere(site: Site) -> None:
    """The site's firmware with a partition table whose factory app is at 0x20000, while
    the app is still written at 0x10000: every MD5 matches, the board cannot boot it."""
    table = site.root / "partition-table.bin"
    table.write_bytes(partition_table([("nvs", 1, 0x02, 0x9000, 0x6000),
                                       ("phy_init", 1, 0x01, 0xF000, 0x1000),
                                       ("factory", 0, 0x00, 0x20000, 0x100000)]))
    images = site.firmware.images()
    images[1]["file"] = table
    site.set("firmware", "flasher_args", None).set("firmware", "images", images)
