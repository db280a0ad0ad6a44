"""Slot health end to end: a slot whose boards never answer, on the live dashboard.

`station run` (a real subprocess) draws its live table in a real terminal: a tmux pane
of its own server (`-L`, so no other tmux is touched). An operator (tests/linekit.py)
keeps 16 virtual boards going; every board in hub port 5 (slot A6) is mute, so it fails
at connect. With `park_unhealthy`, after 3 such boards the slot is flagged and parked:
the row and the footer say so, the next board in A6 waits while the other 15 slots keep
flashing, a key on the dashboard clears it, and once flagged again, so does
`station slot clear A6` from another process.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from station.demo import make_demo_firmware
from station.sim import Faults, Rig
from tests.linekit import Operator, sixteen_slots
from tests.tmuxkit import Tmux

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MUTE_HUB = 5
SLOT = "A6"
WAIT = 120.0
HINT = "fails at connect: check the cable or the hub port"


def ledger_rows(state: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    path = state / "ledger.sqlite3"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(query, params).fetchall()
    except sqlite3.OperationalError:  # tables not made yet
        return []
    finally:
        conn.close()


def flags(state: Path) -> list[tuple[Any, ...]]:
    return ledger_rows(state, "SELECT slot, stage, reason, flagged_at, cleared_at, cleared_by "
                              "FROM slot_flags ORDER BY rowid")


def jobs_since(state: Path, at: float) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for slot, result in ledger_rows(state, "SELECT slot, result FROM jobs WHERE started_at > ? "
                                           "ORDER BY started_at", at):
        out.setdefault(slot, []).append(result)
    return out


@pytest.mark.long
def test_a_slot_that_keeps_failing_is_flagged_parked_and_cleared(
        tmp_path: Path, tmux: Tmux) -> None:
    firmware = make_demo_firmware(tmp_path / "fw", chip="esp32", app_size=64_000)
    rig_dir, state = tmp_path / "rig", tmp_path / "state"
    slots = sixteen_slots()
    config = tmp_path / "station.toml"
    config.write_text(f"""\
[station]
name = "line-7"
state_dir = "state"
[ports]
watch = ["{rig_dir}/pci-*"]
rescan_interval = 0.2
reenumerate_window = 0  # boards swapped right after done on ptys (no VID:PID): new boards
park_unhealthy = true
[ports.health]
consecutive = 3
[ports.slots]
{slots}
[firmware]
chip = "esp32"
flasher_args = "{firmware}"
[worker]
retries = 0
""")
    with Rig(rig_dir, seed=9, throttle=False, flash_timing=False) as rig:
        tmux.start([sys.executable, "-m", "station", "run", "--config", str(config)], tmp_path)
        operator = Operator(rig, state, faults=lambda i, _n: Faults(mute=i == MUTE_HUB))
        operator.start()
        alive = lambda: not tmux.dead()  # noqa: E731

        # 1. three mute boards in a row: A6 flagged and parked
        operator.run_until("A6 to be flagged", lambda: len(flags(state)) == 1, WAIT, alive)
        [(slot, stage, reason, flagged_at, cleared_at, _)] = flags(state)
        assert (slot, stage, reason, cleared_at) == (SLOT, "connect", "3 in a row", None)
        # 2. the other 15 slots keep flashing; the next board in A6 waits
        operator.run_until(
            "two more boards done in every other slot",
            lambda: all(jobs_since(state, flagged_at).get(s, []).count("done") >= 2
                        for s in [f"{r}{c}" for r in "AB" for c in range(1, 9)] if s != SLOT)
            and operator.hubs[MUTE_HUB].plugged == 4, WAIT, alive)
        assert SLOT not in jobs_since(state, flagged_at)  # plugged, and not started
        screen = tmux.screen()
        [row] = [line for line in screen if line.strip().startswith(f"{SLOT} !")]
        assert f"PARKED: {HINT} (3 in a row)" in row, "\n".join(screen)
        footer = [line for line in screen if line.startswith("! slot")]
        assert footer == [f"! slot {SLOT} PARKED: {HINT} (3 in a row)  |  press c to clear "
                          f"it, or station slot clear {SLOT}"], "\n".join(screen)
        print("\n".join(["", "the dashboard with A6 parked:", *screen]))
        keep = os.environ.get("STATION_ARTIFACTS")  # pytest prunes old tmp dirs
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / "dashboard-parked.txt").write_text("\n".join(screen) + "\n")

        # 3. the dashboard's key clears it: the waiting board is taken at once
        tmux("send-keys", "-t", "line", "c")
        operator.run_until("the key to clear A6",
                           lambda: flags(state)[0][4] is not None, WAIT, alive)
        assert flags(state)[0][5] == "dashboard"
        operator.run_until("the waiting board to start in A6",
                           lambda: SLOT in jobs_since(state, flagged_at), WAIT, alive)
        operator.run_until("the dashboard to drop the flag", lambda: not any(
            line.startswith("! slot") for line in tmux.screen()), WAIT, alive)

        # 4. three more mute boards: flagged again; `station slot clear` from another
        # process (the station holds the state dir) unparks it
        operator.run_until("A6 to be flagged again", lambda: len(flags(state)) == 2, WAIT,
                           alive)
        listed = subprocess.run([sys.executable, "-m", "station", "slot", "list", "--config",
                                 str(config)], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and listed.stdout.startswith(f"{SLOT}  parked since")
        wrong = subprocess.run([sys.executable, "-m", "station", "slot", "clear", "B9",
                                "--config", str(config)], capture_output=True, text=True,
                               timeout=60)
        assert wrong.returncode == 2
        assert wrong.stderr == f"station: slot clear: slot 'B9' is not flagged (flagged: {SLOT})\n"
        cleared = subprocess.run([sys.executable, "-m", "station", "slot", "clear", SLOT,
                                  "--config", str(config)], capture_output=True, text=True,
                                 timeout=60)
        assert cleared.returncode == 0, cleared.stderr
        again_at = flags(state)[1][3]
        operator.run_until("a board to start in A6 after the CLI's clear",
                           lambda: SLOT in jobs_since(state, again_at), WAIT, alive)
        assert flags(state)[1][5] == "cli"

        operator.holding = set(operator.hubs)  # the operator stops
        tmux.stop(WAIT)

    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    kinds = [(e["kind"], e.get("by")) for e in events if e["kind"].startswith("Slot")]
    assert kinds == [("SlotFlagged", None), ("SlotCleared", "dashboard"),
                     ("SlotFlagged", None), ("SlotCleared", "cli")]
    flagged = [e for e in events if e["kind"] == "SlotFlagged"]
    assert all(e["slot"] == SLOT and e["hint"] == HINT and e["parked"] for e in flagged)
