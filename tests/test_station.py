"""The daemon end to end: `station run` (a real subprocess) on virtual boards.

Real esptool over real ptys, a real local CA, real SQLite and real signals. Waits poll
the station's own outputs (its event log and headless lines) with deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from station.demo import make_demo_firmware
from station.flash import FirmwareBundle, load_firmware
from station.identity import read_nvs
from station.sim import Faults, PluggedBoard, Rig
from tests.eventlog import event_log

pytestmark = pytest.mark.timeout(300)

RUN_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=400_000)


@dataclass
class Line:
    """A station on a rig: the config, the running process and its outputs."""

    root: Path
    rig: Rig
    config: Path
    bundle: FirmwareBundle
    proc: subprocess.Popen[bytes] | None = None

    @property
    def state(self) -> Path:
        return self.root / "state"

    def start(self, *args: str, env: dict[str, str] | None = None) -> None:
        out = (self.root / "station.out").open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "station", "run", "--config", str(self.config),
                 "--headless", *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})})
        finally:
            out.close()

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            pytest.fail(f"station did not exit within {timeout}s:\n{self.output()[-3000:]}")

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        """`wait`, and no station left running whatever happens (a test stopped mid-wait
        must not leave it holding the rig's ports)."""
        try:
            return self.wait(timeout)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()

    def output(self) -> str:
        path = self.root / "station.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        return event_log(self.state / "events.jsonl")

    def until(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"station exited ({self.proc.returncode}) before {what}:\n"
                            f"{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}:\n"
                            f"{self.output()[-3000:]}")
            time.sleep(0.05)  # polling interval of a deadline-bound wait

    def stage_reached(self, port: str, stage: str) -> bool:
        return any(e.get("port") == port and e.get("stage") == stage for e in self.events())

    def jobs(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "station", "ledger", "--config", str(self.config),
             "--format", "json"], capture_output=True, check=True, timeout=60)
        jobs: list[dict[str, Any]] = json.loads(out.stdout)
        return jobs

    def assert_flashed(self, board: PluggedBoard, thing: str) -> None:
        """The board's flash holds every image at its offset and its own credentials."""
        flash = self.rig.flash(board)
        for region in self.bundle.regions:
            assert flash[region.offset:region.end] == region.data, region.name
        part = self.bundle.partition("nvs")
        values = read_nvs(flash[part.offset:part.offset + part.size])["station"]
        assert values["thing_name"] == thing
        cert = (self.root / "certs_out" / thing / "certificate.pem.crt").read_text()
        blob = values["cert"]
        assert isinstance(blob, bytes)
        assert blob.rstrip(b"\0").decode() == cert


def write_config(root: Path, firmware: Path, extra: str = "") -> Path:
    config = root / "station.toml"
    config.write_text(f"""\
[station]
name = "test-line"
state_dir = "state"
[ports]
watch = ["{root / 'rig' / 'pci-*'}"]
baud = 921600
rescan_interval = 0.2
[firmware]
chip = "esp32"
flasher_args = "{firmware}"
[identity]
thing_name = "t-{{mac}}"
[registrar]
kind = "local-ca"
[registrar.local_ca]
dir = "ca"
[credentials]
out_dir = "certs_out"
{extra}""")
    return config


@pytest.fixture
def make_line(tmp_path: Path, firmware: Path) -> Iterator[Callable[..., Line]]:
    lines: list[Line] = []

    def make(throttle: bool = False, extra: str = "") -> Line:
        rig = Rig(tmp_path / "rig", seed=len(lines) + 11, throttle=throttle,
                  flash_timing=throttle)
        config = write_config(tmp_path, firmware, extra)
        line = Line(root=tmp_path, rig=rig, config=config,
                    bundle=load_firmware(load_config(config).firmware))
        lines.append(line)
        return line

    yield make
    for line in lines:
        if line.proc is not None and line.proc.poll() is None:
            line.proc.kill()
            line.proc.wait(timeout=10)
        line.rig.close()


def load_config(path: Path) -> Any:
    from station.config import load

    return load(path)


def mac_hex(board: PluggedBoard) -> str:
    return board.mac.replace(":", "")


def test_sixteen_boards_plugged_at_staggered_times_are_all_flashed(
        make_line: Callable[..., Line]) -> None:
    line = make_line()
    line.start("--exit-after", "16")
    boards = []
    for wave in (range(0, 5), range(5, 11), range(11, 16)):
        plugged = [line.rig.plug(index=i) for i in wave]
        boards += plugged
        # The next wave comes once this one is being worked on: boards arrive mid-run.
        line.until("the wave to connect",
                   lambda p=plugged: all(line.stage_reached(b.port, "connect") for b in p))
    assert line.wait() == 0, line.output()[-3000:]
    jobs = line.jobs()
    assert [j["result"] for j in jobs] == ["done"] * 16
    assert {j["mac"] for j in jobs} == {mac_hex(b) for b in boards}
    for job in jobs:  # seconds per stage, for the operator and the benchmarks
        assert {"connect", "identify", "flash", "verify", "reset"} <= set(job["timings"])
        assert job["timings"]["flash"] > 0
        assert (job["credentials"], job["efuse_key_block"]) == ("nvs", None)  # the ledger's
    for board in boards:
        line.assert_flashed(board, f"t-{mac_hex(board)}")


