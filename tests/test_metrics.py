"""Prometheus metrics: real HTTP scrapes of a real `station run`, and the example alert rules.

The scrape is parsed with prometheus_client's own parser (what a Prometheus server reads
would be the same text format); the alert rules go through `promtool` (check and unit
test) where it is installed (.ci/run extracts it from Debian's prometheus package),
else through a parse that still ties every metric they name to one the station serves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from station.demo import make_demo_firmware
from station.flash import load_firmware
from station.fleet import ReplicationStatus
from station.health.metrics import StationMetrics
from station.sim import Rig
from tests.centralkit import CentralLine, mac_hex, parse_metrics
from tests.pgkit import central_db, pg  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "config" / "station-alerts.yml"
RULES_TEST = ROOT / "tests" / "station-alerts-test.yml"
BOARDS = 16


def test_a_scrape_during_a_16_board_run_and_the_counters_after_it(
        tmp_path: Path, central_db: str) -> None:  # noqa: F811
    firmware = make_demo_firmware(tmp_path / "fw", chip="esp32", app_size=120_000)
    with Rig(tmp_path / "rig", seed=5, throttle=True, flash_timing=True) as rig:
        line = CentralLine(root=tmp_path / "line", name="line-m", firmware=firmware,
                           central=central_db, rig=rig)
        boards = [rig.plug(index=i) for i in range(BOARDS)]  # all in before the start
        line.start()
        try:
            most = 0.0
            seen: list[float] = []

            def sixteen_in_flight() -> bool:
                nonlocal most
                scrape = line.try_scrape()
                if scrape is not None:
                    most = max(most, scrape["station_boards_in_flight"])
                    seen.append(scrape["station_boards_in_flight"])
                return most == BOARDS or line.finished() == BOARDS

            line.until("16 boards in flight", sixteen_in_flight, timeout=120)
            assert most == BOARDS, seen
            line.until("16 boards final", lambda: line.finished() == BOARDS, timeout=180)
            line.until("the central ledger to catch up", lambda: (
                line.try_scrape() or {}).get("station_central_pending_events") == 0)
            after = line.scrape()
            text = _raw(line)
        finally:
            if line.proc is not None:
                line.stop()
        jobs = line.local_jobs()
    results = Counter((j["result"], j["failed_stage"] or "") for j in jobs)
    served = {k: v for k, v in after.items() if k.startswith("station_boards_total")}
    assert served == {f'station_boards_total{{failed_stage="{stage}",result="{result}"}}': n
                      for (result, stage), n in results.items()}
    assert results == {("done", ""): BOARDS}
    assert after["station_boards_in_flight"] == 0
    regions = load_firmware(_firmware_section(line)).regions
    assert after["station_flashed_bytes_total"] == BOARDS * sum(len(r.data) for r in regions)
    for stage in ("connect", "identify", "flash", "verify", "reset"):
        assert after[f'station_stage_duration_seconds_count{{stage="{stage}"}}'] == BOARDS
    assert after['station_board_duration_seconds_count{result="done"}'] == BOARDS
    assert after["process_resident_memory_bytes"] > 10e6
    assert after["process_cpu_seconds_total"] > 0
    assert after["station_central_up"] == 1
    assert after["station_central_shipped_events_total"] > BOARDS * 5
    assert after["station_ledger_write_seconds_count"] > BOARDS * 5
    for board in boards:  # bounded labels: no series per board
        assert mac_hex(board) not in text and board.mac not in text


def _raw(line: CentralLine) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{line.metrics_port}/metrics",
                                timeout=5) as reply:
        return str(reply.read().decode())


def _firmware_section(line: CentralLine) -> object:
    from station.config import load

    return load(line.config).firmware


def test_a_taken_metrics_port_is_one_clear_line(tmp_path: Path, central_db: str,  # noqa: F811
                                               ) -> None:
    import socket

    firmware = make_demo_firmware(tmp_path / "fw", chip="esp32", app_size=20_000)
    with Rig(tmp_path / "rig", seed=6, throttle=False, flash_timing=False) as rig, \
            socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = CentralLine(root=tmp_path / "line", name="line-p", firmware=firmware,
                           central=central_db, rig=rig, metrics_port=taken.getsockname()[1])
        result = line.command("run", "--headless", "--exit-after", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "metrics.listen: cannot listen on 127.0.0.1:" in lines[0]
    assert lines[0].startswith("station: config error: ")


# -- the alert rules ----------------------------------------------------------------------


def _served_names() -> set[str]:
    """Every metric name the station can serve, with AWS and the central ledger on."""
    metrics = StationMetrics(replication=lambda: ReplicationStatus(where="x", state="up"),
                             aws=lambda: ({"CreateThing": 1}, {"CreateThing": 1}))
    from station.events import JobFinished, JobStarted, Stage

    metrics.show(JobStarted(job_id="j", port="p", slot="A1", station="s", firmware_hash="h"))
    metrics.show(JobFinished(job_id="j", port="p", slot="A1", result=Stage.FAILED,
                             failed_stage=Stage.FLASH, timings={"flash": 1.0}))
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {re.split(r"[{ ]", key)[0] for key in parse_metrics(text)}


def test_the_alert_rules_name_only_metrics_the_station_serves() -> None:
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    served = _served_names()
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {"StationNoBoardDone", "StationSlotFailing",
                                            "StationCentralLagging"}
    for alert in alerts:
        for name in re.findall(r"\b(station_[a-z_]+)", alert["expr"]):
            assert name in served, (alert["alert"], name, sorted(served))
        assert alert["annotations"]["summary"]


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (.ci/run extracts it from Debian's "
                    "prometheus package); the parse test above still ran")
    return found


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    tested = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent,
                            capture_output=True, text=True, timeout=60, check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr
