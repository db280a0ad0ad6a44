"""The ledger on real SQLite files: what a morning check reads must be there, even after
SIGKILL; a corrupt or locked file is an error that names it and is never deleted."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from station.errors import LedgerError
from station.events import (
    BootChecked,
    CloudChecked,
    Event,
    Identified,
    JobFinished,
    JobStarted,
    Progress,
    Registered,
    RegistrationStep,
    RegistryStep,
    Retrying,
    Stage,
    StageChanged,
)
from station.record import EventLog, Ledger
from tests.ledgerkit import schema_1_ledger

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=30)
    return asyncio.run(bounded())


def job_events(job: str, slot: str, mac: str, result: Stage, *, fw: str = "fw1",
               error: str | None = None, failed: Stage | None = None,
               t0: float = 1_800_000_000.0) -> list[Event]:
    where: dict[str, Any] = {"job_id": job, "port": f"/dev/tty{slot}", "slot": slot}
    events: list[Event] = [
        JobStarted(**where, station="line-1", firmware_hash=fw, at=t0),
        StageChanged(**where, stage=Stage.CONNECT, at=t0 + 1),
        Identified(**where, chip="esp32", mac=mac, thing_name=f"dev-{mac}", at=t0 + 2),
        StageChanged(**where, stage=Stage.FLASH, at=t0 + 3),
        Progress(**where, region="app", done=10, total=20, at=t0 + 4),
    ]
    if failed == Stage.CONNECT:
        events = events[:2] + [Retrying(**where, stage=Stage.CONNECT, attempt=2,
                                        reason="no answer", at=t0 + 2)]
    events.append(JobFinished(**where, result=result, error=error, failed_stage=failed,
                              timings={"flash": 12.5}, at=t0 + 20))
    return events


async def record_all(ledger: Ledger, events: list[Event]) -> None:
    for event in events:
        await ledger.record(event)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger.open(tmp_path / "state")
    yield led
    led.close()


def three_jobs(ledger: Ledger) -> None:
    run(record_all(ledger, [
        *job_events("j1", "A1", "240ac4000001", Stage.DONE),
        *job_events("j2", "A2", "240ac4000002", Stage.FAILED, error="board does not answer",
                    failed=Stage.CONNECT, t0=1_800_000_100.0),
        *job_events("j3", "A3", "240ac4000003", Stage.REMOVED, failed=Stage.FLASH,
                    t0=1_800_000_200.0),
    ]))


def test_three_jobs_become_rows_with_their_results(ledger: Ledger) -> None:
    three_jobs(ledger)
    jobs = {j["job_id"]: j for j in ledger.jobs()}
    assert [j["job_id"] for j in ledger.jobs()] == ["j1", "j2", "j3"]
    assert jobs["j1"]["result"] == "done" and jobs["j1"]["mac"] == "240ac4000001"
    assert jobs["j1"]["chip"] == "esp32" and jobs["j1"]["thing_name"] == "dev-240ac4000001"
    assert jobs["j1"]["timings"] == {"flash": 12.5} and jobs["j1"]["failed_stage"] is None
    assert jobs["j2"]["result"] == "failed" and jobs["j2"]["failed_stage"] == "connect"
    assert jobs["j2"]["error"] == "board does not answer" and jobs["j2"]["mac"] is None
    assert jobs["j3"]["result"] == "removed" and jobs["j3"]["failed_stage"] == "flash"
    assert jobs["j1"]["finished_at"] - jobs["j1"]["started_at"] == 20
    assert ledger.summary() == {"done": 1, "failed": 1, "removed": 1, "skipped": 0,
                                "in_progress": 0, "total": 3}
    assert [j["job_id"] for j in ledger.jobs(limit=2)] == ["j2", "j3"]
    kinds = [e["kind"] for e in ledger.events("j2")]
    assert kinds == ["JobStarted", "StageChanged", "Retrying", "JobFinished"]  # no Progress
    assert ledger.events("j2")[2]["detail"] == {"reason": "no answer"}


def test_done_with_needs_same_mac_same_firmware_and_done(ledger: Ledger) -> None:
    three_jobs(ledger)
    assert ledger.done_with("240ac4000001", "fw1")
    assert not ledger.done_with("240ac4000001", "fw2")
    assert not ledger.done_with("240ac4000003", "fw1")  # removed is not done
    assert run(ledger.done_with_async("240ac4000001", "fw1"))


def test_events_from_sixteen_workers_at_once_are_all_committed(ledger: Ledger) -> None:
    async def worker(k: int) -> None:
        await record_all(ledger, job_events(f"j{k}", f"A{k}", f"240ac40000{k:02x}",
                                            Stage.DONE))

    async def all_workers() -> None:
        await asyncio.gather(*(worker(k) for k in range(16)))

    run(all_workers())
    assert ledger.summary()["done"] == 16
    assert len(ledger.events("j15")) == 5


def test_registration_steps_round_trip(ledger: Ledger) -> None:
    where: dict[str, Any] = {"job_id": "j1", "port": "/dev/ttyUSB0", "slot": "A1"}
    steps = [
        RegistrationStep(**where, mac="240ac4000001", thing_name="dev-1", step="key-written",
                         at=1.0),
        RegistrationStep(**where, mac="240ac4000001", thing_name="dev-1", step="cert-created",
                         certificate_id="c0ffee", certificate_arn="arn:aws:iot:x:1:cert/c0ffee",
                         at=2.0),
        RegistrationStep(job_id="reconcile", port="", slot="", mac="240ac4000009",
                         thing_name="dev-9", step="cert-deleted", certificate_id="dead",
                         at=3.0),
    ]
    run(record_all(ledger, [JobStarted(**where, station="s", firmware_hash="f", at=0.5),
                            *steps,
                            Registered(**where, thing_name="dev-1", certificate_id="c0ffee",
                                       registrar="aws-iot", at=4.0)]))
    assert ledger.registration_steps() == steps
    assert run(ledger.registration_steps_async()) == steps
    job = ledger.jobs()[0]
    assert (job["certificate_id"], job["registrar"]) == ("c0ffee", "aws-iot")
    assert [j["job_id"] for j in ledger.jobs()] == ["j1"]  # reconcile makes no job row


CRASHER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from pathlib import Path
    from station.events import JobStarted, StageChanged, JobFinished, Stage
    from station.record import Ledger

    async def main() -> None:
        ledger = Ledger.open(Path(sys.argv[1]))
        w = dict(port="/dev/ttyUSB0", slot="A1")
        await ledger.record(JobStarted(job_id="ok", station="s", firmware_hash="f", **w))
        await ledger.record(JobFinished(job_id="ok", result=Stage.DONE, **w))
        await ledger.record(JobStarted(job_id="cut", station="s", firmware_hash="f", **w))
        await ledger.record(StageChanged(job_id="cut", stage=Stage.FLASH, **w))
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
""")


