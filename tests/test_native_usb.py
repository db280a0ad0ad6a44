"""Native-USB boards that re-enumerate when reset (issue #9), through `station run`.

A USB-Serial/JTAG or USB-OTG board drops off the bus when the station resets it and
comes back 0.2-2 s later as a new pty at the same by-path name (station/sim: usb="jtag"
or "otg"). The station must take that as the same board: one job, one `done`, one
reset (the sim counts the resets each board sees), and no new job however long it
waits. A board pulled out during its flash and plugged again is a re-plug: a second job.
The station cannot tell a virtual port is native (a pty has no VID:PID); the same-board
rule must hold for any port, which is what these tests show.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from station.app import assemble
from station.config import Config
from station.daemon import Options
from station.demo import make_demo_firmware
from station.flash import EsptoolFlasher, load_firmware
from station.parts import Region
from station.ports import NativeUsb
from station.sim import Faults, PluggedBoard, Rig
from tests.eventlog import event_log
from tests.test_multichip import write_config as multichip_config
from tests.test_station import Line, load_config

pytestmark = pytest.mark.timeout(300)

JTAG_CHIPS = ("esp32s3", "esp32c3", "esp32c6", "esp32h2")
OTG_CHIPS = ("esp32s3", "esp32s2")
QUIET = 60.0
"""Issue #9: 60 s after the last done, the ledger still has one job per board."""


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fw")
    return {chip: make_demo_firmware(root / chip, chip=chip, app_size=400_000, seed=i)
            for i, chip in enumerate(dict.fromkeys(JTAG_CHIPS + OTG_CHIPS))}


def write_config(root: Path, builds: dict[str, Path], window: float = 5.0) -> Path:
    return multichip_config(root, builds, name="native-line",
                            ports=f"reenumerate_window = {window}\n")


async def serve_as_native(config: Config, native: NativeUsb, what: str,
                          done: Callable[[], bool], timeout: float = 120) -> None:
    """The real station in this process, its ports answering sysfs's question "native
    USB?" with `native` (a pty cannot), until `done()`; then a clean stop."""
    async with assemble(config, Options()) as built:
        built.station.flasher = EsptoolFlasher(
            baud=921600, chips=tuple(built.station.plans.by_chip), native=lambda _port: native)
        serving = asyncio.create_task(built.station.serve())
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
            await asyncio.sleep(0.05)  # polling interval of a deadline-bound wait
        built.station.stop()
        assert await serving == 0


@pytest.fixture
def line(tmp_path: Path, builds: dict[str, Path]) -> Iterator[Line]:
    rig = Rig(tmp_path / "rig", seed=33, throttle=False, flash_timing=False,
              reenumerate_gap=(0.2, 2.0))
    config = write_config(tmp_path, builds)
    line = Line(root=tmp_path, rig=rig, config=config,
                bundle=load_firmware(load_config(config).firmware))
    yield line
    if line.proc is not None and line.proc.poll() is None:
        line.proc.kill()
        line.proc.wait(timeout=10)
    rig.close()


def finished(line: Line) -> list[dict[str, Any]]:
    return [e for e in line.events() if e["kind"] == "JobFinished"]


def started(line: Line) -> list[dict[str, Any]]:
    return [e for e in line.events() if e["kind"] == "JobStarted"]


def stop(line: Line) -> None:
    assert line.proc is not None
    line.proc.send_signal(signal.SIGTERM)
    assert line.wait() == 0, line.output()[-3000:]


@pytest.mark.parallel
@pytest.mark.long(cpu=True)
def test_sixteen_native_usb_boards_reenumerate_and_are_done_once(line: Line) -> None:
    line.start()
    boards = [line.rig.plug(chip=JTAG_CHIPS[i % 4], usb="jtag", index=i) for i in range(12)]
    boards += [line.rig.plug(chip=OTG_CHIPS[i % 2], usb="otg", index=12 + i) for i in range(4)]
    line.until("16 boards done", lambda: len(finished(line)) >= 16, timeout=180)
    last_done = time.monotonic()
    line.until("every board back from its reset",
               lambda: all(line.rig.reenumerations(b) >= 1 for b in boards), timeout=30)

    def quiet() -> bool:  # the whole wait: no 17th job, ever
        assert len(started(line)) == 16, started(line)[16:]
        return time.monotonic() - last_done >= QUIET

    line.until(f"{QUIET:g} s of quiet after the last done", quiet, timeout=QUIET + 30)
    stop(line)
    jobs = line.jobs()
    assert len(jobs) == 16, jobs
    assert sorted(j["mac"] for j in jobs) == sorted(b.mac.replace(":", "") for b in boards)
    assert [j["result"] for j in jobs] == ["done"] * 16
    for board in boards:
        assert line.rig.reset_count(board) == 1, (board, line.rig.resets(board))
    assert "same board, no new job" in (line.state / "station.log").read_text()


