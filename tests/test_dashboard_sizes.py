"""The live dashboard in the terminals a line really has: 80x24, 100x30, 160x48 (issue 24).

`station run` (a real subprocess) draws its table in a tmux pane of each size while 16
virtual boards (esp32 and esp32s3, a long thing name, the boot check after the reset)
go through it; the test reads the pane as an operator would, many times a second, from
the first row to the last board done. On every screen, every row's stage and chip are
whole (never `fl…`, `esp3…`), the MAC / thing keeps the MAC's last digits, a flashing
row shows its bar and percent, and the footer's counts, rate and uptime are whole; once
boards are done the footer gives boards/h as a number, and each done row says what its
board booted, whole. At 160 columns nothing gives way; narrower, the port goes first
(station/screen/dashboard.py, GIVE_WAY).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from station.demo import make_demo_firmware
from station.events import Stage
from station.sim import PluggedBoard, Rig, by_path_name
from station.sim.pty_lines import relay_env
from tests.test_multichip import write_config
from tests.tmuxkit import POLL, Tmux

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WAIT = 150.0
CHIPS = ("esp32", "esp32s3")
THING = "widget-pro-{mac}"  # 23 cells: longer than the column has at 80
APP_SIZE = 200_000  # a second or two on the line at 921600 baud: the bar is seen moving
COLUMNS = ("slot", "port", "chip", "MAC", "stage", "elapsed", "speed", "baud",
           "progress / result")
READ = ("slot", "chip", "MAC", "stage", "progress / result")  # left-justified: read by
# where their header starts; `elapsed` after `stage` is as wide as its header
STAGE = re.compile("(" + "|".join(s.value for s in Stage) + r")( #\d+)?")
BAR = re.compile(r"[━─]{10} +\d{1,3}%")
COUNTS = re.compile(r"done (\d+)  failed 0  removed 0  skipped 0  in progress \d+")
RATE = re.compile(r"\d+\.\d boards/h")
UP = re.compile(r"up (\d+\.\ds|\d+:\d\d(:\d\d)?)")


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dashboard-firmware")
    return {chip: make_demo_firmware(root / chip, chip=chip, app_size=APP_SIZE)
            for chip in CHIPS}


@dataclass
class Screen:
    """One capture of the pane, cut into the table's cells and the footer's items."""

    text: str
    header: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # slot -> column -> cell
    footer: list[str] = field(default_factory=list)


def read(lines: list[str]) -> Screen:
    screen = Screen("\n".join(lines))
    at = next((i for i, line in enumerate(lines) if line.lstrip().startswith("slot ")), None)
    if at is None:
        return screen  # not drawn yet
    head = lines[at]
    starts = {name: head.find(name) for name in COLUMNS if head.find(name) >= 0}
    cut = [name for name in READ if name not in starts]
    assert not cut, f"headers cut or gone: {cut}\n{screen.text}"
    screen.header = sorted(starts, key=starts.__getitem__)
    ends = dict(zip(screen.header, [starts[n] for n in screen.header[1:]] + [None],
                    strict=True))
    end = at + 2  # the header, its rule
    if not any(line.startswith("done ") for line in lines[end:]):
        return Screen(screen.text)  # caught mid-paint: the frame ends with its footer
    for line in lines[at + 2:]:
        if not line.strip() or line.startswith(("done ", "! slot")):
            break  # the footer
        slot = line[:ends["slot"]].strip()
        screen.rows[slot] = {name: line[starts[name]:ends[name]].strip() for name in READ}
        end += 1
    screen.footer = [item for line in lines[end:] if line.strip()
                     for item in line.split("  |  ")]
    return screen


def check(screen: Screen, boards: dict[str, PluggedBoard]) -> tuple[int, int]:
    """Everything an operator reads is whole; returns (done in the footer, rows seen
    flashing with their bar and percent)."""
    why = f"\n{screen.text}"
    flashing = 0
    for slot, cells in screen.rows.items():
        assert slot in boards, f"slot {slot!r}" + why
        board = boards[slot]
        mac = board.mac.replace(":", "")
        assert STAGE.fullmatch(cells["stage"]), f"{slot}: stage {cells['stage']!r}" + why
        if cells["stage"].split()[0] not in ("connect", "identify"):
            assert cells["chip"] == board.chip, f"{slot}: chip {cells['chip']!r}" + why
            name = cells["MAC"]
            full = THING.format(mac=mac)
            assert name == full or (name.endswith(mac[-7:]) and name.count("…") == 1
                                    and full.endswith(name.split("…")[1])), \
                f"{slot}: MAC / thing {name!r}" + why
        progress = cells["progress / result"]
        if progress[:1] in ("━", "─"):
            assert BAR.match(progress), f"{slot}: progress {progress!r}" + why
            flashing += 1
    if not screen.header:
        return 0, 0
    assert screen.footer, "no footer" + why
    counts = COUNTS.fullmatch(screen.footer[0])
    assert counts, f"footer counts {screen.footer[0]!r}" + why
    done = int(counts.group(1))
    rate = "a rate" if done else "- boards/h"
    assert any(RATE.fullmatch(i) if done else i == "- boards/h" for i in screen.footer), \
        f"footer: {rate} after {done} done: {screen.footer}" + why
    assert any(UP.fullmatch(i) for i in screen.footer), screen.footer
    assert "station line-7" in screen.footer and "registrar local-ca" in screen.footer, \
        screen.footer
    return done, flashing


@pytest.mark.parametrize("size", [(80, 24), (100, 30), (160, 48)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_dashboard_reads_whole_at_each_terminal_size(
        tmp_path: Path, tmux: Tmux, builds: dict[str, Path], size: tuple[int, int]) -> None:
    width, height = size
    # no [ports.slots]: slots are named by their USB location (`usb-0:1.10`), the widest
    # labels a line has that did not name its bench
    config = write_config(tmp_path, builds, name="line-7", thing=THING,
                          more='[verify]\nboot = "app"\n')
    lines = tmp_path / "pty-lines.sock"  # the boards' auto-reset: DTR/RTS over the ptys
    env = relay_env(lines, base={})
    with Rig(tmp_path / "rig", seed=24, throttle=True, flash_timing=False,
             pty_lines=lines) as rig:
        plugged = [rig.plug(chip=CHIPS[i % 2], index=i, en_cap_uf=1.0) for i in range(16)]
        boards = {by_path_name(i).split("-", 2)[2].removesuffix(":1.0-port0"): board
                  for i, board in enumerate(plugged)}
        assert "usb-0:1.16" in boards  # the slot names `station ports` gives them
        tmux.start([sys.executable, "-m", "station", "run", "--config", str(config)],
                   tmp_path, width=width, height=height, env=env)
        deadline = time.monotonic() + WAIT
        flashing = 0
        while True:
            screen = read(tmux.screen())
            done, seen = check(screen, boards)
            flashing += seen
            if done == 16 and all(r["stage"] == "done" for r in screen.rows.values()):
                break
            assert not tmux.dead(), "the station exited\n" + screen.text
            assert time.monotonic() < deadline, "timed out\n" + screen.text
            time.sleep(POLL)  # polling interval of a deadline-bound wait
        tmux.stop(WAIT)

    print(f"\nthe dashboard at {width}x{height}, 16 boards done:\n{screen.text}")
    assert flashing, "no screen showed a board flashing with its bar and percent"
    assert len(screen.rows) == 16, screen.text  # every slot on the screen, at 24 lines too
    for slot, cells in screen.rows.items():
        chip = boards[slot].chip
        assert cells["progress / result"] == f"booted station-demo-{chip} 1.0.0", \
            f"{slot}: {cells}\n{screen.text}"
    assert {"slot", "chip", "stage", "progress / result"} <= set(screen.header)
    if width >= 160:  # room for everything: nothing gave way
        assert screen.header == list(COLUMNS), screen.text
        assert all(c["MAC"] == THING.format(mac=b.mac.replace(":", ""))
                   for c, b in ((screen.rows[s], boards[s]) for s in boards)), screen.text
    else:  # the port path goes first
        assert "port" not in screen.header, screen.text
