"""The report's parts on small real ledgers: time arguments, the hub layout of the slot
map, reasons, throttles and restarts as the ledger records them, a schema-1 ledger."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from pathlib import Path

import pytest

from station.events import JobFinished, JobStarted, Stage, Throttled
from station.record import FILENAME, Ledger
from station.report import SqliteLedgerSource, Window, make_report, parse_time
from station.report.charts import hub_layout
from station.report.stats import compute, reason_of

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def test_times_on_the_command_line() -> None:
    assert parse_time("2027-01-15T08:00") == T0
    assert parse_time("2027-01-15T09:00+01:00") == T0
    assert parse_time("2027-01-15") == T0 - 8 * 3600
    assert parse_time("12h", now=T0) == T0 - 12 * 3600
    assert parse_time("90m", now=T0) == T0 - 5400
    assert parse_time("2d", now=T0) == T0 - 2 * 86400
    with pytest.raises(argparse.ArgumentTypeError, match="'yesterday' is not a time"):
        parse_time("yesterday")


def test_the_slot_map_is_laid_out_like_the_hub() -> None:
    rack = [f"{r}{c}" for r in "AB" for c in range(1, 9)]
    cells = hub_layout(list(reversed(rack)))
    assert cells["A1"] == (0, 0) and cells["A8"] == (0, 7) and cells["B1"] == (1, 0)
    ports = [f"usb-0:1.{n}" for n in range(1, 17)]  # no labels: the USB locations
    cells = hub_layout(ports)
    assert cells["usb-0:1.1"] == (0, 0) and cells["usb-0:1.10"] == (1, 1)
    assert hub_layout(["ttyUSB0", "ttyACM0"]) == {"ttyACM0": (0, 0), "ttyUSB0": (1, 0)}
    assert hub_layout(["left", "right"]) == {"left": (0, 0), "right": (0, 1)}


def test_reasons_group_without_the_port() -> None:
    assert reason_of("/dev/serial/by-path/pci-0:1.3-port0: no answer\n (check it)") == \
        "no answer (check it)"
    assert reason_of(None) == "no reason given"
    assert len(reason_of("x" * 500)) == 120


def test_failures_group_by_reason_with_their_details_taken_out(tmp_path: Path) -> None:
    """One row per kind of failure, its count and one example (issue 24): the bytes a
    stray device sent, ports, MACs and numbers differ from board to board."""
    errors = [
        "/dev/ttyUSB0: something answers, but not an ESP bootloader (Failed to connect to "
        "ESP32: Invalid head of packet (0x61))",
        "/dev/ttyUSB1: something answers, but not an ESP bootloader (Failed to connect to "
        "ESP32: Invalid head of packet (0x59))",
        "rfc2217://10.0.0.5:4001: something answers, but not an ESP bootloader (Failed to "
        "connect to ESP32: Invalid head of packet (0x24))",
        "/dev/ttyUSB2: app at 0x10000: flash MD5 0123456789abcdef0123456789abcdef != image "
        "MD5 fedcba9876543210fedcba9876543210",
        "/dev/ttyUSB3: app at 0x10000: flash MD5 00112233445566778899aabbccddeeff != image "
        "MD5 fedcba9876543210fedcba9876543210",
        "board 24:0a:c4:12:34:56 is an esp32c2 but this station has firmware only for esp32",
    ]
    with Ledger.open(tmp_path) as ledger:
        for n, error in enumerate(errors):
            job(ledger, n, Stage.FAILED, T0 + n, Stage.CONNECT, error=error)
    stats = compute(SqliteLedgerSource(tmp_path / FILENAME), Window())
    rows = stats.failures_by_reason
    assert [(reason, count) for reason, count, _ in rows] == [
        ("something answers, but not an ESP bootloader (Failed to connect to ESP32: Invalid "
         "head of packet (0x…))", 3),
        ("app at 0x…: flash MD5 … != image MD5 …", 2),
        ("board … is an esp32c2 but this station has firmware only for esp32", 1)], rows
    assert rows[0][2] == " ".join(errors[0].split())  # the first one, as it was
    text = make_report(SqliteLedgerSource(tmp_path / FILENAME), Window(), "md", generated=T0)
    assert "| something answers, but not an ESP bootloader (Failed to connect to ESP32: " \
           "Invalid head of packet (0x…)) | 3 | /dev/ttyUSB0: something answers" in text


def job(ledger: Ledger, n: int, result: Stage, at: float, stage: Stage | None = None,
        error: str = "boom") -> None:
    where = {"job_id": f"j{n}", "port": f"/dev/ttyUSB{n % 4}", "slot": f"A{n % 4 + 1}"}
    asyncio.run(ledger.record(JobStarted(**where, station="line-1", firmware_hash="f", at=at)))
    asyncio.run(ledger.record(JobFinished(**where, result=result, failed_stage=stage,
                                          error=error if stage else None, at=at + 10,
                                          timings={"connect": 1.0, "flash": 8.0})))


def test_throttles_restarts_and_the_window(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        first = ledger.run_started("line-1", 100)  # killed: no stop recorded
        job(ledger, 0, Stage.DONE, T0)
        ledger.note(Throttled(job_id="j0", port="/dev/ttyUSB0", slot="A1", api="CreateThing",
                              at=T0 + 2))
        second = ledger.run_started("line-1", 101)
        job(ledger, 1, Stage.FAILED, T0 + 3600, Stage.CONNECT)
        ledger.run_stopped(second)  # SIGTERM, drained: a clean stop
        third = ledger.run_started("line-1", 102)
        ledger.run_stopped(third)
        job(ledger, 2, Stage.DONE, T0 + 7200)
        assert first == 1
    source = SqliteLedgerSource(tmp_path / FILENAME)
    whole = compute(source, Window())
    s = whole.summary
    assert (s.boards, s.done, s.failed, s.throttles) == (3, 2, 1, 1)
    assert (s.starts, s.restarts, s.unclean_restarts) == (3, 2, 1)
    assert s.yield_pct == pytest.approx(200 / 3)
    assert s.boards_per_hour == pytest.approx(2 * 3600 / 7210)
    # two hours: 5-minute bars, boards by when they ended
    assert whole.bucket_s == 300 and len(whole.timeline) == 25
    assert [t[1:] for t in whole.timeline if any(t[1:])] == [(1, 0, 0), (0, 1, 0), (1, 0, 0)]
    assert dict(whole.failures_by_stage) == {"connect": 1}
    # runs and jobs belong to the window they started in
    later = compute(source, Window(since=T0 + 1800))
    assert (later.summary.boards, later.summary.throttles) == (2, 0)
    assert compute(source, Window(station="line-2")).empty


def test_a_schema_1_ledger_reads_as_having_no_flags_or_runs(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE jobs (job_id TEXT PRIMARY KEY, station TEXT, port TEXT, slot TEXT,
            result TEXT, failed_stage TEXT, error TEXT, started_at REAL, finished_at REAL,
            timings TEXT);
        CREATE TABLE events (job_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
            stage TEXT, attempt INTEGER, detail TEXT);
        INSERT INTO jobs VALUES ('a', 's', '/dev/x', 'A1', 'done', NULL, NULL, 1.0, 5.0, NULL);
    """)
    conn.commit()
    conn.close()
    text = make_report(SqliteLedgerSource(path), Window(), "md", generated=T0)
    assert "| boards (distinct MACs) | 1 |" in text and "No slot was flagged." in text
    assert "| station restarts (after a crash or kill) | 0 (0) |" in text
    assert path.stat().st_size > 0 and not (tmp_path / "ledger.sqlite3-wal").exists()
