"""Cross-station facts: a board done on station A, plugged into station B.

`[identity] on_known_board` decides: "skip" (not touched, skipped with the reason),
"fail" (failed at identify, nothing written), "reflash" (flashed again as the thing it
already is). With AWS IoT (a moto server, behind the proxy that makes CSR certificates
INACTIVE as AWS does): no second thing, the old certificate deactivated and detached and
journaled, the new one ACTIVE with its key on station B, and B's reconcile leaves A's
certificate alone.

Named failure cases: the central ledger unreachable when the board is identified (the
board is treated as new and the log says the policy was not applied: see
test_central_bad_inputs), a certificate on the thing that no station made (left
attached, as before), and a crash between deactivating and journaling (redone at the
next registration: both calls are idempotent).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from station.demo import make_demo_firmware
from station.sim import PluggedBoard
from tests.centralkit import CentralLine, central_lines, mac_hex
from tests.pgkit import Cluster, central_db, pg, pg_env  # noqa: F401  (fixtures)
from tests.registrar.awsproxy import AwsProxy, moto_server, reset_moto
from tests.stationkit import aws_client, aws_env, aws_registrar

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=40_000)


@pytest.fixture
def make_line(tmp_path: Path, firmware: Path, central_db: str,  # noqa: F811
              ) -> Iterator[Callable[..., CentralLine]]:
    with central_lines(tmp_path, firmware, central_db, first_seed=31) as make:
        yield make


def run_one(line: CentralLine, board: PluggedBoard | None = None, mac: str | None = None,
            ) -> tuple[int, dict[str, object], PluggedBoard]:
    """`station run --exit-after 1` with one board plugged (a new one, or MAC moved over)."""
    line.start("--exit-after", "1")
    plugged = board or line.rig.plug(index=0, mac=mac)
    code = line.wait()
    job = line.local_jobs()[-1]
    line.rig.unplug(plugged)
    return code, job, plugged


def policy(line: CentralLine, value: str) -> None:
    line.identity = f'on_known_board = "{value}"'
    line.write_config()


def test_each_on_known_board_policy_does_what_it_says(
        make_line: Callable[..., CentralLine]) -> None:
    a, b = make_line("line-a"), make_line("line-b")
    code, done_on_a, board = run_one(a)
    assert code == 0 and done_on_a["result"] == "done", a.output()[-2000:]
    mac = board.mac
    note = "provisioned by line-a on "

    policy(b, "skip")
    code, job, moved = run_one(b, mac=mac)
    assert code == 0, b.output()[-2000:]
    assert job["result"] == "skipped"
    assert job["error"].startswith(note) and 'on_known_board = "skip"' in job["error"]
    assert set(b.rig.flash(moved)) == {0xFF}  # not touched
    assert f"{note}" in b.output() and "(on_known_board = skip)" in b.output()

    policy(b, "fail")
    code, job, moved = run_one(b, mac=mac)
    assert code == 3  # --exit-after: the board failed
    assert job["result"] == "failed" and job["failed_stage"] == "identify"
    assert job["error"].startswith(note) and 'on_known_board = "fail"' in job["error"]
    assert set(b.rig.flash(moved)) == {0xFF}

    policy(b, "reflash")
    code, job, moved = run_one(b, mac=mac)
    assert code == 0 and job["result"] == "done", b.output()[-2000:]
    assert job["thing_name"] == f"line-a-{mac_hex(moved)}"  # the thing it already is
    assert job["station"] == "line-b"

    history = json.loads(b.command("board", mac, "--format", "json").stdout)
    assert [(j["station"], j["result"]) for j in history["jobs"]] == [
        ("line-a", "done"), ("line-b", "skipped"), ("line-b", "failed"), ("line-b", "done")]
    # a board this station did last is not "known elsewhere" any more
    policy(b, "fail")
    code, job, _ = run_one(b, mac=mac)
    assert code == 0 and job["result"] == "skipped"  # done here already with this firmware
    assert job["error"] is None


# -- AWS IoT ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


def test_a_board_reworked_on_another_station_keeps_its_thing_and_gets_a_held_certificate(
        make_line: Callable[..., CentralLine], moto_url: str, tmp_path: Path) -> None:
    reset_moto(moto_url)
    env = {**pg_env(), **aws_env(tmp_path)}
    with AwsProxy(moto_url) as proxy, aws_client(moto_url) as aws:
        a = make_line("line-a", registrar=aws_registrar(proxy.url), env=env)
        b = make_line("line-b", registrar=aws_registrar(proxy.url), env=env)
        code, job_a, board = run_one(a)
        assert code == 0 and job_a["result"] == "done", a.output()[-3000:]
        thing = f"line-a-{mac_hex(board)}"
        old = job_a["certificate_id"]
        assert aws.principals(thing) == [old]

        b.start()  # without --exit-after: its metrics are scraped after the board
        moved = b.rig.plug(index=0, mac=board.mac)
        b.until("the reworked board final", lambda: b.finished() == 1)
        scrape = b.scrape()
        assert b.stop() == 0
        b.rig.unplug(moved)
        job_b = b.local_jobs()[-1]
        assert job_b["result"] == "done", b.output()[-3000:]
        # the AWS calls of the rework, as the metrics count them (per API, no MAC)
        calls = {k.split('"')[1]: v for k, v in scrape.items()
                 if k.startswith("station_aws_calls_total")}
        assert calls["CreateCertificateFromCsr"] == 1
        assert calls["UpdateCertificate"] == 2  # the old one INACTIVE, the new one ACTIVE
        assert calls["DetachThingPrincipal"] == 1
        assert "CreateThing" not in calls
        assert scrape['station_boards_total{failed_stage="",result="done"}'] == 1
        assert job_b["thing_name"] == thing
        assert set(aws.things()) == {thing}  # no second thing
        new = job_b["certificate_id"]
        assert new != old
        assert aws.principals(thing) == [new]
        certs = aws.certificates()
        assert certs[new]["status"] == "ACTIVE"
        assert certs[old]["status"] == "INACTIVE"  # deactivated, A's record kept
        assert {cid for cid, c in certs.items() if c["status"] == "ACTIVE"} == {new}
        key = b.root / "certs_out" / thing / "private.pem.key"
        assert key.exists()  # the ACTIVE certificate's key is held by B
        record = json.loads((b.root / "certs_out" / thing / "registration.json").read_text())
        assert record["certificate_id"] == new
        attributes = aws.iot.describe_thing(thingName=thing)["attributes"]
        assert attributes["station"] == "line-b"
        steps = [e for e in b.events() if e["kind"] == "RegistrationStep"]
        assert [(e["step"], e["certificate_id"]) for e in steps][0] == ("cert-superseded", old)

        reconcile = b.command("reconcile")  # B's crash recovery leaves A's certificate be
        assert reconcile.returncode == 0, reconcile.stderr
        assert old[:12] not in reconcile.stdout
        assert aws.certificates()[old]["status"] == "INACTIVE"


def test_a_central_ledger_that_does_not_answer_holds_no_board(
        make_line: Callable[..., CentralLine], pg: Cluster) -> None:  # noqa: F811
    """PostgreSQL up but stuck (a lock held on `jobs`): the lookup gives up after ~2 s,
    the board goes on as a new one, and the log says the policy was not applied."""
    import time

    import psycopg

    from tests.pgkit import PASSWORD, SUPERUSER

    a, b = make_line("line-a"), make_line("line-b")
    code, _, board = run_one(a)
    assert code == 0
    policy(b, "fail")
    db = b.central.rsplit("/", 1)[-1]
    with psycopg.connect(pg.url(db, SUPERUSER), password=PASSWORD) as blocker:
        blocker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        code, job, _ = run_one(b, mac=board.mac)
        took = time.monotonic() - started
        blocker.rollback()
    assert code == 0 and job["result"] == "done", b.output()[-3000:]
    assert job["thing_name"] == f"line-b-{mac_hex(board)}"  # not known: its own thing
    assert "central ledger did not answer" in b.output()
    assert "on_known_board not applied (treated as a new board)" in b.output()
    assert job["seconds"] < 8, job  # the board waited ~2 s for the lookup at most
    assert took < 25  # the stop's last flush gave up on the stuck PostgreSQL