def test_a_native_board_pulled_during_its_flash_gets_a_second_job(line: Line) -> None:
    line.start()
    pulled = line.rig.plug(chip="esp32s3", usb="jtag", index=0,
                           faults=Faults(unplug_after=150_000))
    other = line.rig.plug(chip="esp32c3", usb="jtag", index=1)
    line.until("the pull to be seen",
               lambda: any(e["result"] == "removed" for e in finished(line)))
    replugged: list[PluggedBoard] = []

    def replug() -> bool:  # the rig frees the MAC once the pulled board's flash is dumped,
        with contextlib.suppress(ValueError):  # a moment after the station sees it vanish
            replugged.append(line.rig.plug(chip="esp32s3", usb="jtag", index=0,
                                           mac=pulled.mac))
        return bool(replugged)

    line.until("the pulled board plugged again", replug)
    again = replugged[0]
    line.until("both boards done",
               lambda: sum(e["result"] == "done" for e in finished(line)) == 2, timeout=120)
    line.until("the re-plugged board back from its reset",
               lambda: line.rig.reenumerations(again) >= 1 and line.rig.reenumerations(other) >= 1)
    line.until("the station to see it back",
               lambda: (line.state / "station.log").read_text().count("same board") >= 2)
    stop(line)
    jobs = line.jobs()
    mine = [j for j in jobs if j["mac"] == pulled.mac.replace(":", "")]
    assert [(j["result"], j["failed_stage"]) for j in mine] == [("removed", "flash"),
                                                                ("done", None)]
    assert len(jobs) == 3
    flash = line.rig.flash(again)
    section = next(f for f in load_config(line.config).firmwares if f.chip == "esp32s3")
    bundle = load_firmware(section)
    region: Region
    for region in bundle.regions:
        assert flash[region.offset:region.end] == region.data, region.name
    assert line.rig.reset_count(again) == 1


@pytest.mark.parametrize(("chip", "kinds"), [
    ("esp32s3", ["watchdog"]),  # esptool's watchdog reset: RTC WDT registers via the stub
    ("esp32c6", ["host-close"]),  # no watchdog reset in esptool: its hard reset instead
])
def test_a_native_usb_port_is_reset_by_esptools_watchdog_where_the_chip_has_one(
        tmp_path: Path, chip: str, kinds: list[str]) -> None:
    # sysfs cannot say a pty is 303a:1001, so the lookup is handed the answer a real
    # USB-Serial/JTAG port gives; the rest is the real esptool on the virtual board.
    jtag = NativeUsb(kind="jtag", vid=0x303A, pid=0x1001, serial_number=None)
    region = Region.build("app", 0x10000, bytes(range(256)) * 64)
    with Rig(tmp_path / "rig", seed=5, throttle=False, flash_timing=False,
             reenumerate_gap=0.2) as rig:
        board = rig.plug(chip=chip, usb="jtag")

        async def flash_and_reset() -> None:
            flasher = EsptoolFlasher(baud=921600, chips=(chip,), native=lambda _port: jtag)
            session = await flasher.open(board.port)
            await session.write(region, lambda _done, _total: None)
            await session.verify(region)
            await session.reset()

        asyncio.run(flash_and_reset())
        deadline = time.monotonic() + 10
        while rig.reenumerations(board) < 1:
            assert time.monotonic() < deadline, "the board did not re-enumerate"
            time.sleep(0.05)  # polling interval of a deadline-bound wait
        assert rig.resets(board) == kinds
        assert rig.flash(board)[region.offset:region.end] == region.data


def test_a_done_board_plugged_again_after_the_window_is_skipped_without_a_reset(
        line: Line) -> None:
    text = line.config.read_text()  # a short window: this test waits it out
    line.config.write_text(text.replace("reenumerate_window = 5.0", "reenumerate_window = 1.0"))
    line.start()
    board = line.rig.plug(chip="esp32c3", usb="jtag", index=0, reenumerate_gap=0.2)
    line.until("the board done", lambda: [e["result"] for e in finished(line)] == ["done"])
    done_at = time.monotonic()
    line.until("it is back from its reset", lambda: line.rig.reenumerations(board) >= 1)
    # past the window, a pull and a plug is a re-plug: a new job, which finds it done
    line.until("the window to pass", lambda: time.monotonic() - done_at > 1.5, timeout=30)
    log = line.state / "station.log"
    removals = log.read_text().count(f"port removed: {board.port}")
    line.rig.unplug(board)
    # a link re-made onto a reused pty could look unchanged: see the pull first
    line.until("the pull to be seen",
               lambda: log.read_text().count(f"port removed: {board.port}") > removals)
    again = line.rig.plug(chip="esp32c3", usb="jtag", index=0, mac=board.mac,
                          reenumerate_gap=0.2)
    line.until("the second job", lambda: len(finished(line)) == 2)
    stop(line)
    assert [j["result"] for j in line.jobs()] == ["done", "skipped"]
    assert line.rig.reset_count(again) == 0  # never reset again: no re-enumeration loop
    assert line.rig.reenumerations(again) == 0


