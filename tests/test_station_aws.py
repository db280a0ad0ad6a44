"""Issue #4's acceptance end to end: the real `station run` with kind = "aws-iot".

Real esptool on virtual boards (unthrottled), the real daemon in a subprocess, boto3 in
the station against a moto server over HTTP, usually through a loopback proxy that makes
CSR certificates INACTIVE as AWS does (MOTO-NOTES #2) and injects throttling or denials.
Everything is checked where it ends up: the server's certificates, things and groups,
certs_out on disk, each board's flash, and `station ledger`.
"""

from __future__ import annotations

import json
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from station.config import FirmwareSection
from station.demo import make_demo_firmware
from station.flash import FirmwareBundle, load_firmware
from station.identity import (
    CERTIFICATE_FILE,
    CRASH_ENV,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    RECORD_FILE,
    certificate_key_matches,
    key_pair_matches,
    read_nvs,
)
from station.sim import Faults, PluggedBoard, Rig
from tests.registrar.awsproxy import AwsProxy, moto_server, reset_moto
from tests.stationkit import (
    GROUP,
    STATION,
    Aws,
    AwsLine,
    GatedProxy,
    aws_client,
    aws_env,
    mac_hex,
    thing_of,
)

pytestmark = pytest.mark.timeout(420)

BOARDS = 16
APP_SIZE = 200_000


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def moto(moto_url: str) -> str:
    reset_moto(moto_url)
    return moto_url


@pytest.fixture
def aws(moto: str) -> Iterator[Aws]:
    with aws_client(moto) as client:
        yield client


@pytest.fixture
def proxy(moto: str) -> Iterator[AwsProxy]:
    """Moto behind the proxy, which makes CSR certificates INACTIVE as AWS does."""
    with AwsProxy(moto) as p:
        yield p


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FirmwareBundle]:
    args = make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=APP_SIZE)
    return args, load_firmware(FirmwareSection(chip="esp32", flasher_args=args, images=()))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "hub", seed=4, throttle=False, flash_timing=False) as r:
        yield r


def line(tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], endpoint: str,
         keep_private_keys: bool = True, **aws: Any) -> AwsLine:
    args, bundle = firmware
    return AwsLine(root=tmp_path, rig=rig, firmware=args, bundle=bundle, endpoint=endpoint,
                   aws=aws, keep_private_keys=keep_private_keys)


# -- checks -----------------------------------------------------------------------------