def test_a_board_unplugged_mid_flash_is_removed_and_reflashed_when_plugged_again(
        make_line: Callable[..., Line]) -> None:
    line = make_line()
    line.start("--exit-after", "4")
    flaky = line.rig.plug(index=0, faults=Faults(unplug_after=150_000))
    others = [line.rig.plug(index=i) for i in (1, 2)]
    line.until("the unplug to be seen",
               lambda: any(e.get("result") == "removed" for e in line.events()))
    again = line.rig.plug(index=0, mac=flaky.mac)
    assert line.wait() == 3  # one of the four jobs ended removed
    jobs = line.jobs()
    mine = [j for j in jobs if j["mac"] == mac_hex(flaky)]
    assert [j["result"] for j in mine] == ["removed", "done"]
    assert mine[0]["failed_stage"] == "flash"
    assert sorted(j["result"] for j in jobs if j not in mine) == ["done", "done"]
    for board in [*others, again]:
        line.assert_flashed(board, f"t-{mac_hex(board)}")


def test_a_mute_board_fails_after_its_retries_and_is_not_retried_in_a_loop(
        make_line: Callable[..., Line]) -> None:
    line = make_line(extra="[worker]\nretries = 1\nretry_delay = 0.1\n")
    line.start()
    mute = line.rig.plug(index=0, faults=Faults(mute=True))
    good = line.rig.plug(index=1)

    def finished() -> list[dict[str, Any]]:
        return [e for e in line.events() if e.get("kind") == "JobFinished"]

    line.until("both boards to finish", lambda: len(finished()) == 2, timeout=120)
    # Watch ten rescans more: a failed board must stay failed on its slot.
    window = time.monotonic() + 10 * 0.2
    line.until("the observation window", lambda: time.monotonic() > window)
    line.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert line.wait() == 0
    started = [e for e in line.events() if e.get("kind") == "JobStarted"]
    assert [e["port"] for e in started].count(mute.port) == 1
    retries = [e for e in line.events() if e.get("kind") == "Retrying"]
    assert [e["port"] for e in retries] == [mute.port]
    results = {e["port"]: e for e in finished()}
    assert results[good.port]["result"] == "done"
    assert results[mute.port]["result"] == "failed"
    assert results[mute.port]["failed_stage"] == "connect"
    assert mute.port in results[mute.port]["error"]


def test_a_board_of_the_wrong_chip_fails_naming_both_chips(
        make_line: Callable[..., Line]) -> None:
    line = make_line()
    line.start("--exit-after", "1")
    line.rig.plug(index=0, chip="esp32s3")
    assert line.wait() == 3
    (job,) = line.jobs()
    assert job["result"] == "failed"
    assert "esp32s3" in job["error"] and "built for esp32" in job["error"]
    assert f"failed at {job['failed_stage']}" in line.output()


def test_sigterm_lets_boards_in_flight_finish_and_takes_no_new_board(
        make_line: Callable[..., Line]) -> None:
    line = make_line(throttle=True)
    line.start()
    first = [line.rig.plug(index=i) for i in (0, 1)]
    line.until("both boards to flash",
               lambda: all(line.stage_reached(b.port, "flash") for b in first), timeout=90)
    assert line.proc is not None
    line.proc.send_signal(signal.SIGTERM)
    line.until("the station to stop taking boards",
               lambda: "taking no new ones" in line.output())
    late = line.rig.plug(index=2)
    assert line.wait() == 0
    jobs = line.jobs()
    assert sorted(j["port"] for j in jobs) == sorted(b.port for b in first)
    assert [j["result"] for j in jobs] == ["done", "done"]
    assert late.port not in {e.get("port") for e in line.events()}


def test_a_board_with_too_little_flash_fails_before_anything_is_written(
        make_line: Callable[..., Line]) -> None:
    line = make_line()
    line.start("--exit-after", "1")
    small = line.rig.plug(index=0, flash_size="256KB")
    assert line.wait() == 3
    (job,) = line.jobs()
    assert job["result"] == "failed"
    assert "has 256 KB of flash" in job["error"]
    assert line.rig.flash(small) == b"\xff" * (256 << 10)
