"""A step-down the adapter's data sheet explains is one step, not a walk (issue #23).

The bridge is named as the station names it on a real rig: from pyserial's port info
(VID:PID and product string as sysfs reports them for each chip). A virtual board's pty
has no USB device, so the rig tests hand the flasher that port info for the bridge the
board was plugged with, through the flasher's sysfs seam (`adapter=`): the station
itself never learns that the port is virtual.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serial.tools.list_ports_common import ListPortInfo

from station.flash import EsptoolFlasher
from station.ports import Adapter, RateNote, beyond, rung_after
from station.ports.baud import classify
from station.sim import Rig
from station.sim import protocol as P
from tests.test_baud import open_and_close

pytestmark = pytest.mark.timeout(120)

PRODUCTS = {  # the product strings the chips report (their vendors' defaults)
    "cp2102": "CP2102 USB to UART Bridge Controller",
    "cp2102n": "CP2102N USB to UART Bridge Controller",
    "cp2104": "CP2104 USB to UART Bridge Controller",
}


def port_info(vid: int | None, pid: int | None, product: str | None) -> ListPortInfo:
    info = ListPortInfo("/dev/ttyUSB0", skip_link_detection=True)
    info.vid, info.pid, info.product = vid, pid, product
    return info


def silabs(product: str | None) -> Adapter:
    return classify(port_info(0x10C4, 0xEA60, product))


CP2102, CP2102N = silabs(PRODUCTS["cp2102"]), silabs(PRODUCTS["cp2102n"])
UNNAMED_SILABS = silabs(None)  # 10c4:ea60 whose product string could not be read
UNKNOWN = classify(port_info(None, None, None))  # a pty, an RFC 2217 port


@pytest.mark.parametrize(("adapter", "failed", "then"), [
    (CP2102, 3_000_000, 921_600),  # the data sheet explains it: straight to the top
    (CP2102, 2_000_000, 921_600),
    (CP2102, 921_600, 460_800),  # a rate it carries failed: a cable, the next rung
    (CP2102N, 3_000_000, 2_000_000),  # carries 3 Mbaud: not the bridge's fault
    (CP2102N, 2_000_000, 1_500_000),
    (UNNAMED_SILABS, 3_000_000, 2_000_000),  # a CP2104 tops out at 2 Mbaud
    (UNNAMED_SILABS, 2_000_000, 921_600),  # ... and a CP2102 at 921600: 1.5M is no top
    (UNKNOWN, 3_000_000, 2_000_000),  # no facts: the ladder
    (UNKNOWN, 2_000_000, 1_500_000),
    (CP2102, 115_200, None),  # the ladder's end
])
def test_after_a_failure_the_next_rate_is_the_fastest_the_adapter_may_carry(
        adapter: Adapter, failed: int, then: int | None) -> None:
    assert rung_after(failed, adapter) == then


def test_a_rate_above_every_bridge_the_port_may_be_is_beyond_it() -> None:
    assert beyond(3_000_000, CP2102) and beyond(1_000_000, CP2102)
    assert not beyond(921_600, CP2102)
    assert not beyond(3_000_000, CP2102N)
    assert not beyond(3_000_000, UNNAMED_SILABS)  # it may be a CP2102N
    assert beyond(3_000_000, silabs(PRODUCTS["cp2104"]))
    assert not beyond(3_000_000, UNKNOWN)


@pytest.mark.parametrize(("vid", "pid", "product", "name"), [
    (0x0403, 0x6010, "Dual RS232-HS", "ft2232"),  # an ESP-Prog's FT2232HL
    (0x0403, 0x6015, "FT231X USB UART", "ft231x"),
])
def test_ftdi_bridges_past_the_ft232r_are_named_and_carry_3_mbaud(
        vid: int, pid: int, product: str, name: str) -> None:
    adapter = classify(port_info(vid, pid, product))
    assert adapter.bridge is not None and adapter.bridge.name == name
    assert adapter.tops == (3_000_000,) and not beyond(3_000_000, adapter)


# -- on a virtual board --------------------------------------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "hub", seed=23, throttle=False, flash_timing=False) as r:
        yield r


@pytest.mark.parametrize("chip", ["esp32", "esp32c3"])
def test_a_cp2102_asked_for_3_mbaud_steps_to_921600_in_one_step_on_the_rom(
        rig: Rig, chip: str) -> None:
    """The port says CP2102 (sysfs): 3 Mbaud is still tried, on the ROM, and its failure
    goes straight to 921600, recorded with why; the stub is uploaded once."""
    board = rig.plug(chip=chip, usb="bridge", bridge="cp2102")
    assert board.vid_pid == "10c4:ea60"
    notes: list[RateNote] = []

    async def note(n: RateNote) -> None:
        notes.append(n)

    flasher = EsptoolFlasher(baud=3_000_000, chips=(chip,), on_rate=note,
                             adapter=lambda _port: CP2102)
    open_and_close(flasher, board.port)
    assert [(n.stepped_from, n.baud, n.adapter) for n in notes] == [
        (3_000_000, 921_600, "cp2102"), (None, 921_600, "cp2102")]
    assert notes[0].reason is not None and "cp2102 carries 921600 at most" in notes[0].reason
    live = rig.board(board)
    assert live.commands[P.MEM_END] == 1  # one stub upload: 3 Mbaud failed on the ROM
    if chip == "esp32":  # its stub resets the UART to the ROM's stored rate: 115200 first
        assert live.baud_changes == [3_000_000, 921_600, 115_200, 921_600]
    else:  # the C3's stub keeps the ROM's rate: it travels at 921600
        assert live.baud_changes == [3_000_000, 921_600]
    step = flasher.memory.recall(board.port)
    assert step is not None and (step.from_baud, step.to_baud) == (3_000_000, 921_600)


def test_a_cp2102n_asked_for_3_mbaud_pays_nothing_for_the_table(rig: Rig) -> None:
    """A bridge that carries the rate by its data sheet goes as before: the stub first
    (ESP32), one change, no probe on the ROM."""
    board = rig.plug(chip="esp32", usb="bridge", bridge="cp2102n")
    flasher = EsptoolFlasher(baud=3_000_000, chips=("esp32",), adapter=lambda _port: CP2102N)
    open_and_close(flasher, board.port)
    assert rig.board(board).baud_changes == [3_000_000]
    assert flasher.memory.recall(board.port) is None
