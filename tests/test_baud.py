"""Line rates (issue #11): which baud a port gets, the ladder's bounds, and where the
rate shows (config, flasher, ledger, dashboard).

pyserial's sysfs reader looks only at the real /sys, so adapter detection is tested on
pyserial's own port-info objects filled as sysfs fills them for each bridge (product
strings as the chips report them), and on a real pty (no USB device: unknown). The
flasher parts run real esptool against virtual boards.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from serial.tools.list_ports_common import ListPortInfo

from station.config import load
from station.errors import PortError
from station.events import JobFinished, JobStarted, LineRate, Stage
from station.flash import EsptoolFlasher
from station.ports import (
    BaudSettings,
    NativeUsb,
    RateNote,
    SlotMemory,
    Step,
    next_lower,
    points_at_line,
    usb_adapter,
)
from station.ports.baud import LADDER, classify
from station.record import Ledger
from station.screen import StationView, format_event, render
from station.sim import Rig
from station.sim.faults import Faults
from tests.ledgerkit import schema_1_ledger

pytestmark = pytest.mark.timeout(120)


def port_info(vid: int | None, pid: int | None, product: str | None) -> ListPortInfo:
    info = ListPortInfo("/dev/ttyUSB0", skip_link_detection=True)
    info.vid, info.pid, info.product = vid, pid, product
    return info


# -- the adapter behind a port ---------------------------------------------------------


@pytest.mark.parametrize(("vid", "pid", "product", "name", "top"), [
    (0x10C4, 0xEA60, "CP2102 USB to UART Bridge Controller", "cp2102", 921_600),
    (0x10C4, 0xEA60, "CP2102N USB to UART Bridge Controller", "cp2102n", 3_000_000),
    (0x10C4, 0xEA60, "CP2104 USB to UART Bridge Controller", "cp2104", 2_000_000),
    (0x10C4, 0xEA60, None, "cp2102", 921_600),  # product unreadable: the slowest sharing it
    (0x1A86, 0x7523, "USB Serial", "ch340", 460_800),
    (0x1A86, 0x55D3, "USB Single Serial", "ch343", 6_000_000),
    (0x0403, 0x6001, "FT232R USB UART", "ft232r", 3_000_000),
])
def test_a_bridge_is_named_from_vid_pid_and_product(vid: int, pid: int, product: str | None,
                                                    name: str, top: int) -> None:
    adapter = classify(port_info(vid, pid, product))
    assert adapter.bridge is not None and adapter.bridge.name == name
    assert adapter.bridge.max_baud == top and not adapter.native


def test_native_usb_and_unknown_adapters() -> None:
    jtag = classify(port_info(0x303A, 0x1001, "USB JTAG/serial debug unit"))
    assert jtag.native and jtag.bridge is None
    assert BaudSettings(baud=2_000_000).rate_for(jtag) == (None, "native USB 303a:1001")
    other = classify(port_info(0x067B, 0x2303, "USB-Serial Controller"))  # a PL2303
    assert other.bridge is None and other.describe() == "067b:2303"


def test_a_pty_has_no_usb_device() -> None:
    master, slave = os.openpty()
    try:
        adapter = usb_adapter(os.ttyname(slave))  # through pyserial's real sysfs reader
    finally:
        os.close(master)
        os.close(slave)
    assert adapter.vid is None and adapter.bridge is None and not adapter.native


# -- the rate for a port ------------------------------------------------------------------


CP2102 = classify(port_info(0x10C4, 0xEA60, "CP2102 USB to UART Bridge Controller"))
CH343 = classify(port_info(0x1A86, 0x55D3, "USB Single Serial"))
PTY = classify(port_info(None, None, None))


def test_auto_takes_each_bridges_top_rate_up_to_max_baud() -> None:
    auto = BaudSettings(baud=None)
    assert auto.rate_for(CP2102)[0] == 921_600
    assert auto.rate_for(CH343) == (3_000_000, "auto: ch343, max_baud")  # default cap 3 M
    assert BaudSettings(baud=None, max_baud=6_000_000).rate_for(CH343)[0] == 6_000_000
    assert auto.rate_for(PTY)[0] == 921_600  # unknown: the common rate
    assert BaudSettings(baud=None, by_adapter={"other": 460_800}).rate_for(PTY)[0] == 460_800


def test_tables_before_the_default_and_max_baud_over_all() -> None:
    s = BaudSettings(baud=2_000_000, by_adapter={"cp2102": 460_800, "1a86:55d3": 1_500_000},
                     by_port={"A3": 115_200})
    assert s.rate_for(CP2102)[0] == 460_800  # by name
    assert s.rate_for(CH343)[0] == 1_500_000  # by VID:PID
    assert s.rate_for(PTY)[0] == 2_000_000  # the configured default
    assert s.rate_for(CH343, ("A3", "/dev/ttyUSB3"))[0] == 115_200  # the slot's own
    assert BaudSettings(baud=2_000_000, max_baud=921_600).rate_for(PTY)[0] == 921_600


def test_the_ladder_goes_down_to_the_roms_rate_and_stops() -> None:
    rates, rate = [], 6_000_000
    while (lower := next_lower(rate)) is not None:
        rates.append(lower)
        rate = lower
    assert rates == list(LADDER)
    assert next_lower(230_400) == 115_200 and next_lower(115_200) is None


def test_line_failures_are_told_from_the_others() -> None:
    assert points_at_line("Timed out waiting for packet header")
    assert points_at_line("Invalid head of packet (0x2A): Possible serial noise or corruption.")
    assert points_at_line("No serial data received.")
    assert not points_at_line("Failed to write to target RAM (result was 01070000: "
                              "Flash write failed)")


def test_a_slot_remembers_its_lowest_step() -> None:
    memory = SlotMemory()
    memory.remember(Step("A1", 2_000_000, 1_500_000, "r1"))
    memory.remember(Step("A1", 1_500_000, 921_600, "r2"))
    memory.remember(Step("A1", 3_000_000, 2_000_000, "later, higher"))
    assert memory.limit("A1", 2_000_000)[0] == 921_600
    assert memory.limit("A1", 460_800) == (460_800, None)  # already lower: untouched
    assert memory.limit("A2", 2_000_000) == (2_000_000, None)


# -- config ------------------------------------------------------------------------------


def config_text(ports: str) -> str:
    return f"""[ports]
