"""Issue 12 end to end: stations ship their ledgers to one real PostgreSQL.

Real `station run` subprocesses on virtual rigs (unthrottled), a real PostgreSQL server
(tests/pgkit.py: the distro's binaries, one throw-away cluster per test process), the
real CLI to read it back, real HTTP scrapes of the metrics endpoint.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from station.demo import make_demo_firmware
from tests.centralkit import CentralLine, central_lines, local_events, mac_hex
from tests.pgkit import Cluster, central_db, pg  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=120_000)


@pytest.fixture
def make_line(tmp_path: Path, firmware: Path, central_db: str,  # noqa: F811
              ) -> Iterator[Callable[..., CentralLine]]:
    with central_lines(tmp_path, firmware, central_db, first_seed=21) as make:
        yield make


def pg_count(pg: Cluster, url: str, sql: str) -> int:  # noqa: F811
    rows = pg.sql(sql, database=url.rsplit("/", 1)[-1])
    return int(rows[0][0])  # type: ignore[call-overload]


def test_two_stations_write_to_one_postgresql(make_line: Callable[..., CentralLine],
                                              pg: Cluster) -> None:  # noqa: F811
    a, b = make_line("line-a"), make_line("line-b")
    a.start("--exit-after", "4")
    b.start("--exit-after", "3")
    boards_a = [a.rig.plug(index=i) for i in range(4)]
    boards_b = [b.rig.plug(index=i) for i in range(3)]
    assert a.wait() == 0, a.output()[-3000:]
    assert b.wait() == 0, b.output()[-3000:]

    fleet = a.central_jobs()
    by_mac = Counter(j["mac"] for j in fleet)
    assert set(by_mac) == {mac_hex(x) for x in boards_a + boards_b}
    assert set(by_mac.values()) == {1}  # each board once
    stations = {j["mac"]: j["station"] for j in fleet}
    assert all(stations[mac_hex(x)] == "line-a" for x in boards_a)
    assert all(stations[mac_hex(x)] == "line-b" for x in boards_b)
    for line in (a, b):  # the central rows are the local rows, exactly
        local = {j["job_id"]: j for j in line.local_jobs()}
        mine = {j["job_id"]: j for j in fleet if j["station"] == line.name}
        assert set(mine) == set(local)
        for job_id, row in local.items():
            for key in ("mac", "result", "slot", "port", "thing_name", "firmware_hash",
                        "started", "finished", "timings", "error"):
                assert mine[job_id][key] == row[key], (key, row, mine[job_id])
        assert pg_count(pg, line.central, "SELECT count(*) FROM events WHERE station = "
                        f"'{line.name}'") == local_events(line.state)
    assert [j["station"] for j in b.central_jobs("--station", "line-b")] == ["line-b"] * 3
    assert b.central_jobs("--since", "2000-01-01") == fleet
    assert b.central_jobs("--since", "1m") == fleet

    table = a.command("ledger", "--central")
    assert table.returncode == 0, table.stderr
    assert "line-a" in table.stdout and "line-b" in table.stdout
    assert "done 7, total 7" in " ".join(table.stdout.split())

    board = b.command("board", boards_a[0].mac.upper(), "--format", "json")
    assert board.returncode == 0, board.stderr
    history = json.loads(board.stdout)
    assert [j["station"] for j in history["jobs"]] == ["line-a"]
    assert history["jobs"][0]["result"] == "done"
    text = b.command("board", boards_a[0].mac)
    assert "line-a" in text.stdout and mac_hex(boards_a[0]) in text.stdout


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("outage_s", [
    20.0,  # in `make test`: long enough for the warning and a backlog
    pytest.param(60.0, marks=pytest.mark.soak)])  # the minute, in `make soak`
def test_postgresql_away_then_a_station_killed_while_shipping(
        make_line: Callable[..., CentralLine], pg: Cluster, outage_s: float) -> None:  # noqa: F811
    import time

    line = make_line("line-a", ledger_extra="batch = 5")
    db = line.central.rsplit("/", 1)[-1]
    line.start()
    for i in range(3):
        line.rig.plug(index=i)
    line.until("3 boards final", lambda: line.finished() == 3)
    line.until("the central ledger to catch up", lambda: (line.try_scrape() or {}).get(
        "station_central_pending_events") == 0)

    # The station's row stays locked through the outage (a prepared transaction outlives
    # a restart), so the catch-up transaction will wait mid-way: the SIGKILL lands there.
    pg.sql("BEGIN; SELECT * FROM stations WHERE station = 'line-a' FOR UPDATE; "
           "PREPARE TRANSACTION 'hold'", database=db)
    pg.stop()
    down_at = time.monotonic()
    for i in range(3, 8):
        line.rig.plug(index=i)
    # no board waits on PostgreSQL: they finish as fast as without it
    line.until("5 boards final with PostgreSQL down", lambda: line.finished() == 8,
               timeout=45)
    assert time.monotonic() - down_at < outage_s
    line.until("the warning", lambda: "cannot reach PostgreSQL" in line.output(), timeout=20)
    during = line.scrape()
    assert during["station_central_up"] == 0
    assert during["station_central_pending_events"] > 0
    assert during["station_central_lag_seconds"] > 0
    time.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))  # the outage itself
    pg.start()

    def shipping_blocked() -> bool:
        rows = pg.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                      "'station line-a' AND wait_event_type = 'Lock'", database=db)
        return int(rows[0][0]) > 0  # type: ignore[call-overload]

    line.until("the catch-up to be mid-transaction", shipping_blocked, timeout=40)
    line.kill()  # SIGKILL while shipping
    pg.sql("ROLLBACK PREPARED 'hold'", database=db)
    local_total = local_events(line.state)
    shipped = pg_count(pg, line.central, "SELECT count(*) FROM events")
    assert 0 < shipped < local_total  # the killed transaction left nothing half-shipped

    line.start()  # as systemd would
    line.until("the lag back to zero", lambda: (s := line.try_scrape()) is not None and
               s["station_central_pending_events"] == 0 and
               s["station_central_lag_seconds"] == 0 and s["station_central_up"] == 1,
               timeout=60)
    assert line.stop() == 0
    assert pg_count(pg, line.central, "SELECT count(*) FROM events") == local_events(line.state)
    assert pg_count(pg, line.central, "SELECT count(DISTINCT seq) FROM events") == \
        local_events(line.state)
    local = {j["job_id"]: j for j in line.local_jobs()}
    fleet = {j["job_id"]: j for j in line.central_jobs()}
    assert local == fleet
    # the restarted station saw the 8 boards still plugged and skipped them (done already)
    assert Counter(j["result"] for j in local.values()) == {"done": 8, "skipped": 8}