def assert_registered(station: AwsLine, aws: Aws, board: PluggedBoard) -> str:
    """The board's thing, its one ACTIVE certificate, certs_out and flash all agree;
    returns the certificate id."""
    thing = thing_of(board)
    attached = aws.principals(thing)
    assert len(attached) == 1, f"{thing}: certificates {attached}"
    cid = attached[0]
    certs = aws.certificates()
    assert certs[cid]["status"] == "ACTIVE"
    arn = certs[cid]["certificateArn"]
    assert aws.owners(arn) == [thing]
    assert aws.policies(arn) == ["station-device"]
    attributes = aws.iot.describe_thing(thingName=thing)["attributes"]
    assert attributes == {"mac": mac_hex(board), "chip": "esp32", "station": STATION,
                          "firmware": station.bundle.sha256}

    flash = station.flash(board)
    for region in station.bundle.regions:
        assert flash[region.offset:region.end] == region.data, region.name
    nvs = station.bundle.partition("nvs")
    values = read_nvs(flash[nvs.offset:nvs.end])["station"]
    assert isinstance(values["priv_key"], bytes) and values["priv_key"].endswith(b"\0")
    key = values["priv_key"][:-1].decode()

    folder = station.certs_out / thing
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    public = (folder / PUBLIC_KEY_FILE).read_text()
    cert = (folder / CERTIFICATE_FILE).read_text()
    if station.keep_private_keys:
        assert (folder / PRIVATE_KEY_FILE).read_text() == key
        assert stat.S_IMODE((folder / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    else:
        assert not (folder / PRIVATE_KEY_FILE).exists(), "the key stayed on the station"
    assert key_pair_matches(key, public)
    # moto signs a key of its own for a CSR (MOTO-NOTES #1): the certificate is held to
    # the key only when their types match; it must be the server's certificate.
    assert certificate_key_matches(cert, public) is not False
    assert cert.strip() == aws.certificate_pem(cid).strip()
    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["certificate_id"] == cid and record["status"] == "active"

    assert values["thing_name"] == thing
    assert values["cert"] == cert.encode() + b"\0"
    # moto makes up a new endpoint per DescribeEndpoint; the station asks once at start
    assert values["endpoint"] == record["endpoint"]
    assert str(values["endpoint"]).endswith("-ats.iot.eu-west-1.amazonaws.com")
    return cid


# -- 1. sixteen boards ------------------------------------------------------------------


@pytest.mark.slow
def test_sixteen_boards_get_things_certificates_and_credentials_on_flash(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], proxy: AwsProxy,
        aws: Aws) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(BOARDS)]
    with line(tmp_path, rig, firmware, proxy.url) as station:
        result = station.run(BOARDS)
        assert result.returncode == 0, result
        check_sixteen(station, aws, boards)
    assert proxy.calls["CreateCertificateFromCsr"] == BOARDS
    # AWS quotas: each start-up check once a run, nothing asked twice per board
    start = {"DescribeEndpoint": 1, "DescribeThing": 1, "ListThingPrincipals": 1,
             "DescribeCertificate": 1, "GetPolicy": 1, "CreatePolicy": 1,
             "DescribeThingGroup": 1, "CreateThingGroup": 1}
    per_board = ["DescribeThing", "CreateCertificateFromCsr", "AttachPolicy", "CreateThing",
                 "AttachThingPrincipal", "AddThingToThingGroup", "UpdateCertificate"]
    budget = {api: start.get(api, 0) + BOARDS * per_board.count(api)
              for api in {*start, *per_board}}
    assert dict(proxy.calls) == budget


def check_sixteen(station: AwsLine, aws: Aws, boards: list[PluggedBoard]) -> None:
    things = aws.things()
    assert set(things) == {thing_of(b) for b in boards}
    assert aws.group(GROUP) == set(things)
    cids = {thing_of(b): assert_registered(station, aws, b) for b in boards}
    assert len(set(cids.values())) == BOARDS
    assert set(aws.certificates()) == set(cids.values()), "a certificate nobody holds"
    assert sorted(p.name for p in station.certs_out.iterdir()) == sorted(things)

    rows = station.ledger()
    assert len(rows) == BOARDS
    for row in rows:
        assert row["result"] == "done", row
        assert row["certificate_id"] == cids[row["thing_name"]]


# -- 2. re-plugging a done board --------------------------------------------------------


@pytest.mark.slow
def test_a_done_board_plugged_again_keeps_its_certificate(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], proxy: AwsProxy,
        aws: Aws) -> None:
    board = rig.plug(chip="esp32")
    with line(tmp_path, rig, firmware, proxy.url) as station:
        # --reflash: the same station flashes the board again when it comes back
        station.start(2, "--reflash")
        station.wait_for("first job done", lambda: len(station.events("JobFinished")) == 1)
        cid = assert_registered(station, aws, board)
        before = aws.certificates()
        board = station.replug(board)
        result = station.wait()
        assert result.returncode == 0, result
        assert aws.certificates() == before, "re-plugging made or changed a certificate"
        assert assert_registered(station, aws, board) == cid
        rows = station.ledger()
        assert [(r["result"], r["certificate_id"]) for r in rows] == [("done", cid)] * 2

        # without --reflash the board is skipped: nothing registered, nothing written
        board = station.replug(board)
        result = station.run(1)
        assert result.returncode == 0, result
        skipped = station.ledger()[-1]
        assert skipped["result"] == "skipped"
        stages = {e["stage"] for e in station.events("StageChanged")
                  if e["job_id"] == skipped["job_id"]}
        assert stages == {"connect", "identify"}
        assert aws.certificates() == before
    assert proxy.calls["CreateCertificateFromCsr"] == 1


