"""The small soak: a night in about a minute, and proof that the checker has teeth.

32 boards through 16 slots at full speed (no line-rate throttle), two boards of each
board fault, one SIGKILL and restart, AWS throttling and 5xx on, AWS away for a few
seconds, certs_out full for a few seconds. The same harness and checker as `make soak`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import boto3
import pytest

from benchmarks.invariants import (
    AwsView,
    Plug,
    RssSample,
    check_all,
    check_aws,
    check_rss,
    read_jobs,
    read_registrations,
)
from benchmarks.soak import run_soak
from benchmarks.soak_aws import moto_server
from benchmarks.soak_pg import find_bindir
from benchmarks.soak_plan import SIM_FAULTS, SoakConfig
from station.config import load
from station.flash import load_firmware

# A night in miniature: its faults land at times, so it runs alone, in `make soak`
# (marker soak); the checker's own tests without it run with the suite.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    work = tmp_path_factory.mktemp("soak") / "work"
    cfg = SoakConfig(boards=32, faults_per_kind=2, kill_every=16, throttle=False,
                     outage_at=0.3, outage_s=6.0, disk_full_at=0.6, disk_full_s=3.0,
                     pg_outage_at=0.45, pg_outage_s=8.0,
                     workdir=work, seed=3, deadline_s=360.0)
    report = run_soak(cfg)
    (work.parent / "report.json").write_text(json.dumps(report, indent=2))
    return report, work


@pytest.mark.soak
def test_small_soak_ends_with_no_violation_and_every_fault_free_board_done(
        soak: tuple[dict[str, Any], Path]) -> None:
    report, _ = soak
    summary = json.dumps({k: report[k] for k in ("violations", "fault_free_not_done",
                                                 "boards", "failed_by_reason", "notes")},
                         indent=1)
    assert report["violations"] == [], summary
    assert report["invariant_violations"] == 0
    assert report["fault_free_not_done"] == [], summary
    assert report["passed"]
    boards = report["boards"]
    assert boards["plugged"] == 32
    assert boards["fault_free"] >= 10, summary  # the rest must really have been tested
    assert boards["fault_free_done"] == boards["fault_free"]


@pytest.mark.soak
def test_small_soak_injected_every_kind_of_fault(soak: tuple[dict[str, Any], Path]) -> None:
    report, _ = soak
    injected = report["faults_injected"]
    for kind in SIM_FAULTS:
        assert injected.get(kind) == 2, injected
    assert injected.get("sigkill") == 1
    assert report["restarts"]["sigkill"] == 1
    assert report["restarts"]["unexpected_exits"] == []
    assert injected.get("aws_outage") == 1
    # the central PostgreSQL went away and the checker held it to the ledger afterwards
    if find_bindir() is not None:
        assert injected.get("pg_outage") == 1, report["notes"]
        assert report["central"]["events"] > 0 and report["central"]["jobs"] >= 32
    else:  # said in the report, not skipped silently
        assert any("central ledger not soaked" in n for n in report["notes"])
    assert injected.get("aws_throttled", 0) > 0
    assert injected.get("aws_5xx_before", 0) + injected.get("aws_5xx_after", 0) > 0
    if os.geteuid() == 0:
        assert injected.get("disk_full") == 1, report["notes"]
    else:  # said in the report, not skipped silently
        assert any("disk-full fault not injected" in n for n in report["notes"])
    # the boards the SIGKILL caught were taken again by the restarted station
    assert report["recoveries"]["interrupted_jobs_closed_at_restart"] >= 1
    assert report["recoveries"]["boards_done_after_a_failed_or_interrupted_job"] >= 1


def _audit(work: Path, dumps: Path, certs_out: Path, plugs: list[Plug]) -> list[str]:
    bundle = load_firmware(load(work / "station.toml").firmware)
    found, _ = check_all(ledger=work / "state" / "ledger.sqlite3", dumps=dumps,
                         certs_out=certs_out, bundle=bundle, partition="nvs",
                         namespace="station", plugs=plugs, iot=None)
    return [f"{v.kind}:{v.subject}:{v.detail}" for v in found]


@pytest.mark.soak
def test_the_checker_finds_what_a_bad_night_would_leave(
        soak: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    _, work = soak
    saved = work / "certs_out.saved"
    if not saved.exists():  # no tmpfs (not root): certs_out is a plain folder
        saved = work / "certs_out"
    certs_out = tmp_path / "certs_out"
    shutil.copytree(saved, certs_out)
    dumps = tmp_path / "rig"
    shutil.copytree(work / "rig", dumps, symlinks=True)
    jobs = read_jobs(work / "state" / "ledger.sqlite3")
    done = [j for j in jobs if j["result"] == "done"]
    assert len(done) >= 4
    assert _audit(work, dumps, certs_out, []) == []  # the soak's own outputs are clean

    # a done board whose app image lost a byte, one whose NVS holds another's thing name,
    # a certs_out folder nobody recorded, one a done board lost, a board never recorded
    flipped = dumps / f"flash-{done[0]['mac']}.bin"
    image = bytearray(flipped.read_bytes())
    image[0x10000 + 100] ^= 0xFF
    flipped.write_bytes(bytes(image))
    swapped = dumps / f"flash-{done[1]['mac']}.bin"
    other = (dumps / f"flash-{done[2]['mac']}.bin").read_bytes()
    bundle = load_firmware(load(work / "station.toml").firmware)
    part = bundle.partition("nvs")
    image = bytearray(swapped.read_bytes())
    image[part.offset:part.offset + part.size] = other[part.offset:part.offset + part.size]
    swapped.write_bytes(bytes(image))
    (certs_out / "soak-stray").mkdir()
    shutil.rmtree(certs_out / done[2]["thing_name"])
    ghost = Plug(mac="240ac4ffffff", port="/nowhere", plugged_at=0.0, unplugged_at=1.0)
    # every board the ledger knows was plugged, but for done[3]: a MAC misread as another
    plugs = [Plug(j["mac"], j["port"], j["started_at"], j["finished_at"]) for j in jobs
             if j["mac"] and j["mac"] != done[3]["mac"]]
    found = _audit(work, dumps, certs_out, [*plugs, ghost])
    kinds = {(f.split(":")[0], f.split(":")[1]) for f in found}
    assert ("flash", done[0]["mac"]) in kinds, found
    assert ("nvs", done[1]["mac"]) in kinds, found
    assert ("certs-out", "soak-stray") in kinds, found
    assert ("certs-out", done[2]["mac"]) in kinds, found
    assert ("unaccounted", "240ac4ffffff") in kinds, found
    assert ("phantom", done[3]["mac"]) in kinds, found


def test_the_checker_finds_active_certificates_nobody_holds(tmp_path: Path) -> None:
    with moto_server() as url:
        iot = boto3.session.Session(aws_access_key_id="testing",
                                    aws_secret_access_key="testing",
                                    region_name="eu-west-1").client("iot", endpoint_url=url)
        try:
            loose = iot.create_keys_and_certificate(setAsActive=True)["certificateId"]
            held = iot.create_keys_and_certificate(setAsActive=True)
            iot.create_thing(thingName="soak-240ac4000004")
            iot.attach_thing_principal(thingName="soak-240ac4000004",
                                       principal=held["certificateArn"])
            iot.create_keys_and_certificate(setAsActive=False)  # INACTIVE: harmless
            found = check_aws(AwsView.read(iot), [], tmp_path)
        finally:
            iot.close()
    details = {(v.subject, v.detail) for v in found}
    assert (loose, "ACTIVE with no thing") in details
    held_id = held["certificateId"]
    assert (held_id, "ACTIVE on soak-240ac4000004, no key on disk") in details
    assert (held_id, "ACTIVE with no cert-activated row in the ledger") in details
    assert len(found) == 4  # + registration.json names another certificate


def test_rss_growth_is_measured_within_one_process() -> None:
    flat = [RssSample(0, 1, n, 80_000 + n) for n in range(0, 120)]
    leaky = [RssSample(0, 2, n, 80_000 + n * 400) for n in range(0, 120)]
    assert check_rss(flat)[0] == []
    violations, summary = check_rss(leaky)
    assert [v.kind for v in violations] == ["rss"]
    assert summary["longest_lived"]["baseline_at_board"] == 50
    # a restart (new pid) is not growth; growth inside a later process is
    restarted = [RssSample(0, 3, n, 80_000) for n in range(60)] + \
        [RssSample(0, 4, n, 120_000) for n in range(60, 120)]
    assert check_rss(restarted)[0] == []
    late_leak = [RssSample(0, 5, n, 80_000) for n in range(60)] + \
        [RssSample(0, 6, n, 80_000 + (n - 60) * 600) for n in range(60, 120)]
    assert [v.subject for v in check_rss(late_leak)[0]] == ["6"]
    # a start that never got past its imports (AWS away) is listed, not judged
    failed_start = [RssSample(0, 7, 60, 500), RssSample(1, 7, 60, 70_000)]
    violations, summary = check_rss(flat + failed_start)
    assert violations == []
    assert "not judged" in summary["processes"][-1]["note"]


@pytest.mark.soak
def test_registration_rows_name_every_certificate_in_the_ledger(
        soak: tuple[dict[str, Any], Path]) -> None:
    _, work = soak
    rows = read_registrations(work / "state" / "ledger.sqlite3")
    activated = {r["certificate_id"] for r in rows if r["step"] == "cert-activated"}
    done = [j for j in read_jobs(work / "state" / "ledger.sqlite3") if j["result"] == "done"]
    assert {j["certificate_id"] for j in done} <= activated
