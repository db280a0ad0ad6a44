"""The same-board rule (station/ports/reenumeration.py) and the host's USB facts (ports/usb.py).

The tracker is bookkeeping with a clock: these tests drive it through the sequences the
daemon sees (reset stage, job end, port gone, port back) with a clock the test moves.
The end-to-end proof on re-enumerating virtual boards is in tests/test_native_usb.py.
"""

from __future__ import annotations

from serial.tools.list_ports_common import ListPortInfo

from station.ports import Reenumerations
from station.ports.usb import classify

KEY = "usb-0:1.2"
MAC = "f412fa435c88"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracker(window: float = 5.0) -> tuple[Reenumerations[str], Clock]:
    clock = Clock()
    return Reenumerations(window, clock), clock


def test_a_port_gone_during_the_reset_and_back_is_the_same_job() -> None:
    t, clock = tracker()
    t.resetting(KEY, "job-1", MAC)
    assert t.vanished(KEY, "job-1")  # mid-reset: not an unplug
    assert t.away() == ["job-1"]
    clock.now += 1.5
    t.ended(KEY, "job-1")
    assert t.returned(KEY, None) == "job-1"
    assert t.away() == []


def test_a_port_gone_after_the_job_within_the_window_is_the_same_board() -> None:
    t, clock = tracker()
    t.resetting(KEY, "job-1", MAC)
    t.ended(KEY, "job-1")
    clock.now += 4.0
    assert t.vanished(KEY, "job-1")
    clock.now += 2.0  # 6 s after the reset, 2 s after it vanished: both within 5 s
    assert t.returned(KEY, MAC) == "job-1"
    clock.now += 0.5  # it may re-enumerate once more (OTG: ROM, then the app)
    assert t.vanished(KEY, "job-1")
    assert t.returned(KEY, MAC) == "job-1"


def test_after_the_window_a_replug_is_a_new_board() -> None:
    t, clock = tracker()
    t.resetting(KEY, "job-1", MAC)
    t.ended(KEY, "job-1")
    clock.now += 5.1
    assert not t.vanished(KEY, "job-1")  # gone too late: an unplug
    assert t.returned(KEY, None) is None
    t2, clock2 = tracker()
    t2.resetting(KEY, "job-1", MAC)
    t2.ended(KEY, "job-1")
    assert t2.vanished(KEY, "job-1")
    clock2.now += 5.1  # back too late: a new board
    assert t2.returned(KEY, None) is None
    assert t2.away() == []


def test_another_mac_in_the_socket_is_a_new_board() -> None:
    t, _ = tracker()
    t.resetting(KEY, "job-1", MAC)
    t.ended(KEY, "job-1")
    assert t.vanished(KEY, "job-1")
    assert t.returned(KEY, "f412fa435c89") is None
    assert t.returned(KEY, MAC) is None  # forgotten: that socket's reset is over


def test_ports_the_station_did_not_reset_are_unplugs() -> None:
    t, _ = tracker()
    assert not t.vanished(KEY, "job-1")  # flashing, not resetting: an unplug
    t.resetting(KEY, "job-1", MAC)
    assert not t.vanished("usb-0:1.3", "job-2")  # another socket
    assert not t.vanished(KEY, None)  # a port with no job
    assert t.returned("usb-0:1.3", None) is None
    assert t.returned(KEY, None) is None  # never went away


def test_a_window_of_zero_turns_the_rule_off() -> None:
    t, _ = tracker(window=0.0)
    t.resetting(KEY, "job-1", MAC)
    assert not t.vanished(KEY, "job-1")


def _port(vid: int | None, pid: int | None, serial: str | None = None) -> ListPortInfo:
    info = ListPortInfo("/dev/ttyACM0", skip_link_detection=True)
    info.vid, info.pid, info.serial_number = vid, pid, serial
    return info


def test_native_usb_is_known_from_the_vid_and_pid() -> None:
    jtag = classify(_port(0x303A, 0x1001, "F4:12:FA:43:5C:88"))
    assert jtag is not None and jtag.kind == "jtag" and jtag.mac == MAC
    otg = classify(_port(0x303A, 0x0009, "1234"))  # ESP32-S3 ROM's USB-OTG CDC
    assert otg is not None and otg.kind == "otg" and otg.mac is None
    assert classify(_port(0x10C4, 0xEA60, "0001")) is None  # a CP2102 bridge
    assert classify(_port(None, None)) is None  # a pty: no USB at all
    odd = classify(_port(0x303A, 0x1001, "not-a-mac"))
    assert odd is not None and odd.mac is None