@pytest.mark.slow
def test_key_source_aws_writes_the_seeds_three_files_and_a_thing_type(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], proxy: AwsProxy,
        aws: Aws) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(2)]
    with line(tmp_path, rig, firmware, proxy.url, key_source="aws",
              thing_type="esp32-devkit") as station:
        result = station.run(len(boards))
        assert result.returncode == 0, result
        for board in boards:
            assert_registered(station, aws, board)
            folder = station.certs_out / thing_of(board)
            # AWS made the key: here the certificate must carry it
            assert certificate_key_matches((folder / CERTIFICATE_FILE).read_text(),
                                           (folder / PUBLIC_KEY_FILE).read_text()) is True
            thing = aws.iot.describe_thing(thingName=thing_of(board))
            assert thing["thingTypeName"] == "esp32-devkit"
    assert proxy.calls["CreateKeysAndCertificate"] == len(boards)
    assert proxy.calls["CreateCertificateFromCsr"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("crash", [None, "cert-revoked"])
def test_without_kept_keys_a_reflashed_board_gets_a_new_certificate(
        crash: str | None, tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle],
        proxy: AwsProxy, aws: Aws) -> None:
    """keep_private_keys = false: the station cannot hand the old certificate out again,
    so it revokes and deletes it and makes a new one (killed mid-way: the restart ends
    the replacement)."""
    board = rig.plug(chip="esp32")
    with line(tmp_path, rig, firmware, proxy.url, keep_private_keys=False) as station:
        assert station.run(1).returncode == 0
        old = assert_registered(station, aws, board)
        board = station.replug(board)
        if crash:
            crashed = station.run(1, "--reflash", env={CRASH_ENV: crash})
            assert crashed.returncode == -signal.SIGKILL, crashed
            assert_consistent(station, aws, settled=False)
            assert aws.active() == {}  # revoked: the old certificate is dead already
            board = station.replug(board)
        result = station.run(1, "--reflash")
        assert result.returncode == 0, result
        new = assert_registered(station, aws, board)
        assert new != old
        assert list(aws.certificates()) == [new], "the old certificate was left behind"
        assert_consistent(station, aws, settled=True)
        assert station.ledger()[-1]["certificate_id"] == new


@pytest.mark.slow
def test_a_board_pulled_mid_registration_gets_its_pending_certificate_when_back(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], moto: str,
        aws: Aws) -> None:
    """Unplugged while AWS creates its thing: the call lands after the job ended; the
    board plugged again finishes that registration instead of making a second one."""
    board = rig.plug(chip="esp32")
    with GatedProxy(moto, gate="CreateThing") as proxy, \
            line(tmp_path, rig, firmware, proxy.url) as station:
        station.start(2)
        assert proxy.reached.wait(timeout=120), "no CreateThing"
        rig.unplug(board)
        station.wait_for("the job removed", lambda: [
            e["result"] for e in station.events("JobFinished")] == ["removed"])
        proxy.release.set()
        board = rig.plug(chip="esp32", mac=board.mac, index=board.index)
        result = station.wait()
        assert result.returncode == 3, result  # one of the two jobs was removed
        cid = assert_registered(station, aws, board)
        assert list(aws.certificates()) == [cid]
        assert_consistent(station, aws, settled=True)
        assert [r["result"] for r in station.ledger()] == ["removed", "done"]
    assert proxy.calls["CreateCertificateFromCsr"] == 1


# -- 3. SIGKILL between registration calls ----------------------------------------------

CSR_STEPS = ["key-written", "cert-created", "policy-attached", "thing-created",
             "cert-attached", "group-added", "cert-activated"]