def test_sigkill_loses_nothing_committed_and_the_cut_job_is_closed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(state)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == "committed\n"
    with Ledger.open(state) as ledger:
        assert ledger.summary()["in_progress"] == 1
        assert ledger.close_interrupted("killed") == ["cut"]
        assert ledger.close_interrupted("killed") == []
        jobs = {j["job_id"]: j for j in ledger.jobs()}
        assert jobs["ok"]["result"] == "done"
        assert jobs["cut"]["result"] == "failed" and jobs["cut"]["failed_stage"] == "flash"
        assert jobs["cut"]["error"] == "station stopped during flash: killed"
        assert [e["kind"] for e in ledger.events("cut")] == [
            "JobStarted", "StageChanged", "Interrupted"]


def test_exports_show_what_a_user_checks(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # a wide terminal: cells unwrapped, as under xdist
    three_jobs(ledger)
    table = ledger.export("table")
    for text in ("240ac4000001", "done", "failed", "board does not answer", "at connect",
                 "removed", "2027-01-15T08:00:20Z"):
        assert text in table
    rows = list(csv.DictReader(io.StringIO(ledger.export("csv"))))
    assert [(r["mac"], r["result"]) for r in rows] == [
        ("240ac4000001", "done"), ("", "failed"), ("240ac4000003", "removed")]
    assert rows[1]["error"] == "board does not answer" and rows[0]["seconds"] == "20.0"
    data = json.loads(ledger.export("json"))
    assert data[1]["error"] == "board does not answer" and data[0]["mac"] == "240ac4000001"
    assert data[0]["started"] == "2027-01-15T08:00:00Z"


def test_corrupt_file_is_named_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    junk = b"this is not sqlite at all " * 200
    path.write_bytes(junk)
    with pytest.raises(LedgerError, match="corrupt") as info:
        Ledger.open(tmp_path)
    assert str(path) in str(info.value) and "move it aside" in str(info.value)
    assert path.read_bytes() == junk


def test_damaged_pages_are_reported_as_corrupt(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        run(record_all(ledger, [e for k in range(200) for e in job_events(
            f"j{k}", "A1", f"{k:012x}", Stage.DONE)]))
    path = tmp_path / "ledger.sqlite3"
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[4 * 4096:7 * 4096] = b"\xa5" * (3 * 4096)  # scribble over pages in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="corrupt|malformed") as info:
        Ledger.open(tmp_path)
    assert str(path) in str(info.value)


def test_locked_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("CREATE TABLE t (x)")
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(LedgerError, match="locked") as info:
            Ledger.open(tmp_path, busy_timeout=0.1)
        assert str(path) in str(info.value)
    finally:
        other.close()


def test_unusable_state_dir_is_an_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state directory should be")
    with pytest.raises(LedgerError, match="state directory"):
        Ledger.open(not_a_dir)


def test_closed_ledger_refuses_records(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path)
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        run(ledger.record(JobStarted(job_id="j", port="p", slot="s", station="s",
                                     firmware_hash="f")))


def test_event_log_writes_lines_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=2000, keep=3)

    async def write() -> None:
        for k in range(40):
            for event in job_events(f"j{k}", "A1", f"{k:012x}", Stage.DONE):
                await log.record(event)
            await log.record(Progress(job_id=f"j{k}", port="p", slot="A1", region="app",
                                      done=20, total=20))
        await log.close()

    run(write())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2", "events.jsonl.3"]
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl.1").read_text().splitlines()]
    kinds = {line["kind"] for line in lines}
    assert "Progress" in kinds and all(
        line["done"] == line["total"] for line in lines if line["kind"] == "Progress")
    finished = [line for line in lines if line["kind"] == "JobFinished"]
    assert finished and finished[0]["result"] == "done" and finished[0]["time"].endswith("Z")


def test_final_result_lands_even_without_its_job_started(ledger: Ledger) -> None:
    run(ledger.record(JobFinished(job_id="orphan", port="/dev/ttyUSB9", slot="C3",
                                  result=Stage.FAILED, failed_stage=Stage.CONNECT,
                                  error="no answer", at=5.0)))
    [job] = ledger.jobs()
    assert (job["job_id"], job["slot"], job["result"], job["error"]) == (
        "orphan", "C3", "failed", "no answer")


def test_a_reader_works_while_another_connection_holds_the_write_lock(tmp_path: Path) -> None:
    """`station ledger` during a run: opening an existing ledger and reading never write."""
    with Ledger.open(tmp_path) as station:
        three_jobs(station)
        writer = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            with Ledger.open(tmp_path, busy_timeout=0.1) as cli:
                assert "board does not answer" in cli.export("csv")
                assert cli.done_with("240ac4000001", "fw1")
            writer.execute("ROLLBACK")
        finally:
            writer.close()
        run(record_all(station, job_events("j4", "A4", "240ac4000004", Stage.DONE)))
        assert station.summary()["done"] == 2


def test_event_log_that_cannot_write_never_fails_a_board(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    (tmp_path / "events.jsonl").mkdir()  # a directory where the log file should be
    log = EventLog(tmp_path / "events.jsonl")

    async def write() -> None:
        for event in job_events("j1", "A1", "240ac4000001", Stage.DONE):
            await log.record(event)
        await log.close()

    with caplog.at_level("ERROR", logger="station.ledger"):
        run(write())
    assert len(caplog.records) == 1 and "cannot write the event log" in caplog.text


def test_a_schema_1_ledger_gains_the_boot_columns_and_records_a_boot(tmp_path: Path) -> None:
    schema_1_ledger(tmp_path, """
    INSERT INTO jobs (job_id, slot, result, started_at) VALUES ('old', 'A2', 'done', 1.0);
    INSERT INTO jobs (job_id, slot, started_at) VALUES ('new', 'A3', 2.0);
    """)
    with Ledger.open(tmp_path) as ledger:
        asyncio.run(ledger.record(BootChecked(
            job_id="new", port="/dev/ttyUSB3", slot="A3", result="ok", project="gadget",
            version="2.1.0", detail="", tail="I (310) app_init: App version:      2.1.0")))
        rows = {r["job_id"]: r for r in ledger.jobs()}
    assert [rows["old"][k] for k in ("result", "boot", "booted_version")] == ["done", None, None]
    assert (rows["new"]["boot"], rows["new"]["booted_project"], rows["new"]["booted_version"]) \
        == ("ok", "gadget", "2.1.0")
    assert "app_init: App version" in rows["new"]["boot_log"]


def test_a_schema_1_ledger_gains_the_registry_and_cloud_columns(tmp_path: Path) -> None:
    """Schema 5: the device registry's steps (reconcile reads them back), each job's
    registry outcome and id (an "already" answer keeps the id given before), and the
    cloud check's verdict; a reconcile's outcome lands on the interrupted job."""
    schema_1_ledger(tmp_path, """
    INSERT INTO jobs (job_id, slot, mac, thing_name, started_at)
        VALUES ('first', 'A1', '240ac4000001', 't1', 1.0);
    INSERT INTO jobs (job_id, slot, mac, thing_name, started_at)
        VALUES ('again', 'A1', '240ac4000001', 't1', 2.0);
    """)
    where = {"port": "/dev/ttyUSB1", "slot": "A1", "mac": "240ac4000001", "thing_name": "t1",
             "method": "POST", "url": "https://r/api/devices", "body": '{"device":{"id":"t1"}}'}
    with Ledger.open(tmp_path) as ledger:
        async def record() -> None:
            await ledger.record(RegistryStep(job_id="first", step="pending", **where))
            await ledger.record(RegistryStep(job_id="reconcile", step="registered",
                                             device_id="d-1", status=201, **where))
            await ledger.record(RegistryStep(job_id="again", step="pending", **where))
            await ledger.record(RegistryStep(job_id="again", step="already", status=422,
                                             **where))
            await ledger.record(CloudChecked(job_id="again", port="p", slot="A1",
                                             mode="publish", result="failed", broker="b:8883",
                                             client_id="t1", detail="Not authorized"))
        asyncio.run(record())
        rows = {r["job_id"]: r for r in ledger.jobs()}
        steps = ledger.registry_steps()
    assert set(rows) == {"first", "again"}, "a reconcile is not a job"
    assert (rows["first"]["registry"], rows["first"]["registry_id"]) == ("registered", "d-1")
    assert (rows["again"]["registry"], rows["again"]["registry_id"]) == ("already", "d-1")
    assert (rows["again"]["cloud"], rows["again"]["cloud_detail"]) == \
        ("failed", "Not authorized")
    assert [(s.job_id, s.step, s.body) for s in steps][0] == \
        ("first", "pending", '{"device":{"id":"t1"}}')
