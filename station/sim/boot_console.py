"""A board's reset lines and console: the auto-reset circuit wired to the protocol board.

Only boards with an RFC 2217 face get one (a pty carries no DTR/RTS). From then on the
chip is not reset by a host opening or closing the port but by EN, as on hardware:

* EN pulled low (:mod:`.reset_circuit`): the chip stops; nothing it was doing survives.
* EN back up after the RC delay: the ROM latches GPIO0. Low: download mode, the ROM
  download banner, the protocol board in ROM mode at 115200. High: SPI boot; the boot
  story read from flash (:mod:`.boot_log`) is printed and the board runs its "app"
  (deaf to the protocol). A boot that fails (bad header, checksum, partition table, app)
  loops: the story is told ``BOOTLOOP_ROUNDS`` times, then the board stays quiet.
* Power-on (plug) is an SPI boot nobody hears (no host has the port open).

The console runs at 115200 after any reset (the ROM's rate with the modelled crystals):
a host still at a faster rate gets the bytes garbled, as a real UART would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from .board import Board, Mode
from .boot_log import BOOTLOOP_ROUNDS, download_banner, loop_cause
from .boot_security import boot_story
from .bridge import garble
from .pty_link import ROM_BAUD, HostClosed
from .reset_circuit import EN_CAP_UF, AutoReset, ResetCircuitKind, en_delay

FAULT_EN_DELAY_S = 0.0005  # reset_timing fault: the chip wakes before GPIO0 goes low
BOOTLOOP_PAUSE_S = 0.3  # between rounds of a boot loop (RTC watchdog / software reset)

log = logging.getLogger(__name__)


class BootConsole:
    """Wires one board's reset circuit to its protocol state and console."""

    def __init__(self, board: Board, kind: ResetCircuitKind, app_line: str | None = None,
                 on_reset: Callable[[str], Coroutine[Any, Any, None]] | None = None,
                 en_cap_uf: float = EN_CAP_UF) -> None:
        self.board = board
        self.app_line = app_line
        self._on_reset = on_reset
        delay = FAULT_EN_DELAY_S if board.faults.reset_timing else en_delay(en_cap_uf)
        self.circuit = AutoReset(kind, self._hold, self._boot, delay_s=delay)
        self._story: asyncio.Task[None] | None = None
        self.printed: list[str] = []  # console output, ever (tests)
        board.sees_lines = True
        # the watchdog reset is counted by the board itself
        board.on_chip_reset = lambda: self._boot(self.circuit.io0_low, count=False)

    def set_lines(self, dtr: bool, rts: bool, at: float | None = None) -> None:
        self.circuit.set_lines(dtr, rts, at)

    def power_on(self) -> None:
        """Plugged in: the chip boots from flash (GPIO0 pulled high), unheard."""
        self._boot(False, count=False)

    def _hold(self) -> None:
        self._stop_story()
        self.board._reset()
        self.board.mode = Mode.RESET

    def _boot(self, download: bool, count: bool = True) -> None:
        self._stop_story()
        board = self.board
        board._reset()
        if count:
            board.resets.append("en")
            if self._on_reset is not None:
                asyncio.get_running_loop().create_task(self._on_reset("en"))
        if download:
            board.log.debug("EN up, GPIO0 low: download mode")
            self._story = asyncio.get_running_loop().create_task(
                self._print([download_banner(board.spec.name)]))
        else:
            board.mode = Mode.APP
            self._story = asyncio.get_running_loop().create_task(self._spi_boot())

    async def _spi_boot(self, after_reset: bool = False) -> None:
        """Boot from flash; a bootloader enabling flash encryption works (for the time it
        takes, changing flash and eFuses as it goes), then resets into a new boot."""
        board = self.board
        run = boot_story(board.spec, board.efuses, board.flash, self.app_line)
        text = loop_cause(board.spec.name, run.text) if after_reset else run.text
        if run.steps:
            board.log.debug("SPI boot: the bootloader enables flash encryption")
            await self._print([text])
            # EN cancels this task; a step cut short leaves its work undone
            for step in run.steps:
                if step.lines:
                    await self._print(["".join(f"{line}\r\n" for line in step.lines)])
                await asyncio.sleep(step.seconds)
                if step.action is not None:
                    step.action()
            await self._spi_boot(after_reset=True)  # bootloader_reset(): a software reset
            return
        again = loop_cause(board.spec.name, text)
        rounds = [text] if run.ok else [text] + [again] * (BOOTLOOP_ROUNDS - 1)
        board.log.debug("SPI boot (%s)", "app" if run.ok else "boot loop")
        await self._print(rounds)

    def _stop_story(self) -> None:
        if self._story is not None:
            self._story.cancel()
            self._story = None

    async def _print(self, rounds: list[str]) -> None:
        link = self.board.link
        for n, text in enumerate(rounds):
            if n:
                await asyncio.sleep(BOOTLOOP_PAUSE_S)
            self.printed.append(text)
            if not link.host_is_open():
                continue  # nobody listens: a UART's bytes are simply gone
            data = text.encode()
            if link.baud() != ROM_BAUD:
                data = garble(data)
            with contextlib.suppress(HostClosed, OSError):
                await link.write(data)