def assert_consistent(station: AwsLine, aws: Aws, *, settled: bool) -> None:
    """No ACTIVE certificate without its thing, key on disk (or, with keep_private_keys =
    false, verified on its board) and ledger row; at most one ACTIVE certificate per
    thing; once `settled`, no thing without its certificate."""
    in_ledger = {row["certificate_id"] for row in station.ledger()}
    certs = aws.certificates()
    for cid, cert in certs.items():
        if cert["status"] != "ACTIVE":
            continue
        owners = aws.owners(cert["certificateArn"])
        assert len(owners) == 1, f"ACTIVE certificate {cid[:12]} is on things {owners}"
        folder = station.certs_out / owners[0]
        if station.keep_private_keys:
            assert (folder / PRIVATE_KEY_FILE).is_file(), f"{cid[:12]}: no key on disk"
        else:  # the key went to the board, was verified there, then dropped
            record = json.loads((folder / RECORD_FILE).read_text())
            assert record["certificate_id"] == cid and record["private_key_dropped"]
        assert cid in in_ledger, f"ACTIVE certificate {cid[:12]} has no ledger row"
    for thing in aws.things():
        attached = aws.principals(thing)
        assert sum(certs[c]["status"] == "ACTIVE" for c in attached) <= 1, thing
        if settled:
            assert attached, f"{thing} has no certificate"


@pytest.mark.slow
@pytest.mark.parametrize("step,key_source", [(step, "csr") for step in CSR_STEPS] + [
    ("cert-created", "aws"), ("key-written", "aws")])
def test_killed_after_a_registration_step_then_restarted(
        step: str, key_source: str, tmp_path: Path, rig: Rig,
        firmware: tuple[Path, FirmwareBundle], proxy: AwsProxy, aws: Aws) -> None:
    board = rig.plug(chip="esp32")
    with line(tmp_path, rig, firmware, proxy.url, key_source=key_source) as station:
        crashed = station.run(1, env={CRASH_ENV: step})
        assert crashed.returncode == -signal.SIGKILL, crashed
        assert_consistent(station, aws, settled=False)  # as the crash left it
        left = aws.certificates()
        assert len(left) == (0 if (step, key_source) == ("key-written", "csr") else 1)

        board = station.replug(board)
        result = station.run(1)
        assert result.returncode == 0, result
        assert_consistent(station, aws, settled=True)
        cid = assert_registered(station, aws, board)
        assert list(aws.certificates()) == [cid], "an interrupted certificate was left"
        if step == "cert-activated":
            assert list(left) == [cid]  # complete before the kill: reused, not replaced
        elif left:
            assert "revoked and deleted" in result.stderr, result

        rows = station.ledger()
        assert [r["result"] for r in rows] == ["failed", "done"], rows
        assert rows[0]["error"].startswith("station stopped during "), rows[0]
        assert rows[1]["certificate_id"] == cid


@pytest.mark.slow
def test_killed_with_registrations_in_flight_on_several_boards(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], proxy: AwsProxy,
        aws: Aws) -> None:
    """One board's step kills the station while the other boards are anywhere in theirs."""
    boards = [rig.plug(chip="esp32") for _ in range(4)]
    with line(tmp_path, rig, firmware, proxy.url) as station:
        crashed = station.run(len(boards), env={CRASH_ENV: "thing-created"})
        assert crashed.returncode == -signal.SIGKILL, crashed
        assert_consistent(station, aws, settled=False)
        boards = [station.replug(b) for b in boards]
        result = station.run(len(boards))
        assert result.returncode == 0, result
        assert_consistent(station, aws, settled=True)
        cids = {assert_registered(station, aws, b) for b in boards}
        assert set(aws.active()) == cids
        # a call in flight at the kill may have made a certificate whose id never reached
        # the ledger (docs/registration.md, "residual window"): INACTIVE, on no thing
        for cid, cert in aws.certificates().items():
            if cid not in cids:
                assert cert["status"] == "INACTIVE"
                assert aws.owners(cert["certificateArn"]) == []
        rows = station.ledger()
        assert sum(r["result"] == "done" for r in rows) == len(boards)
        for row in rows:
            if row["result"] != "done":
                assert row["error"].startswith("station stopped during "), row


# -- 4. a throttling server -------------------------------------------------------------

THROTTLE_SHARE = 0.3
CREATING = ("CreateCertificateFromCsr", "AttachPolicy", "CreateThing", "AttachThingPrincipal",
            "AddThingToThingGroup", "UpdateCertificate")


