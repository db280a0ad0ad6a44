"""The baud ladder through `station run`, real esptool and virtual bridge boards (issue #11).

A CP2102 clocks 921600 at most; driven at 2 Mbaud the virtual bridge garbles every byte
in both directions (station/sim/bridge.py), as the real one does. The station must step
down (2000000 -> 1500000 -> 921600), finish the board `done`, name the rates and reasons
in the ledger and the log, and start the slot's next board at the rate it stepped down
to. A CH340 (reliable to 460800) takes one step more: before the ladder, a bridge above
its rate failed the board at once. A bridge that carries the rate is never touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from station.daemon import EXIT_OK
from station.sim import Rig
from tests.eventlog import event_log
from tests.test_bad_inputs import RUN_TIMEOUT, Site

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def rig(site: Site) -> Iterator[Rig]:
    # throttle=False: the bridge still garbles above its rate; only the wire time goes
    with Rig(site.hub, seed=21, throttle=False, flash_timing=False) as r:
        yield r


def events(site: Site) -> list[dict[str, Any]]:
    return event_log(site.state / "events.jsonl")


def wait_for(proc: subprocess.Popen[bytes], what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"station exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)  # polling interval of a deadline-bound wait


def test_a_cp2102_at_2_mbaud_steps_down_finishes_and_its_slot_remembers(
        site: Site, rig: Rig) -> None:
    site.set("ports", "baud", 2_000_000)
    site.set("ports", "reenumerate_window", 0)  # the next board on the slot is a new one
    site.write()
    slow = rig.plug(chip="esp32", usb="bridge", bridge="cp2102", index=0)
    fast = rig.plug(chip="esp32", usb="bridge", bridge="cp2102n", index=1)
    ch340 = rig.plug(chip="esp32", usb="bridge", bridge="ch340", index=2)
    out = (site.root / "station.out").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "station", "run", "--headless",
                             "--exit-after", "4", "--config", str(site.config)],
                            cwd=site.root, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        def finished() -> list[dict[str, Any]]:
            return [e for e in events(site) if e["kind"] == "JobFinished"]

        wait_for(proc, "the first three boards", lambda: len(finished()) >= 3)
        rig.unplug(slow)
        # a new pty may reuse the old one's number (same node, same inode): an operator
        # plugs the next board after the station saw the last one go, not within its rescan
        wait_for(proc, "the station to see the unplug",
                 lambda: f"port removed: {slow.port}" in (site.state / "station.log").read_text())
        again = rig.plug(chip="esp32", usb="bridge", bridge="cp2102", index=0)
        assert proc.wait(timeout=RUN_TIMEOUT) == EXIT_OK, (site.root / "station.out").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        out.close()
    log = (site.root / "station.out").read_text()
    rows = site.ledger()
    first, second = [r for r in rows if r["port"] == slow.port]
    other = next(r for r in rows if r["port"] == fast.port)
    cheap = next(r for r in rows if r["port"] == ch340.port)
    assert [r["result"] for r in (first, second, other, cheap)] == ["done"] * 4, rows
    assert first["mac"] == slow.mac.replace(":", "") and second["mac"] == again.mac.replace(":", "")

    # the CP2102: two steps, each with its reason; ends at the bridge's 921600
    assert first["baud"] == 921600, first
    steps = first["baud_steps"].split("; ")
    assert [s.split(":")[0] for s in steps] == ["2000000->1500000", "1500000->921600"], steps
    assert all("no reply after the change to" in s and "baud (" in s for s in steps), steps
    assert "stepped down 2000000 -> 1500000 baud" in log and "-> 921600 baud" in log
    # its slot's next board starts at 921600: no step, and the row says why
    assert second["baud"] == 921600 and second["baud_steps"].startswith(
        "started at 921600: slot "), second
    # the CP2102N carries 2 Mbaud: untouched
    assert other["baud"] == 2_000_000 and other["baud_steps"] is None, other
    # the CH340 (460800 at most) goes one step further, and is done too
    assert cheap["baud"] == 460800 and cheap["baud_steps"].count("->") == 3, cheap
    # the sim saw it: the CP2102's second board was asked for 921600 only
    assert rig.board(again).baud_changes == [921600]


def test_auto_on_a_mixed_rig_loses_no_board(site: Site, rig: Rig) -> None:
    """CP2102, CP2102N and native USB-Serial/JTAG boards with `baud = "auto"`. A pty has
    no USB device, so every port is an unknown adapter to the station: `other` starts
    them at 3 Mbaud, the ladder finds the CP2102's rate, and a slot given its own rate
    ([ports.baud_by_port], by its label) gets exactly that."""
    site.set("ports", "baud", "auto")
    site.set("ports", "reenumerate_window", 5.0)
    site.set("ports.baud_by_adapter", "other", 3_000_000)
    boards = {"cp2102": rig.plug(chip="esp32", usb="bridge", bridge="cp2102", index=0),
              "cp2102n": rig.plug(chip="esp32", usb="bridge", bridge="cp2102n", index=1),
              "jtag": rig.plug(chip="esp32s3", usb="jtag", index=2),
              "capped": rig.plug(chip="esp32", usb="bridge", bridge="cp2102n", index=3)}
    site.sections.pop("firmware")
    site.write()
    site.config.write_text(site.config.read_text() + f"""
[ports.slots]
{json.dumps(boards["capped"].port)} = "C4"
[ports.baud_by_port]
C4 = 460800
[[firmware]]
chip = "esp32"
flasher_args = {json.dumps(str(site.firmware.esp32))}
[[firmware]]
chip = "esp32s3"
flasher_args = {json.dumps(str(site.firmware.esp32s3))}
""")
    proc = subprocess.run([sys.executable, "-m", "station", "run", "--headless",
                           "--exit-after", "4", "--config", str(site.config)],
                          cwd=site.root, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == EXIT_OK, proc.stdout[-3000:] + proc.stderr[-3000:]
    export = site.cli("ledger", "--format", "json", "--config", str(site.config),
                      config=False)  # (site.ledger() would write its own config back)
    rows = {r["port"]: r for r in json.loads(export.stdout)}
    got = {kind: (rows[b.port]["result"], rows[b.port]["baud"],
                  (rows[b.port]["baud_steps"] or "").count("->"))
           for kind, b in boards.items()}
    assert got == {"cp2102": ("done", 921_600, 3), "cp2102n": ("done", 3_000_000, 0),
                   "jtag": ("done", 3_000_000, 0), "capped": ("done", 460_800, 0)}, got
