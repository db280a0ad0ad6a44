"""Issue 10 meets issue 12: the boot check's result reaches the central ledger.

A real `station run` with `[verify] boot = "app"` drives virtual boards through their RFC
2217 faces (real esptool, real reset sequences over TCP) and ships to a real PostgreSQL
whose schema a station of the previous version made (schema 3). The station migrates it
to 4, and the fleet view (`station ledger --central`) shows each board's boot verdict,
booted project and version and its console tail exactly as `station ledger` does here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from station.demo import make_demo_firmware
from station.fleet import central
from station.sim import Rig
from tests.centralkit import CentralLine, mac_hex
from tests.pgkit import PASSWORD, Cluster, central_db, pg  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(240)

BOOT_COLUMNS = ("boot", "booted_project", "booted_version", "boot_log")


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=20_000)


def schema_3_database(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a station of the previous version left: schema 3 and one of its job rows."""
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    conn = central.connect(url, 5)
    try:
        with monkeypatch.context() as old:
            old.setattr(central, "SCHEMA_VERSION", 3)
            assert central.migrate(conn, "line-old") == 0
        conn.execute("INSERT INTO jobs (station, job_id, seq, mac, result, baud) VALUES "
                     "('line-old', 'old-1', 7, '240ac4000001', 'done', 460800)")
        conn.commit()
    finally:
        conn.close()


def test_boot_results_over_rfc2217_reach_a_migrated_central_ledger(
        tmp_path: Path, firmware: Path, central_db: str, pg: Cluster,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    schema_3_database(central_db, monkeypatch)
    with Rig(tmp_path / "rig", seed=31, throttle=False, flash_timing=False,
             rfc2217_base=0) as rig:
        good = rig.plug(chip="esp32", app_line="SELFTEST: PASS")
        bad = rig.plug(chip="esp32", app_line="SELFTEST: FAIL (adc out of range)")
        urls = [good.rfc2217, bad.rfc2217]
        line = CentralLine(root=tmp_path / "line", name="line-hub", firmware=firmware,
                           central=central_db, rig=rig, watch="none-*",
                           ports=f"remote = {json.dumps(urls)}",
                           extra='[verify]\nboot = "app"\nmarker = "SELFTEST: PASS"\n'
                                 'boot_timeout = 3.0\n')
        try:
            line.start("--exit-after", "2")
            assert line.wait() == 3, line.output()[-3000:]  # one board failed its check
        finally:
            line.kill()

    db = central_db.rsplit("/", 1)[-1]
    assert [r[0] for r in pg.sql("SELECT version FROM station_schema ORDER BY version",
                                 database=db)] == list(range(1, central.SCHEMA_VERSION + 1))
    fleet = {j["port"]: j for j in line.central_jobs("--station", "line-hub")}
    local = {j["port"]: j for j in line.local_jobs()}
    assert sorted(fleet) == sorted(local) == sorted(urls), (fleet, local)
    for url in urls:  # the central rows are the local rows, boot columns included
        for key in ("mac", "result", "failed_stage", "error", *BOOT_COLUMNS):
            assert fleet[url][key] == local[url][key], (key, local[url], fleet[url])

    ok, failed = fleet[good.rfc2217], fleet[bad.rfc2217]
    assert ok["mac"] == mac_hex(good)
    assert (ok["result"], ok["boot"], ok["booted_project"], ok["booted_version"]) == \
        ("done", "ok", "station-demo-esp32", "1.0.0"), ok
    assert "app_init: ELF file SHA256:" in ok["boot_log"], ok
    assert "SELFTEST: PASS" in ok["boot_log"], ok
    assert (failed["result"], failed["failed_stage"], failed["boot"]) == \
        ("failed", "boot", "failed"), failed
    assert "SELFTEST: FAIL (adc out of range)" in failed["boot_log"], failed

    # the old station's row is still there, with no boot result (it had no boot check)
    old = [j for j in line.central_jobs("--station", "line-old")]
    assert [(j["job_id"], j["result"], j["baud"]) for j in old] == [("old-1", "done", 460800)]
    assert all(old[0][key] is None for key in BOOT_COLUMNS), old
    csv_head = line.command("ledger", "--central", "--format", "csv").stdout.splitlines()[0]
    assert ",boot,booted_project,booted_version,boot_log," in csv_head, csv_head
