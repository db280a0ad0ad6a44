"""The central ledger's pieces against a real PostgreSQL, in process: idempotent shipping,
migrations, the name-clash guard, and the small parsers of the fleet view."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from station.errors import CentralError, ConfigError
from station.events import Identified, JobFinished, JobStarted, RegistrationStep, Stage
from station.fleet import Replicator, central
from station.record import Ledger
from tests.pgkit import PASSWORD, Cluster, central_db, pg  # noqa: F401  (fixtures)


def fill(state: Path, jobs: int = 2) -> None:
    with Ledger.open(state) as ledger:
        async def record() -> None:
            for n in range(jobs):
                job = f"job{n}"
                for event in (
                        JobStarted(job_id=job, port="p", slot="A1", station="s",
                                   firmware_hash="f"),
                        Identified(job_id=job, port="p", slot="A1", chip="esp32",
                                   mac=f"240ac400000{n}", thing_name=f"t{n}"),
                        RegistrationStep(job_id=job, port="p", slot="A1", mac=f"240ac400000{n}",
                                         thing_name=f"t{n}", step="cert-created",
                                         certificate_id=f"c{n}"),
                        JobFinished(job_id=job, port="p", slot="A1", result=Stage.DONE,
                                    timings={"flash": 1.5})):
                    await ledger.record(event)
        asyncio.run(record())


def counts(pg: Cluster, url: str) -> tuple[int, ...]:  # noqa: F811
    db = url.rsplit("/", 1)[-1]
    return tuple(int(pg.sql(f"SELECT count(*) FROM {t}", database=db)[0][0])  # type: ignore
                 for t in ("events", "jobs", "registrations"))


@pytest.fixture
def conninfo(central_db: str, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    return central_db


def test_shipping_twice_changes_nothing_and_the_cursor_only_moves_on(
        tmp_path: Path, pg: Cluster, conninfo: str) -> None:  # noqa: F811
    fill(tmp_path)
    rep = Replicator(tmp_path / "ledger.sqlite3", "s", conninfo, batch=3)
    assert rep.connect_at_start() is None
    batch = rep._read()
    assert batch is not None and len(batch.events) == 3
    conn = central.connect(conninfo, 5)
    central.ship(conn, "s", batch)
    central.ship(conn, "s", batch)  # a resend after a crash between COMMIT and the cursor
    assert counts(pg, conninfo) == (3, 1, 1)
    while (shipped := rep._ship_once()):
        assert shipped <= 3
    assert counts(pg, conninfo) == (8, 2, 2)
    assert central.shipped_seq(conn, "s") == 8
    central.ship(conn, "s", batch)  # an old batch again: the cursor stays at the end
    assert central.shipped_seq(conn, "s") == 8
    jobs = central.jobs(conn)
    assert [(j["job_id"], j["result"], j["timings"]) for j in jobs] == [
        ("job0", "done", {"flash": 1.5}), ("job1", "done", {"flash": 1.5})]
    assert central.migrate(conn, "s") == central.SCHEMA_VERSION  # idempotent
    conn.close()
    rep.stop(flush=1)
    assert json.loads((tmp_path / "central.json").read_text())["shipped_seq"] == 8


def test_a_second_ledger_under_the_same_station_name_is_refused(
        tmp_path: Path, conninfo: str) -> None:
    fill(tmp_path / "a", jobs=2)
    first = Replicator(tmp_path / "a" / "ledger.sqlite3", "line-1", conninfo)
    first.connect_at_start()
    while first._ship_once():
        pass
    first.stop(flush=1)
    fill(tmp_path / "b", jobs=1)
    second = Replicator(tmp_path / "b" / "ledger.sqlite3", "line-1", conninfo)
    with pytest.raises(CentralError, match="another station uses this \\[station\\] name"):
        second.connect_at_start()


def test_since_and_mac_parsing() -> None:
    assert central.parse_since("24h", now=100_000.0) == 100_000.0 - 86_400
    assert central.parse_since("2026-11-27T22:00Z") == central.parse_since("2026-11-27 22:00")
    with pytest.raises(CentralError, match="--since 'yesterday'"):
        central.parse_since("yesterday")
    assert central.normalise_mac("24:0A:C4:12:34:56") == "240ac4123456"
    assert central.normalise_mac("240ac4-123456") == "240ac4123456"
    with pytest.raises(CentralError, match="not a MAC address"):
        central.normalise_mac("24:0a:c4:12:34")


@pytest.mark.parametrize(("toml", "says"), [
    ('[identity]\non_known_board = "ignore"', "identity.on_known_board: must be one of "
     "reflash, skip, fail, not 'ignore'"),
    ('[metrics]\nlisten = "9464"', "metrics.listen: '9464' is not host:port"),
    ('[metrics]\nlisten = "localhost:99999"', "metrics.listen: 'localhost:99999' is not"),
    ('[ledger]\ncentral = "postgresql://s@h/db"\nbatch = 0', "ledger.batch: must be at least 1"),
    ('[ledger]\ncentral = "postgresql:///db"', "ledger.central: names no host"),
    ('[ledger]\ncentrall = "x"', "ledger.centrall: unknown key"),
])
def test_config_errors_name_the_key(tmp_path: Path, toml: str, says: str) -> None:
    from station.config import load

    image = tmp_path / "app.bin"
    image.write_bytes(b"\xe9" + b"\0" * 31)
    path = tmp_path / "station.toml"
    path.write_text(f'[firmware]\nchip = "esp32"\nimages = [{{ offset = 0x10000, file = '
                    f'"{image}" }}]\n{toml}\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert f"{path}: {says}" in str(caught.value)


def test_config_takes_the_central_keys(tmp_path: Path) -> None:
    from station.config import load

    image = tmp_path / "app.bin"
    image.write_bytes(b"\xe9" + b"\0" * 31)
    path = tmp_path / "station.toml"
    path.write_text(f'[firmware]\nchip = "esp32"\nimages = [{{ offset = 0x10000, file = '
                    f'"{image}" }}]\n[identity]\non_known_board = "skip"\n[ledger]\n'
                    'central = "service=factory"\nbatch = 50\n[metrics]\n'
                    'listen = "0.0.0.0:9464"\n')
    config = load(path)
    assert config.identity.on_known_board == "skip"
    assert (config.ledger.central, config.ledger.batch) == ("service=factory", 50)
    assert config.metrics.address == ("0.0.0.0", 9464)