@pytest.mark.slow
def test_a_throttling_server_costs_retries_not_boards(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], moto: str,
        aws: Aws) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(BOARDS)]
    with AwsProxy(moto, throttle_share=THROTTLE_SHARE, seed=16) as proxy, \
            line(tmp_path, rig, firmware, proxy.url) as station:
        result = station.run(BOARDS)
        assert result.returncode == 0, result
        check_sixteen(station, aws, boards)
    throttled = sum(proxy.throttled.values())
    total = sum(proxy.calls.values())
    assert throttled >= 10, proxy.throttled
    for api in CREATING:  # every creating call reached AWS exactly once per board
        assert proxy.calls[api] - proxy.throttled[api] == BOARDS, (api, proxy.calls)
    # the retries only: about total * share of them, never a storm
    assert total - throttled <= 8 * BOARDS + 10, proxy.calls
    assert total <= 2 * (total - throttled), proxy.calls
    assert "throttled by" in result.stdout
    # the night report counts what the operator saw: each wait is journaled
    report = station.command("report", "--format", "md", "--out", "-")
    assert report.returncode == 0, report
    waits = result.stdout.count(" throttled by ")
    assert f"| registrar throttles | {waits} |" in report.stdout, report.stdout[:1500]


# -- 5. start failures: one clear line and the documented exit code ---------------------

EXIT_CONFIG, EXIT_REGISTRAR = 2, 5


def one_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("station: "), result
    return str(lines[0])


@pytest.mark.parametrize("case,code,message", [
    ("no-credentials", EXIT_REGISTRAR, "no AWS credentials found: set AWS_PROFILE"),
    ("bad-region", EXIT_REGISTRAR, "region 'eu west 1' is not an AWS region name"),
    ("unknown-region", EXIT_CONFIG, "'eu-wset-1' is not an AWS region with IoT Core"),
    ("access-denied", EXIT_REGISTRAR, "AWS denied iot:DescribeThing"),
    ("bad-credentials", EXIT_REGISTRAR, "AWS rejected the station's credentials"),
    ("bad-policy", EXIT_REGISTRAR, "is invalid: Statement[0].Effect must be"),
    ("policy-not-json", EXIT_CONFIG, "policy_document"),
    ("policy-differs", EXIT_REGISTRAR, "exists with a document different from"),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_start_failures_are_one_clear_line(
        command: str, case: str, code: int, message: str, tmp_path: Path, rig: Rig,
        firmware: tuple[Path, FirmwareBundle], moto: str, aws: Aws) -> None:
    deny = {"access-denied": {"DescribeThing": "AccessDeniedException"},
            "bad-credentials": {"DescribeEndpoint": "UnrecognizedClientException"}}
    with AwsProxy(moto, deny=deny.get(case)) as proxy, \
            line(tmp_path, rig, firmware, proxy.url) as station:
        if case == "no-credentials":
            station.env = aws_env(tmp_path, credentials=False)
        elif case == "bad-region":
            station.write_config(region="eu west 1")
        elif case == "unknown-region":  # only checkable against AWS's own endpoints
            station.write_config(region="eu-wset-1", endpoint_url="")
        elif case in ("bad-policy", "policy-not-json"):
            policy = tmp_path / "policy.json"
            policy.write_text('{"Statement": [{"Effect": "Permit", "Action": "iot:Connect", '
                              '"Resource": "*"}]}' if case == "bad-policy" else "{nope")
            station.write_config(policy_document=str(policy))
        elif case == "policy-differs":
            aws.iot.create_policy(policyName="station-device", policyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [
                    {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}))
        args = ("--exit-after", "1") if command == "run" else ()
        result = station.command(command, *args)
        assert result.returncode == code, result
        assert message in one_line(result), result
        assert aws.things() == {} and aws.certificates() == {}


def test_check_proves_aws_access_and_says_what_run_would_do(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], proxy: AwsProxy,
        aws: Aws) -> None:
    with line(tmp_path, rig, firmware, proxy.url) as station:
        result = station.command("check")
        assert result.returncode == 0, result
        assert "registrar   aws-iot: ready" in result.stdout
        assert "NVS partition 'nvs' at 0x9000" in result.stdout
        assert result.stderr == ""
        assert proxy.calls["DescribeEndpoint"] == 1
        assert aws.things() == {} and aws.certificates() == {}


# -- 6. one board's registration fails --------------------------------------------------


@pytest.mark.slow
def test_a_failed_registration_fails_that_board_before_its_credentials(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], moto: str,
        aws: Aws) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(4)]
    victim = thing_of(boards[1])

    def deny(op: str, path: str) -> str | None:
        return "AccessDeniedException" if op == "CreateThing" and \
            path.endswith(f"/{victim}") else None

    with AwsProxy(moto, deny_if=deny) as proxy, \
            line(tmp_path, rig, firmware, proxy.url) as station:
        result = station.run(len(boards))
        assert result.returncode == 3, result
        rows = {row["thing_name"]: row for row in station.ledger()}
        assert rows[victim]["result"] == "failed"
        assert "AWS denied iot:CreateThing" in rows[victim]["error"]
        for board in boards:
            if thing_of(board) != victim:
                assert rows[thing_of(board)]["result"] == "done"
                assert_registered(station, aws, board)
        nvs = station.bundle.partition("nvs")
        flash = station.flash(boards[1])
        assert flash[nvs.offset:nvs.end] == b"\xff" * nvs.size, "credentials were written"
        assert victim not in aws.things()
        assert_consistent(station, aws, settled=True)
        # its certificate never became ACTIVE; the next start (or reconcile) deletes it
        assert len(aws.certificates()) == len(boards)
        assert len(aws.active()) == len(boards) - 1
        cleaned = station.command("reconcile")
        assert cleaned.returncode == 0 and "revoked and deleted" in cleaned.stdout, cleaned
        assert len(aws.certificates()) == len(boards) - 1


