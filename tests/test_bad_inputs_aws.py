"""The bad-input matrix (issue #6), part 3: the cloud. No credentials, a wrong region,
access denied, the endpoint down: one line naming what to fix, exit 5 (2 for a region
that is not one), nothing created in AWS and nothing lost from the ledger.

AWS is a moto server (behind the tests' fault proxy where AWS must misbehave); the
station gets dummy credentials, never the host's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from station.daemon import EXIT_BOARDS_FAILED, EXIT_CONFIG, EXIT_REGISTRAR
from station.sim import Rig
from tests.registrar.awsproxy import AwsProxy, free_port, moto_server, reset_moto
from tests.test_bad_inputs import (
    Firmware,
    Site,
)

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "config" / "aws-iot-policy.json"
REGION = "eu-west-1"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def moto(moto_url: str) -> str:
    reset_moto(moto_url)
    return moto_url


@pytest.fixture
def iot(moto: str) -> Iterator[Any]:
    """A look at the server side, straight to moto."""
    session = boto3.session.Session(aws_access_key_id="testing",
                                    aws_secret_access_key="testing", region_name=REGION)
    client = session.client("iot", endpoint_url=moto)
    try:
        yield client
    finally:
        client.close()


def aws_env(home: Path, *, credentials: bool = True) -> dict[str, str]:
    """Nothing from the host's AWS set-up; dummy keys unless `credentials` is False."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(home / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true")
    if credentials:
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    return env


@pytest.fixture
def site(tmp_path: Path, firmware: Firmware) -> Site:
    s = Site(tmp_path, firmware, env=aws_env(tmp_path))
    s.set("registrar", "kind", "aws-iot")
    for key, value in {"region": REGION, "endpoint_url": "", "policy_document": POLICY,
                       "max_attempts": 2}.items():
        s.set("registrar.aws", key, value)
    return s


def nothing_in(iot: Any) -> None:
    assert iot.list_things()["things"] == []
    assert iot.list_certificates()["certificates"] == []


def start_fails(site: Site, code: int, *expected: str) -> None:
    """`run` and `check` both refuse with one line; the ledger keeps its rows."""
    for args in (("run", "--headless", "--exit-after", "1"), ("check",)):
        result = site.cli(*args)
        assert result.code == code, result
        line = result.complaint()
        for text in expected:
            assert text in line, result
    site.assert_history_kept()


def test_no_credentials(site: Site, moto: str, iot: Any) -> None:
    site.seed_ledger()
    site.set("registrar.aws", "endpoint_url", moto)
    site.env = aws_env(site.root, credentials=False)
    start_fails(site, EXIT_REGISTRAR, "registrar: no AWS credentials found: set AWS_PROFILE "
                "(or [registrar.aws] profile)", "secrets never go in station.toml")
    nothing_in(iot)


def test_a_mistyped_region_is_a_config_error_without_touching_the_network(site: Site) -> None:
    site.seed_ledger()
    site.set("registrar.aws", "region", "eu-wset-1")  # no endpoint_url: the real AWS
    start_fails(site, EXIT_CONFIG, "station.toml: registrar.aws.region: 'eu-wset-1' is not "
                "an AWS region with IoT Core; did you mean 'eu-west-1'?")


def test_access_denied_names_the_action(site: Site, moto: str, iot: Any) -> None:
    site.seed_ledger()
    with AwsProxy(moto, deny={"DescribeThing": "AccessDeniedException"}) as proxy:
        site.set("registrar.aws", "endpoint_url", proxy.url)
        start_fails(site, EXIT_REGISTRAR, "registrar: AWS denied iot:DescribeThing "
                    "(AccessDeniedException", "config/station-iam-permissions.json")
    assert iot.list_things()["things"] == []


def test_endpoint_down(site: Site) -> None:
    site.seed_ledger()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    site.set("registrar.aws", "endpoint_url", url)
    start_fails(site, EXIT_REGISTRAR, f"registrar: cannot reach AWS IoT at {url}",
                "check [registrar.aws] region / endpoint_url and the network")


def test_a_creating_call_denied_fails_the_boards_naming_it_and_leaves_no_certificate(
        site: Site, rig: Rig, moto: str, iot: Any) -> None:
    """The start probe cannot try creating calls; the boards say which one is missing."""
    site.seed_ledger()
    boards = [rig.plug(chip="esp32") for _ in range(2)]
    with AwsProxy(moto, deny={"CreateCertificateFromCsr": "AccessDeniedException"}) as proxy:
        site.set("registrar.aws", "endpoint_url", proxy.url)
        result = site.run(len(boards))
    assert result.code == EXIT_BOARDS_FAILED, str(result)
    rows = site.rows_by_port()
    for board in boards:
        row = rows[board.port]
        assert row["result"] == "failed", row
        assert "AWS denied iot:CreateCertificateFromCsr" in row["error"], row
        assert "station-iam-permissions.json" in row["error"], row
        assert f"failed at {row['failed_stage']}: AWS denied" in result.stdout, result
    assert iot.list_certificates()["certificates"] == []
    site.assert_history_kept()
