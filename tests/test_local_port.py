"""A local serial port under esptool's per-command timeout changes (station/ports/serial.py
`LocalPort`): line settings still reach the tty, timeouts alone do not touch termios."""

from __future__ import annotations

import os
import termios
from collections.abc import Iterator

import pytest
import serial.serialposix

from station.ports.serial import LocalPort


@pytest.fixture
def port() -> Iterator[LocalPort]:
    master, slave = os.openpty()
    port = LocalPort()
    port.port, port.baudrate, port.exclusive, port.timeout = os.ttyname(slave), 115200, \
        True, 3.0
    port.open()
    try:
        yield port
    finally:
        port.close()
        os.close(slave)
        os.close(master)


def test_timeout_changes_leave_termios_alone_and_line_changes_reach_it(
        port: LocalPort, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = termios.tcgetattr

    def counted(fd: int) -> list[object]:
        calls.append(fd)
        return real(fd)
    monkeypatch.setattr(serial.serialposix.termios, "tcgetattr", counted)
    for _ in range(50):  # esptool around each command: to the command's timeout and back
        port.timeout = 0.1
        port.timeout = 3.0
    assert calls == []
    port.baudrate = 460800
    assert calls  # applied
    assert real(port.fd)[4] == termios.B460800
    assert port.timeout == 3.0