watch = ["/dev/ttyUSB*"]
{ports}
[firmware]
chip = "esp32"
images = [{{ offset = 0x10000, file = "app.bin" }}]
"""


def test_config_reads_auto_max_baud_and_the_tables(tmp_path: Path) -> None:
    (tmp_path / "app.bin").write_bytes(b"\xe9" + bytes(100))
    path = tmp_path / "station.toml"
    path.write_text(config_text('baud = "auto"\nmax_baud = 2000000\n'
                                '[ports.baud_by_adapter]\n"10C4:EA60" = 921600\nCH343 = 3000000\n'
                                '[ports.baud_by_port]\nA3 = 460800\n'))
    line = load(path).ports.line
    assert line.baud is None and line.max_baud == 2_000_000
    assert line.by_adapter == {"10c4:ea60": 921_600, "ch343": 3_000_000}
    assert line.by_port == {"A3": 460_800}
    assert line.rate_for(CH343)[0] == 2_000_000  # max_baud caps the table too


@pytest.mark.parametrize(("ports", "key", "words"), [
    ("baud = 7000000", "ports.baud", "beyond any USB-UART bridge"),
    ("baud = 3000000\nmax_baud = 921600", "ports.baud", "above [ports] max_baud"),
    ("[ports.baud_by_port]\nA1 = \"fast\"", "ports.baud_by_port.A1", "must be an int"),
    ("[ports.baud_by_adapter]\n\"10c4-ea60\" = 921600", "ports.baud_by_adapter.10c4-ea60",
     "neither a VID:PID"),
])
def test_config_line_rate_mistakes_name_the_key(tmp_path: Path, ports: str, key: str,
                                                words: str) -> None:
    (tmp_path / "app.bin").write_bytes(b"\xe9" + bytes(100))
    path = tmp_path / "station.toml"
    path.write_text(config_text(ports))
    with pytest.raises(Exception) as err:
        load(path)
    assert getattr(err.value, "key", None) == key and words in str(err.value)


# -- the flasher: what is reported, what is never stepped ------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "hub", seed=5, throttle=False, flash_timing=False) as r:
        yield r


def open_and_close(flasher: EsptoolFlasher, port: str) -> None:
    async def go() -> None:
        session = await asyncio.wait_for(flasher.open(port), 60)
        await session.close()
    asyncio.run(go())


def test_native_usb_keeps_its_baud_and_says_so(rig: Rig) -> None:
    board = rig.plug(chip="esp32s3", usb="jtag")
    notes: list[RateNote] = []

    async def note(n: RateNote) -> None:
        notes.append(n)

    native = NativeUsb(kind="jtag", vid=0x303A, pid=0x1001, serial_number=None)
    open_and_close(EsptoolFlasher(baud=2_000_000, native=lambda _p: native, on_rate=note),
                   board.port)
    assert rig.board(board).baud_changes == []  # no CHANGE_BAUDRATE at all
    assert notes == [RateNote(baud=None, adapter="native USB jtag")]


def test_a_mute_board_is_never_stepped_down(rig: Rig) -> None:
    board = rig.plug(chip="esp32", faults=Faults(mute=True))
    notes: list[RateNote] = []

    async def note(n: RateNote) -> None:
        notes.append(n)

    flasher = EsptoolFlasher(baud=2_000_000, connect_attempts=2, on_rate=note)
    with pytest.raises(PortError, match="no answer from an ESP bootloader"):
        open_and_close(flasher, board.port)
    assert notes == [] and flasher.memory.recall(board.port) is None


def test_a_cp2102_at_2_mbaud_walks_down_to_921600_and_the_port_remembers(rig: Rig) -> None:
    """A board at 2 Mbaud whose slot has no memory yet walks 2M -> 1.5M -> 921600 on a
    CP2102 and stops there: it never goes below what works."""
    board = rig.plug(chip="esp32", usb="bridge", bridge="cp2102")
    notes: list[RateNote] = []

    async def note(n: RateNote) -> None:
        notes.append(n)

    flasher = EsptoolFlasher(baud=2_000_000, on_rate=note)
    open_and_close(flasher, board.port)
    assert [(n.stepped_from, n.baud) for n in notes] == [
        (2_000_000, 1_500_000), (1_500_000, 921_600), (None, 921_600)]
    assert rig.board(board).baud_changes[-1] == 921_600
    step = flasher.memory.recall(board.port)
    assert step is not None and step.to_baud == 921_600
    # the next session on that port starts there (once the board saw the close: the
    # virtual board's only reset here, as it has no reset lines)
    rig.await_host_close(board)
    notes.clear()
    open_and_close(flasher, board.port)
    assert [(n.baud, n.remembered) for n in notes] == [(921_600, True)]


# -- where it shows: ledger and dashboard --------------------------------------------------


def line_events() -> list[JobStarted | LineRate | JobFinished]:
    w = {"job_id": "j1", "port": "/dev/ttyUSB1", "slot": "A1"}
    return [JobStarted(**w, station="s", firmware_hash="f", at=100.0),
            LineRate(**w, baud=1_500_000, adapter="cp2102", stepped_from=2_000_000,
                     reason="no reply after the change to 2000000 baud (Timed out)", at=101.0),
            LineRate(**w, baud=921_600, adapter="cp2102", stepped_from=1_500_000,
                     reason="write app failed at 1500000 baud (Timed out)", at=102.0),
            LineRate(**w, baud=921_600, adapter="cp2102", at=102.5),
            JobFinished(**w, result=Stage.DONE, at=110.0)]


def test_the_ledger_row_names_the_rate_and_every_step(tmp_path: Path) -> None:
    async def record() -> None:
        for event in line_events():
            await ledger.record(event)

    ledger = Ledger.open(tmp_path)
    try:
        asyncio.run(record())
        job = ledger.jobs()[0]
    finally:
        ledger.close()
    assert job["baud"] == 921_600
    assert job["baud_steps"] == ("2000000->1500000: no reply after the change to 2000000 baud "
                                 "(Timed out); 1500000->921600: write app failed at 1500000 "
                                 "baud (Timed out)")


def test_an_older_ledger_gains_the_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    schema_1_ledger(tmp_path, """
    INSERT INTO jobs (job_id, slot, result, started_at) VALUES ('old', 'A9', 'done', 1.0);
    """)
    ledger = Ledger.open(tmp_path)
    try:
        rows = ledger.jobs()
    finally:
        ledger.close()
    assert [(r["job_id"], r["result"], r["baud"]) for r in rows] == [("old", "done", None)]


def test_the_dashboard_shows_the_rate_the_step_and_the_slots_memory() -> None:
    view = StationView(station="s")
    events = line_events()
    for event in events[:3]:
        view.apply(event)
    console = Console(width=160, color_system=None, force_terminal=True, record=True)
    console.print(render(view, 103.0))
    text = console.export_text()
    assert "921600 ↓" in text
    assert "stepped down 1500000->921600: write app failed at 1500000 baud" in text
    assert format_event(events[1], view) == (
        "1970-01-01T00:01:41Z A1 /dev/ttyUSB1 - stepped down 2000000 -> 1500000 baud: "
        "no reply after the change to 2000000 baud (Timed out)")
    # the slot's next board starts lower: the row says the slot remembers
    w = {"job_id": "j2", "port": "/dev/ttyUSB1", "slot": "A1"}
    view.apply(JobStarted(**w, station="s", firmware_hash="f", at=120.0))
    view.apply(LineRate(**w, baud=921_600, adapter="cp2102", remembered=True,
                        reason="slot A1 stepped down 1500000->921600 earlier", at=121.0))
    console = Console(width=160, color_system=None, force_terminal=True, record=True)
    console.print(render(view, 122.0))
    assert "921600 slot↓" in console.export_text()
