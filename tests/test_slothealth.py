"""Slot health in parts: the rules on event sequences, the config keys, the flag on the
dashboard (rendered into a fixed-width Console) and in log lines, and the flags in a
real SQLite ledger (kept across a reopen, cleared from another connection, migrated
from a schema-1 ledger)."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console

from station.config import HealthSection, load
from station.errors import ConfigError
from station.events import JobFinished, JobStarted, SlotCleared, SlotFlagged, Stage
from station.health import SlotGuard, SlotHealth, slot_command
from station.record import SCHEMA_VERSION, Ledger
from station.screen import StationView, format_event, render
from tests.ledgerkit import schema_1_ledger

T0 = 1_800_000_000.0
RULES = HealthSection(consecutive=3, window=6, failures_in_window=4)


def end(slot: str, n: int, result: Stage, stage: Stage | None = None) -> JobFinished:
    return JobFinished(job_id=f"{slot}-{n}", port=f"/dev/ttyUSB{n}", slot=slot, result=result,
                       failed_stage=stage, error="x" if stage else None, at=T0 + n)


def feed(health: SlotHealth, *outcomes: Stage | tuple[Stage, Stage]) -> list[object]:
    out = []
    for n, o in enumerate(outcomes):
        result, stage = o if isinstance(o, tuple) else (o, None)
        out.append(health.observe(end("A3", n, result, stage)))
    return out


F_CONNECT = (Stage.FAILED, Stage.CONNECT)
F_VERIFY = (Stage.FAILED, Stage.VERIFY)
F_FLASH = (Stage.FAILED, Stage.FLASH)


def test_three_in_a_row_at_one_stage_flags_the_slot_with_the_stages_hint() -> None:
    health = SlotHealth(RULES, "line-1")
    *before, flag = feed(health, Stage.DONE, F_CONNECT, F_CONNECT, F_CONNECT)
    assert before == [None, None, None]
    assert isinstance(flag, SlotFlagged)
    assert (flag.slot, flag.stage, flag.reason, flag.job_id) == ("A3", Stage.CONNECT,
                                                                 "3 in a row", "A3-3")
    assert flag.hint == "fails at connect: check the cable or the hub port"
    assert health.flagged == {"A3": flag}
    assert health.observe(end("A3", 9, Stage.FAILED, Stage.CONNECT)) is None  # once
    assert not health.parked("A3")  # parking is off


def test_four_of_the_last_six_flags_and_mixed_stages_do_not() -> None:
    health = SlotHealth(RULES, "line-1")
    out = feed(health, F_VERIFY, Stage.DONE, F_VERIFY, F_VERIFY, Stage.DONE, F_VERIFY)
    assert isinstance(out[-1], SlotFlagged)
    assert out[-1].reason == "4 of the last 6"
    assert out[-1].hint == "fails at verify: check power: the hub's supply or the cable's " \
                           "voltage drop"
    mixed = SlotHealth(RULES, "line-1")
    assert feed(mixed, F_CONNECT, F_FLASH, F_VERIFY, F_CONNECT, F_FLASH, F_VERIFY) == \
        [None] * 6  # six failures, never the same stage enough: boards, not the slot


def test_removed_and_skipped_boards_say_nothing_about_the_slot() -> None:
    health = SlotHealth(RULES, "line-1")
    out = feed(health, F_CONNECT, (Stage.REMOVED, Stage.FLASH), F_CONNECT, Stage.SKIPPED,
               F_CONNECT)
    assert isinstance(out[-1], SlotFlagged) and out[-1].reason == "3 in a row"
    other = SlotHealth(RULES, "line-1")
    feed(other, F_CONNECT, F_CONNECT)
    assert other.observe(end("B1", 7, Stage.FAILED, Stage.CONNECT)) is None  # another slot


def test_a_flag_clears_itself_on_a_good_board_only_when_slots_are_not_parked() -> None:
    health = SlotHealth(RULES, "line-1")
    feed(health, F_CONNECT, F_CONNECT, F_CONNECT)
    cleared = health.observe(end("A3", 5, Stage.DONE))
    assert isinstance(cleared, SlotCleared) and cleared.by == "recovered"
    assert health.flagged == {}
    parked = SlotHealth(RULES, "line-1", park=True)
    feed(parked, F_CONNECT, F_CONNECT, F_CONNECT)
    assert parked.parked("A3") and not parked.parked("A4")
    assert parked.observe(end("A3", 5, Stage.DONE)) is None  # cannot happen, and no effect
    assert parked.parked("A3")
    by_hand = parked.clear("A3", by="dashboard", at=T0 + 9)
    assert isinstance(by_hand, SlotCleared) and by_hand.by == "dashboard"
    assert not parked.parked("A3")
    assert parked.clear("A3", by="cli", at=T0 + 10) is None
    # a clear is a clean slate: two more failures are not "5 in a row"
    assert feed(parked, F_CONNECT, F_CONNECT)[-1] is None


def test_zero_turns_a_rule_off() -> None:
    health = SlotHealth(HealthSection(consecutive=0, window=6, failures_in_window=0), "l")
    assert feed(health, *[F_CONNECT] * 8) == [None] * 8


def config_with(tmp_path: Path, ports: str) -> Path:
    (tmp_path / "app.bin").write_bytes(b"\xe9" + bytes(31))
    path = tmp_path / "station.toml"
    path.write_text(f'[ports]\n{ports}\n[firmware]\nchip = "esp32"\n'
                    'images = [{ offset = 0x10000, file = "app.bin" }]\n')
    return path


def test_config_keys_and_their_errors(tmp_path: Path) -> None:
    config = load(config_with(tmp_path, "park_unhealthy = true\n[ports.health]\n"
                                        "consecutive = 5\nwindow = 10\nfailures_in_window = 6"))
    assert config.ports.park_unhealthy
    assert config.ports.health == HealthSection(consecutive=5, window=10, failures_in_window=6)
    assert load(config_with(tmp_path, "")).ports.health == RULES
    for ports, message in (
            ("park_unhealthy = 1", "ports.park_unhealthy: must be bool, not int 1"),
            ("[ports.health]\nwindow = 3", "ports.health.failures_in_window: 4 failures "
                                           "cannot fit in a window of 3 boards"),
            ("[ports.health]\nconsecutiv = 3", "ports.health.consecutiv: unknown key"),
            ("[ports.health]\nconsecutive = -1", "ports.health.consecutive: must be at least 0")):
        with pytest.raises(ConfigError, match=message):
            load(config_with(tmp_path, ports))


def flag(slot: str = "A3", parked: bool = True, at: float = T0 + 5) -> SlotFlagged:
    return SlotFlagged(job_id=f"{slot}-2", port="/dev/ttyUSB3", slot=slot, at=at,
                       station="line-1", stage=Stage.CONNECT, reason="3 in a row",
                       hint="fails at connect: check the cable or the hub port", parked=parked)


def screen(view: StationView) -> list[str]:
    console = Console(width=160, color_system=None, force_terminal=True, record=True,
                      file=io.StringIO())
    console.print(render(view, T0 + 30))
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_the_dashboard_shows_the_flag_on_the_row_and_in_the_footer() -> None:
    view = StationView(station="line-1", started_at=T0)
    for slot in ("A3", "A4"):
        view.apply(JobStarted(job_id=f"{slot}-2", port="/dev/ttyUSB3", slot=slot,
                              station="line-1", firmware_hash="f", at=T0))
        view.apply(JobFinished(job_id=f"{slot}-2", port="/dev/ttyUSB3", slot=slot,
                               result=Stage.FAILED, failed_stage=Stage.CONNECT,
                               error="no answer", at=T0 + 4))
    view.apply(flag())
    view.clear_key = "c"
    lines = screen(view)
    [row] = [line for line in lines if line.strip().startswith("A3")]
    assert row.strip().startswith("A3 !")
    assert "PARKED: fails at connect: check the cable or the hub port (3 in a row)  at " \
           "connect: no answer" in row
    [other] = [line for line in lines if line.strip().startswith("A4")]
    assert "PARKED" not in other and "!" not in other
    assert lines[-3] == ("! slot A3 PARKED: fails at connect: check the cable or the hub "
                         "port (3 in a row)  |  press c to clear it, or station slot clear A3")
    assert lines[-2].startswith("done 0  failed 2")
    view.apply(flag("B1", at=T0 + 9))
    assert screen(view)[-3].endswith("station slot clear A3  |  also flagged: B1")
    view.apply(SlotCleared(job_id="", port="", slot="A3", station="line-1", by="cli"))
    view.clear_key = ""
    assert screen(view)[-3] == ("! slot B1 PARKED: fails at connect: check the cable or the "
                                "hub port (3 in a row)  |  station slot clear B1")
    view.apply(SlotCleared(job_id="", port="", slot="B1", station="line-1", by="cli"))
    assert screen(view)[-2].startswith("done 0")  # the footer as before: two lines
    assert not any("!" in line for line in screen(view))


def test_log_lines_of_flags() -> None:
    view = StationView()
    assert format_event(flag(), view) == (
        "2027-01-15T08:00:05Z A3 /dev/ttyUSB3 - slot flagged (3 in a row): fails at connect: "
        "check the cable or the hub port; parked until cleared (station slot clear A3)")
    cleared = SlotCleared(job_id="", port="", slot="A3", station="l", by="dashboard", at=T0)
    assert format_event(cleared, view) == "2027-01-15T08:00:00Z A3  - slot cleared (dashboard)"


def test_flags_live_in_the_ledger_across_a_restart_and_clear_from_another_process(
        tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        asyncio.run(ledger.record(flag()))
        asyncio.run(ledger.record(flag("B1", parked=False, at=T0 + 7)))
    with Ledger.open(tmp_path) as ledger:  # the next start
        assert [(f.slot, f.parked, f.reason) for f in ledger.open_flags()] == \
            [("A3", True, "3 in a row"), ("B1", False, "3 in a row")]
        with Ledger.open(tmp_path) as cli:  # `station slot clear` while the station runs
            out = io.StringIO()
            assert slot_command(cli, "clear", "A3", out) == 0
            assert out.getvalue() == "slot A3 cleared; a running station takes boards on it " \
                                     "again\n"
            assert slot_command(cli, "clear", "A3", out) == 2  # not flagged any more
        assert [f.slot for f in ledger.open_flags()] == ["B1"]
        [a3, b1] = ledger.flags()
        assert a3["cleared_by"] == "cli" and a3["cleared_at"] is not None
        assert b1["cleared_at"] is None
        asyncio.run(ledger.record(SlotCleared(job_id="", port="", slot="A3", station="l",
                                              by="cli")))  # the daemon's echo: no change
        assert ledger.flags()[0]["cleared_at"] == a3["cleared_at"]


def test_the_guard_restores_open_flags_and_unparks_slots_cleared_in_the_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("station.health.slotpark.POLL_INTERVAL", 0.02)
    with Ledger.open(tmp_path) as ledger:
        asyncio.run(ledger.record(flag()))

        async def scenario() -> tuple[list[str], list[object]]:
            shown: list[object] = []
            unparked: list[str] = []
            health = SlotHealth(RULES, "line-1", park=True)
            guard = SlotGuard(health, emit=ledger.record, open_flags=ledger.open_flags_async,
                              show=shown.append)
            guard.on_cleared.append(unparked.append)
            await guard.restore()
            assert guard.parked("A3")
            watch = asyncio.create_task(guard.watch())
            await asyncio.to_thread(ledger.clear_flag, "A3", "cli")  # as the CLI does
            async with asyncio.timeout(10):
                while not unparked:
                    await asyncio.sleep(0.02)  # polling interval of a bounded wait
            watch.cancel()
            assert not guard.parked("A3")
            return unparked, shown

        unparked, shown = asyncio.run(scenario())
        assert unparked == ["A3"] and [type(e).__name__ for e in shown] == ["SlotFlagged"]


def test_a_schema_1_ledger_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    schema_1_ledger(tmp_path, """
    INSERT INTO jobs (job_id, slot, result, started_at, finished_at)
        VALUES ('old', 'A1', 'done', 1.0, 2.0);
    """)
    with Ledger.open(tmp_path) as ledger:
        assert [j["job_id"] for j in ledger.jobs()] == ["old"]
        asyncio.run(ledger.record(flag()))
        assert [f.slot for f in ledger.open_flags()] == ["A3"]
    conn = sqlite3.connect(tmp_path / "ledger.sqlite3")
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()
