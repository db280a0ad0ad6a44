"""The connect's resets on a key = "device" line (station/flash/first_boot_guard.py), on a
scripted console: what a board prints after each reset, read by read.

A first boot's pass (ESP-IDF flash_encrypt.c's lines, then silence while it rewrites the
flash) must never be reset before "Flash encryption completed"; the long reset delay
goes first; a pass printing when the port opens is waited out before any reset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from esptool.util import FatalError

from station.errors import PortError
from station.flash.first_boot_guard import QUIET_S, FirstBootGuard

DOWNLOAD = b"ESP-ROM:esp32c3-api1-20210207\r\nrst:0x1 (POWERON),boot:0x0 " \
    b"(DOWNLOAD(USB/UART0))\r\nwaiting for download\r\n"
FLASH = b"ESP-ROM:esp32c3-api1-20210207\r\nrst:0x1 (POWERON),boot:0x8 " \
    b"(SPI_FAST_FLASH_BOOT)\r\nSPIWP:0xee\r\nmode:DIO, clock div:1\r\n"
PASS = b"I (60) flash_encrypt: Generating new flash encryption key...\r\n" \
    b"I (70) efuse: Writing EFUSE_BLK_KEY0 with purpose 4\r\n"
SILENCE = [b""] * (int(QUIET_S / 0.05) * 3)  # reads that time out: longer than QUIET_S
DONE = b"I (900) flash_encrypt: Flash encryption completed\r\n" \
    b"I (904) boot: Resetting with flash encryption enabled...\r\n"


class Console:
    """A port whose reads return what the board printed, chunk by chunk (b"": a read
    that times out); each reset swaps in what the board prints after it."""

    def __init__(self, at_open: Sequence[bytes], after_resets: Sequence[Sequence[bytes]]
                 ) -> None:
        self.timeout: float | None = 3.0
        self.pending = list(at_open)
        self.after = [list(a) for a in after_resets]
        self.events: list[str] = []

    @property
    def in_waiting(self) -> int:
        return len(self.pending[0]) if self.pending else 0

    def read(self, size: int = 1) -> bytes:
        chunk = self.pending.pop(0) if self.pending else b""
        if not chunk:
            time.sleep(self.timeout or 0)  # the serial read's own timeout
            return b""
        self.events.append(chunk.decode())
        return chunk

    def reset_input_buffer(self) -> None:
        self.pending = [c for c in self.pending if not c]


class Reset:
    def __init__(self, console: Console, delay: float) -> None:
        self.console, self.reset_delay = console, delay

    def __call__(self) -> None:
        self.console.events.append(f"reset {self.reset_delay}")
        self.console.pending = self.console.after.pop(0)


def resets(console: Console) -> list[str]:
    return [e for e in console.events if e.startswith("reset")]


def guarded(console: Console, wait_s: float = 5.0, attempts: int = 4) -> None:
    guard = FirstBootGuard(console, "/dev/ttyUSB0", wait_s, remote=False)
    guard.reset_into_download([Reset(console, 0.05), Reset(console, 0.55)], attempts)


def test_the_long_reset_delay_goes_first_and_one_reset_is_enough() -> None:
    console = Console([], [[DOWNLOAD]])
    guarded(console)
    assert resets(console) == ["reset 0.55"]
    assert console.timeout == 3.0  # esptool's read timeout, as it was


def test_a_pass_started_by_a_reset_is_never_reset_before_it_completes() -> None:
    console = Console([], [[FLASH, PASS, *SILENCE, DONE], [DOWNLOAD]])
    guarded(console)
    events = console.events
    assert resets(console) == ["reset 0.55", "reset 0.05"]
    assert events.index("reset 0.05") > events.index(DONE.decode()), events


def test_a_pass_printing_when_the_port_opens_is_waited_out_before_any_reset() -> None:
    console = Console([PASS, *SILENCE, DONE], [[DOWNLOAD]])
    guarded(console)
    assert console.events == [PASS.decode(), DONE.decode(), "reset 0.55", DOWNLOAD.decode()]


def test_a_pass_that_does_not_end_in_time_is_reported_not_reset() -> None:
    console = Console([], [[FLASH, PASS, *SILENCE * 3], [DOWNLOAD]])
    started = time.monotonic()
    with pytest.raises(PortError, match="still encrypting its flash after 0.5 s") as e:
        guarded(console, wait_s=0.5)
    assert not e.value.transient
    assert resets(console) == ["reset 0.55"]
    assert time.monotonic() - started < 5.0


def test_a_flash_boot_without_a_pass_is_reset_again_at_once() -> None:
    """An encrypted board's boot (or a blank board's "invalid header" loop) has no pass:
    the next reset follows after a short listen; a board that never enters download mode
    ends as esptool's connect does, with its words (the BOOT + EN prompt keys on them)."""
    app = b"I (40) boot: Loaded app from partition at offset 0x10000\r\n"
    console = Console([], [[FLASH, app], [FLASH, app]])
    with pytest.raises(FatalError, match=r"Wrong boot mode detected \(0x8\)"):
        guarded(console, attempts=2)
    assert resets(console) == ["reset 0.55", "reset 0.05"]


def test_a_board_the_last_stop_caught_in_its_first_boot_is_not_reset_while_silent() -> None:
    """Silence proves nothing inside a region: with `under_way` (the job's last journal
    line was "first_boot before") the guard waits for the pass's last line."""
    console = Console([*SILENCE, *SILENCE, DONE], [[DOWNLOAD]])
    guard = FirstBootGuard(console, "/dev/ttyUSB0", 5.0, remote=False)
    guard.reset_into_download([Reset(console, 0.55)], 4, under_way=True)
    assert console.events == [DONE.decode(), "reset 0.55", DOWNLOAD.decode()]