# -- no ACTIVE certificate that no board holds -------------------------------------------


def test_a_board_pulled_after_registering_leaves_its_certificate_inactive_until_back(
        tmp_path: Path, firmware: tuple[Path, FirmwareBundle], proxy: AwsProxy,
        aws: Aws) -> None:
    """Registered while its images are still being written, then pulled: the certificate
    it never received is made INACTIVE at once; plugged again, the same one is used."""
    with Rig(tmp_path / "hub", seed=5, throttle=False, flash_timing=True) as slow_rig:
        board = slow_rig.plug(chip="esp32", faults=Faults(slow_flash=20))
        with line(tmp_path, slow_rig, firmware, proxy.url) as station:
            station.start(2)
            station.wait_for("the registration", lambda: bool(station.events("Registered")))
            slow_rig.unplug(board)
            station.wait_for("the job removed", lambda: [
                e["result"] for e in station.events("JobFinished")] == ["removed"])
            (cid,) = aws.certificates()
            assert aws.certificates()[cid]["status"] == "INACTIVE"
            assert aws.principals(thing_of(board)) == [cid]  # still its thing's
            assert_consistent(station, aws, settled=True)

            board = slow_rig.plug(chip="esp32", mac=board.mac, index=board.index)
            result = station.wait()
            assert result.returncode == 3, result  # one of the two jobs was removed
            assert assert_registered(station, aws, board) == cid
            assert list(aws.certificates()) == [cid]


@pytest.mark.slow
def test_reconcile_parks_a_certificate_activated_but_never_put_on_its_board(
        tmp_path: Path, rig: Rig, firmware: tuple[Path, FirmwareBundle], proxy: AwsProxy,
        aws: Aws) -> None:
    board = rig.plug(chip="esp32")
    with line(tmp_path, rig, firmware, proxy.url) as station:
        crashed = station.run(1, env={CRASH_ENV: "cert-activated"})
        assert crashed.returncode == -signal.SIGKILL, crashed
        (cid,) = aws.active()  # killed between activation and the flash

        reconciled = station.command("reconcile")
        assert reconciled.returncode == 0, reconciled
        assert "never put on its board: inactive until the board comes back" in \
            reconciled.stdout, reconciled
        assert aws.certificates()[cid]["status"] == "INACTIVE"
        assert aws.principals(thing_of(board)) == [cid]

        board = station.replug(board)
        assert station.run(1).returncode == 0
        assert assert_registered(station, aws, board) == cid
        assert list(aws.certificates()) == [cid]