def test_a_done_board_known_by_its_usb_serial_number_is_skipped_without_a_connect(
        tmp_path: Path, builds: dict[str, Path]) -> None:
    # In process, to stand in for sysfs: a real USB-Serial/JTAG port reports the chip's
    # MAC as its serial number; a pty reports nothing. The rest is the real station.
    config = load_config(write_config(tmp_path, builds, window=0.5))
    with Rig(tmp_path / "rig", seed=8, throttle=False, flash_timing=False,
             reenumerate_gap=0.2) as rig:
        board = rig.plug(chip="esp32c3", usb="jtag", index=0)
        mac = board.mac.replace(":", "")
        events = tmp_path / "state" / "events.jsonl"

        def logged(kind: str) -> list[dict[str, Any]]:
            return event_log(events, kind)

        async def until(what: str, check: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 60
            while not check():
                assert time.monotonic() < deadline, f"no {what}"
                await asyncio.sleep(0.05)  # polling interval of a deadline-bound wait

        async def run() -> PluggedBoard:
            async with assemble(config, Options()) as built:
                built.station.port_mac = lambda _port: mac
                serving = asyncio.create_task(built.station.serve())
                await until("done", lambda: len(logged("JobFinished")) == 1)
                await until("re-enumeration", lambda: rig.reenumerations(board) >= 1)
                await asyncio.sleep(1.0)  # past the 0.5 s window: the next plug is a re-plug
                rig.unplug(board)
                # the station's own port table: a link re-made onto a reused pty could
                # look unchanged if the station had not seen it gone
                await until("the station to see the pull",
                            lambda: board.port not in built.station._jobs)
                again = rig.plug(chip="esp32c3", usb="jtag", index=0, mac=board.mac)
                await until("the second job", lambda: len(logged("JobFinished")) == 2)
                built.station.stop()
                assert await serving == 0
                return again

        again = asyncio.run(run())
        first, second = logged("JobFinished")
        assert (first["result"], second["result"]) == ("done", "skipped")
        stages = [e["stage"] for e in logged("StageChanged") if e["job_id"] == second["job_id"]]
        assert stages == ["identify"]  # never connected
        (ident,) = [e for e in logged("Identified") if e["job_id"] == second["job_id"]]
        assert (ident["mac"], ident["chip"]) == (mac, "esp32c3")
        assert rig.board(again).sessions == 0  # the port was never opened
        assert rig.resets(again) == []


def test_boards_that_vanish_during_their_watchdog_reset_are_done_once(
        tmp_path: Path, builds: dict[str, Path]) -> None:
    # In process, to stand in for sysfs: these ports are 303a:1001, so the station resets
    # them with esptool's watchdog reset and the board drops off the bus while the reset
    # stage still runs (esptool waits 0.5 s after arming the watchdog).
    jtag = NativeUsb(kind="jtag", vid=0x303A, pid=0x1001, serial_number=None)
    config = load_config(write_config(tmp_path, builds))
    gone: dict[str, float] = {}  # port -> wall time it dropped off the bus

    def seen(event: dict[str, Any]) -> None:
        if event["event"] == "disconnected":
            gone.setdefault(event["port"], time.time())

    events = tmp_path / "state" / "events.jsonl"

    def finished_jobs() -> list[dict[str, Any]]:
        return event_log(events, "JobFinished")

    with Rig(tmp_path / "rig", seed=12, throttle=False, flash_timing=False,
             reenumerate_gap=(0.2, 0.6), on_event=seen) as rig:
        boards = [rig.plug(chip="esp32s3", usb="jtag", index=i) for i in range(4)]

        asyncio.run(serve_as_native(config, jtag, "boards done and back", lambda: (
            len(finished_jobs()) == 4 and all(rig.reenumerations(b) >= 1 for b in boards))))
        jobs = finished_jobs()
        assert sorted(j["result"] for j in jobs) == ["done"] * 4, jobs
        for job in jobs:  # the port went while the job was still in its reset stage
            assert gone[job["port"]] < job["at"], job
        for board in boards:
            assert rig.resets(board) == ["watchdog"]


def test_the_boot_check_is_skipped_on_native_usb_and_says_why(
        tmp_path: Path, builds: dict[str, Path]) -> None:
    # In process, to stand in for sysfs (these ports are 303a:1001). The chip's own USB
    # leaves the bus when it restarts: the story is not on the port, and a board whose
    # flash verified must not fail for that.
    jtag = NativeUsb(kind="jtag", vid=0x303A, pid=0x1001, serial_number=None)
    config_path = write_config(tmp_path, builds)
    config_path.write_text(config_path.read_text() + '[verify]\nboot = "app"\n')
    config = load_config(config_path)
    events = tmp_path / "state" / "events.jsonl"

    def logged(kind: str) -> list[dict[str, Any]]:
        return event_log(events, kind)

    with Rig(tmp_path / "rig", seed=13, throttle=False, flash_timing=False,
             reenumerate_gap=0.2) as rig:
        boards = [rig.plug(chip="esp32s3", usb="jtag", index=i) for i in range(2)]

        asyncio.run(serve_as_native(config, jtag, "boards done",
                                    lambda: len(logged("JobFinished")) == len(boards)))
    assert [j["result"] for j in logged("JobFinished")] == ["done", "done"]
    checks = logged("BootChecked")
    assert [c["result"] for c in checks] == ["skipped", "skipped"], checks
    assert all("native USB" in c["detail"] for c in checks), checks
