"""Connecting in a blink (issue #23): what the connect sequence sends, per chip, over real
esptool to virtual boards whose ROM and stub follow the sources (docs/virtual-boards.md).

Times are benchmarks (benchmarks/baud.py, BENCHMARKS.md), not asserted here: these
tests check the commands a board receives and the rates its bytes crossed the line at.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from station.flash import EsptoolFlasher
from station.flash import _connect as connect
from station.ports import RateNote
from station.sim import Rig
from station.sim import protocol as P
from station.sim.chips import CHIP_NAMES, chip_spec

pytestmark = pytest.mark.timeout(120)

STUB_BYTES = 5000  # every esp-flasher-stub JSON esptool 5.6 ships is > 5.8 KB of text


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "hub", seed=23, throttle=False, flash_timing=False) as r:
        yield r


def open_identify_close(flasher: EsptoolFlasher, port: str) -> str:
    async def go() -> str:
        session = await asyncio.wait_for(flasher.open(port), 60)
        try:
            return (await session.identify()).chip
        finally:
            await session.close()
    return asyncio.run(go())


def test_a_slot_known_to_hold_an_esp32_is_asked_no_security_info(rig: Rig) -> None:
    """The first board of a slot is detected by esptool (GET_SECURITY_INFO, which the
    ESP32 ROM refuses twice); the slot's next board is checked by its magic register."""
    flasher = EsptoolFlasher(baud=921_600)
    first = rig.plug(chip="esp32")
    assert open_identify_close(flasher, first.port) == "esp32"
    assert rig.board(first).commands[P.GET_SECURITY_INFO] == 2  # 20, then 12 bytes
    rig.unplug(first)
    second = rig.plug(chip="esp32", index=first.index)  # a new board, same hub port
    assert second.port == first.port
    assert open_identify_close(flasher, second.port) == "esp32"
    assert rig.board(second).commands[P.GET_SECURITY_INFO] == 0
    assert rig.board(second).commands[P.READ_REG] > 0


def test_firmware_for_the_esp32_alone_skips_the_probe_on_the_first_board(rig: Rig) -> None:
    board = rig.plug(chip="esp32")
    assert open_identify_close(EsptoolFlasher(baud=921_600, chips=("esp32",)),
                               board.port) == "esp32"
    assert rig.board(board).commands[P.GET_SECURITY_INFO] == 0


def test_another_chip_in_an_esp32_slot_is_detected_without_a_second_reset(rig: Rig) -> None:
    """The magic register says it is no ESP32: esptool's detection runs on the synced
    ROM (no reset), and the slot now expects that chip."""
    board = rig.plug(chip="esp32s3")
    flasher = EsptoolFlasher(baud=921_600)
    flasher.known_chips[board.port] = "esp32"
    assert open_identify_close(flasher, board.port) == "esp32s3"
    live = rig.board(board)
    assert live.sessions == 1  # one open of the port: nothing reset the board twice
    assert live.commands[P.GET_SECURITY_INFO] >= 1
    assert flasher.known_chips[board.port] == "esp32s3"


STUB_CHIPS = [c for c in CHIP_NAMES if c != "esp32e22"]  # esptool 5.6 has no E22 stub


@pytest.mark.parametrize("chip", STUB_CHIPS)
def test_the_stub_travels_at_the_line_rate_iff_the_modelled_stub_keeps_the_roms_uart(
        rig: Rig, chip: str) -> None:
    """Per chip, as the virtual board models esp-flasher-stub's start-up
    (chips.STUB_RESETS_UART): a stub that keeps the ROM's UART goes at 2 Mbaud after a
    CHANGE_BAUDRATE on the ROM; one that reprograms it goes at 115200, then the change."""
    board = rig.plug(chip=chip, usb="bridge", bridge="cp2102n")
    open_identify_close(EsptoolFlasher(baud=2_000_000), board.port)
    live = rig.board(board)
    keeps = not chip_spec(chip).stub_resets_uart
    assert live.baud_changes == [2_000_000]  # one change: on the ROM iff the stub keeps it
    assert live.commands[P.MEM_END] == 1  # one stub upload
    assert (live.link.traffic[2_000_000] > STUB_BYTES) is keeps, dict(live.link.traffic)
    assert (live.link.traffic[115_200] > STUB_BYTES) is not keeps, dict(live.link.traffic)


def test_a_stub_that_resets_the_uart_is_not_sent_fast_twice(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the ESP32's stub sent at the fast rate, it would greet at the ROM's stored
    rate and the OHAI arrive garbled: the session gives up on it within the greeting
    timeout, connects with the stub at 115200, and the chip stays on that path."""
    monkeypatch.setattr(connect, "FAST_STUB_CHIPS", connect.FAST_STUB_CHIPS | {"esp32"})
    monkeypatch.setattr(connect, "_fast_stub_failed", set())
    flasher = EsptoolFlasher(baud=2_000_000)
    first = rig.plug(chip="esp32", usb="bridge", bridge="cp2102n")
    assert open_identify_close(flasher, first.port) == "esp32"
    assert connect._fast_stub_failed == {"esp32"}
    assert rig.board(first).commands[P.MEM_END] == 2  # the fast stub, then the slow one
    second = rig.plug(chip="esp32", usb="bridge", bridge="cp2102n")
    assert open_identify_close(flasher, second.port) == "esp32"
    assert rig.board(second).commands[P.MEM_END] == 1
    assert rig.board(second).link.traffic[115_200] > STUB_BYTES


def test_after_a_line_failure_each_rate_is_tried_on_the_rom_before_the_stub(rig: Rig) -> None:
    """A CP2102 (921600 at most) asked for 2 Mbaud: the first failure costs a stub (the
    rate was tried on it), the rungs below are tried on the ROM, and the stub is loaded
    once more, at 115200, only when a rate answered there."""
    board = rig.plug(chip="esp32", usb="bridge", bridge="cp2102")
    notes: list[RateNote] = []

    async def note(n: RateNote) -> None:
        notes.append(n)

    open_identify_close(EsptoolFlasher(baud=2_000_000, on_rate=note), board.port)
    assert [(n.stepped_from, n.baud) for n in notes] == [
        (2_000_000, 1_500_000), (1_500_000, 921_600), (None, 921_600)]
    live = rig.board(board)
    # on the stub: 2M fails; on the ROM: 1.5M fails, 921600 answers and goes back to
    # 115200 for the stub; on the stub: 921600
    assert live.baud_changes == [2_000_000, 1_500_000, 921_600, 115_200, 921_600]
    assert live.commands[P.MEM_END] == 2  # two stub uploads, not one per rung
