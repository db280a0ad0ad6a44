"""`station report --central`: the night report of every station, from the central ledger.

Two real `station run` subprocesses on virtual rigs (unthrottled) ship to one real
PostgreSQL (tests/pgkit.py); line-a has a board that is not an ESP (its slot is flagged:
one failure is enough here), is restarted after `station slot clear`, and so has a
restart and a cleared flag to ship. The central report's figures are checked against plain
SQL on the two local ledgers combined, and `--station line-a` against line-a's own local
report. In process: a central ledger of schema 1 upgraded to 2 ships the flags and runs
its stations kept locally all along. And the one-line errors.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from station.demo import make_demo_firmware
from station.events import JobFinished, JobStarted, SlotFlagged, Stage, Throttled
from station.fleet import Replicator, central
from station.record import Ledger
from station.report import SqliteLedgerSource, Window, make_report
from station.report.central import CentralSource
from station.sim import Faults, Rig
from tests.centralkit import CentralLine, central_lines
from tests.pgkit import PASSWORD, Cluster, central_db, pg  # noqa: F401  (fixtures)
from tests.test_report import browse, parse

pytestmark = pytest.mark.timeout(300)

HEALTH = "[ports.health]\nconsecutive = 1\n"  # one failure flags the slot


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=64_000)


@pytest.fixture
def make_line(tmp_path: Path, firmware: Path, central_db: str,  # noqa: F811
              ) -> Iterator[Callable[..., CentralLine]]:
    with central_lines(tmp_path, firmware, central_db, first_seed=31) as make:
        yield make


def local(line: CentralLine, query: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{line.state / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def report(line: CentralLine, *args: str) -> subprocess.CompletedProcess[str]:
    return line.command("report", *args)


def without_header(md: str) -> str:
    """The Markdown report without its first lines (the source and when it was made)."""
    return md.split("\n", 3)[3]


def same_figures(central_md: str, local_md: str) -> None:
    """The two reports' tables, cell by cell; a number may differ in its last printed
    digit, since PostgreSQL keeps times to the microsecond and SQLite as a double."""
    theirs, ours = without_header(central_md).splitlines(), without_header(local_md).splitlines()
    assert len(theirs) == len(ours), (central_md, local_md)
    for there, here in zip(theirs, ours, strict=True):
        if there == here:
            continue
        cells = list(zip(there.split("|"), here.split("|"), strict=True))
        for a, b in cells:
            if a != b:
                assert abs(float(a) - float(b)) <= 0.1 + 1e-4 * abs(float(b)), (there, here)


def test_the_central_report_is_both_stations_local_ledgers(
        make_line: Callable[..., CentralLine], pg: Cluster) -> None:  # noqa: F811
    a = make_line("line-a", extra=HEALTH)
    b = make_line("line-b")
    a.start("--exit-after", "3")
    b.start("--exit-after", "2")
    first = [a.rig.plug(index=0), a.rig.plug(index=1),
             a.rig.plug(index=2, faults=Faults(garbage=True))]
    for i in range(2):
        b.rig.plug(index=i)
    assert a.wait() == 3, a.output()[-3000:]  # one of the three failed
    assert b.wait() == 0, b.output()[-3000:]
    [(slot,)] = local(a, "SELECT slot FROM slot_flags")
    cleared = a.command("slot", "clear", slot)
    assert cleared.returncode == 0, cleared.stderr
    for board in first:
        a.rig.unplug(board)
    a.start("--exit-after", "1")  # the restart ships the clean stop and the clearing
    a.rig.plug(index=3)
    assert a.wait() == 0, a.output()[-3000:]

    out = a.root / "r.html"
    made = report(a, "--central", "--out", str(out))
    assert made.returncode == 0, made.stderr
    page = parse(out.read_text())
    s = page.summary

    # the same figures, with plain SQL on the two local ledgers
    jobs = [row for line in (a, b) for row in local(
        line, "SELECT station, slot, result, failed_stage, started_at, finished_at FROM jobs")]
    results = Counter(j[2] for j in jobs)
    assert (results["done"], results["failed"], len(jobs)) == (5, 1, 6)
    assert (s["boards"], s["done"], s["failed"], s["removed"]) == \
        (str(len(jobs)), str(results["done"]), str(results["failed"]), "0")
    assert s["yield"] == f"{100 * 5 / 6:.1f}%"
    first_start = min(j[4] for j in jobs)
    last_end = max(j[5] for j in jobs)
    # to a tenth, give or take the microsecond PostgreSQL rounds times to
    assert float(s["boards_per_hour"]) == pytest.approx(5 * 3600 / (last_end - first_start),
                                                        abs=0.051)
    took = [j[5] - j[4] for j in jobs if j[2] == "done"]
    assert float(s["median_seconds"]) == pytest.approx(statistics.median(took), abs=0.051)
    runs = {line.name: local(line, "SELECT started_at, stopped_at FROM runs ORDER BY rowid")
            for line in (a, b)}
    assert [len(r) for r in runs.values()] == [2, 1]
    assert all(stopped is not None for r in runs.values() for _, stopped in r)
    assert s["restarts"] == "1 (0)"  # line-a's, after a clean stop
    # every clean stop is central too, the last ones included (shipped at the stop)
    assert pg.sql("SELECT station, count(*), count(stopped_at) FROM runs GROUP BY station "
                  "ORDER BY station", database=a.central.rsplit("/", 1)[-1]) == \
        [("line-a", 2, 2), ("line-b", 1, 1)]
    assert s["throttles"] == "0"
    per_slot = Counter((j[0], j[1]) for j in jobs)
    shown = {r[0]: int(r[1]) for r in page.tables["slots"]}
    assert shown == {f"{station}/{slot_}": n for (station, slot_), n in per_slot.items()}
    [flag] = page.tables["flags"]
    [(stage, cleared_by)] = local(a, "SELECT stage, cleared_by FROM slot_flags")
    assert flag[0] == f"line-a/{slot}" and flag[2] == stage
    assert flag[6].endswith(f"({cleared_by})")  # the clearing reached PostgreSQL too
    assert {r[0]: int(r[1]) for r in page.tables["failstage"]} == \
        dict(Counter(j[3] for j in jobs if j[2] == "failed"))
    assert "ledger central 127.0.0.1:" in out.read_text()
    shot = a.root / "central-report.png"  # what a person sees: kept beside the test's files
    taken = browse(out, f"--screenshot={shot}", "--window-size=1100,2600", "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 20_000, taken.stderr[-3000:]
    assert [line for line in taken.stderr.splitlines()
            if "CONSOLE" in line or "Failed to load" in line] == []

    md = report(b, "--central", "--format", "md", "--out", "-")
    assert md.returncode == 0, md.stderr
    assert "| boards done | 5 |" in md.stdout
    assert "| boards failed (never done) | 1 |" in md.stdout
    assert f"| line-a/{slot} |" in md.stdout

    # one station's central report is its local report
    for line in (a, b):
        mine = report(line, "--central", "--station", line.name, "--format", "md",
                      "--out", "-")
        own = report(line, "--format", "md", "--out", "-")
        assert mine.returncode == 0 and own.returncode == 0, mine.stderr + own.stderr
        same_figures(mine.stdout, own.stdout)
    since = report(a, "--central", "--since", "2099-01-01", "--format", "md", "--out", "-")
    assert "No boards in this window (from 2099-01-01 00:00 UTC)." in since.stdout


def test_an_empty_central_ledger_and_the_one_line_errors(
        tmp_path: Path, firmware: Path, central_db: str, pg: Cluster) -> None:  # noqa: F811
    rig = Rig(tmp_path / "rig", seed=3, throttle=False, flash_timing=False)
    try:
        line = CentralLine(root=tmp_path / "line", name="line-e", firmware=firmware,
                           central=central_db, rig=rig)
        empty = report(line, "--central", "--format", "md", "--out", "-")
        assert empty.returncode == 0, empty.stderr  # no station has shipped here yet
        assert "**No boards in this ledger yet.**" in empty.stdout
        assert "| boards (distinct MACs) | 0 |" in empty.stdout
        assert "| yield: boards done / (done + failed) | n/a |" in empty.stdout
        assert line.command("check").returncode == 0  # the schema, still no rows
        out = tmp_path / "empty.html"
        assert report(line, "--central", "--out", str(out)).returncode == 0
        assert "No boards in this ledger yet." in out.read_text()

        line.central = central_db.replace(f":{pg.port}/", ":1/")
        assert line.central != central_db
        line.write_config()
        target = tmp_path / "down.html"
        down = report(line, "--central", "--out", str(target))
        assert down.returncode == 2 and not target.exists()
        [text] = down.stderr.splitlines()
        assert text.startswith("station: central ledger: [ledger] central 127.0.0.1:1/"), text
        assert "cannot reach PostgreSQL" in text

        config = line.config
        config.write_text(config.read_text().replace(f"central = \"{line.central}\"", ""))
        unset = report(line, "--central")
        assert unset.returncode == 2
        assert unset.stderr.strip().splitlines() == [
            f"station: config error: {config}: ledger.central: not set: name the central "
            "PostgreSQL (postgresql://user@host/database) to read the fleet"]
    finally:
        rig.close()


# -- in process: schema 1 -> 2, and what the replicator ships of flags and runs -----------


def fill(state: Path) -> None:
    """Two runs (the first killed), two jobs, two throttles, a flag: a ledger kept by a
    station while the central ledger was of schema 1."""
    with Ledger.open(state) as ledger:
        ledger.run_started("line-1", 100)  # killed: no stop
        run = ledger.run_started("line-1", 101)

        async def record() -> None:
            for n, result in enumerate((Stage.DONE, Stage.FAILED)):
                job = f"job{n}"
                start = time.time() - 600 + 60 * n  # boards a minute apart
                await ledger.record(JobStarted(job_id=job, port="p", slot="A1", at=start,
                                               station="line-1", firmware_hash="f"))
                await ledger.record(JobFinished(
                    job_id=job, port="p", slot="A1", result=result, timings={"flash": 1.0},
                    at=start + 31.25,
                    failed_stage=Stage.VERIFY if result is Stage.FAILED else None,
                    error="verify failed" if result is Stage.FAILED else None))
            for _ in range(2):  # job0 waited twice for the cloud
                ledger.note(Throttled(job_id="job0", port="p", slot="A1", api="CreateThing"))
            await ledger.record(SlotFlagged(job_id="job1", port="p", slot="A1",
                                            station="line-1", stage=Stage.VERIFY,
                                            reason="1 in a row", hint="check power",
                                            parked=False))
        asyncio.run(record())
        ledger.run_stopped(run)


def test_a_schema_1_central_ledger_upgrades_and_gets_the_flags_and_runs(
        tmp_path: Path, central_db: str, pg: Cluster,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    fill(tmp_path)
    conn = central.connect(central_db, 5)
    with monkeypatch.context() as old:  # a station of schema 1 ships everything
        old.setattr(central, "SCHEMA_VERSION", 1)
        old.setattr(central, "JOB_COLUMNS", central.JOB_COLUMNS[  # v3: baud, baud_steps;
            :central.JOB_COLUMNS.index("baud")])  # v4: boot, booted_project/version, boot_log
        assert central.migrate(conn, "line-1") == 0
        db = sqlite3.connect(tmp_path / "ledger.sqlite3")
        events = db.execute("SELECT rowid, job_id, at, kind, stage, attempt, detail FROM "
                            "events ORDER BY rowid").fetchall()
        jobs = [dict(zip(central.JOB_COLUMNS, r, strict=True)) for r in db.execute(
            f"SELECT {', '.join(central.JOB_COLUMNS)} FROM jobs")]
        db.close()
        central.ship(conn, "line-1", central.Batch(events=events, jobs=jobs))
    conn.commit()
    with CentralSource(central_db, 5) as v1:  # schema 1: jobs, but no flags or runs
        assert len(v1.jobs(Window())) == 2
        assert v1.flags(Window()) == [] and v1.runs(Window()) == []

    rep = Replicator(tmp_path / "ledger.sqlite3", "line-1", central_db)
    assert rep.connect_at_start() is None  # migrates to the current schema
    assert rep._ship_once() == 3  # no events left: the flag and both runs
    assert rep._ship_once() == 0
    db_name = central_db.rsplit("/", 1)[-1]
    assert [r[0] for r in pg.sql("SELECT version FROM station_schema ORDER BY version",
                                 database=db_name)] == list(range(1, central.SCHEMA_VERSION + 1))

    def same_report() -> None:
        with CentralSource(central_db, 5) as fleet:
            there = make_report(fleet, Window(), "md", generated=0)
        here = make_report(SqliteLedgerSource(tmp_path / "ledger.sqlite3"), Window(), "md",
                           generated=0)
        same_figures(there, here)

    same_report()
    with CentralSource(central_db, 5) as fleet:
        assert fleet.throttles(Window()) == 2
        assert fleet.throttles(Window(station="line-2")) == 0
        [killed, stopped] = fleet.runs(Window())
        assert killed.stopped_at is None and stopped.stopped_at is not None
    with Ledger.open(tmp_path) as ledger:  # the operator clears the flag later
        assert ledger.clear_flag("A1", by="cli")
    assert rep._ship_once() == 1
    assert rep._ship_once() == 0
    same_report()
    rep.stop(flush=1)
    again = Replicator(tmp_path / "ledger.sqlite3", "line-1", central_db)
    again.connect_at_start()  # what PostgreSQL holds is read back: nothing to resend
    assert again._ship_once() == 0
    again.stop(flush=1)
    conn.close()
