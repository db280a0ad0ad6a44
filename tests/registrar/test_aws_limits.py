"""Throttling, the station-wide limiter, and the errors AWS access can give at start."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from station.config import AWS_DEFAULT_TPS
from station.errors import RegistrationError
from station.identity import CredentialStore
from station.identity.registrar.aws_client import RateLimiter
from station.identity.registrar.aws_iot import AwsIotRegistrar, attribute_value
from tests.registrar.awsproxy import AwsProxy, free_port
from tests.registrar.conftest import (
    MemoryJournal,
    aws_section,
    board,
    certificates,
    thing_certificates,
)

BOARDS = 16
CALLS_PER_BOARD = 7  # DescribeThing, CreateCertificateFromCsr, AttachPolicy, CreateThing,
#                      AttachThingPrincipal, AddThingToThingGroup, UpdateCertificate
START_CALLS = 8  # DescribeEndpoint, 3 probes, GetPolicy, CreatePolicy, group describe+create


async def run_boards(registrar: AwsIotRegistrar, n: int = BOARDS) -> list[Any]:
    await registrar.start()
    try:
        journal = MemoryJournal()
        return list(await asyncio.gather(*(registrar.register(board(i), journal.for_board(
            board(i))) for i in range(n))))
    finally:
        await registrar.close()


@pytest.mark.long
def test_throttled_server_all_boards_succeed(moto: str, iot: Any, tmp_path: Path) -> None:
    seen: list[str] = []
    with AwsProxy(moto, throttle_share=0.3) as proxy:
        registrar = AwsIotRegistrar(aws_section(proxy.url, retry_mode="standard"),
                                    CredentialStore(tmp_path), station="line-1",
                                    emit_throttled=seen.append)
        creds = asyncio.run(run_boards(registrar))
    assert len(creds) == BOARDS
    for c in creds:
        assert thing_certificates(iot, c.thing_name) == [c.certificate_id]
    assert len(certificates(iot)) == BOARDS  # no certificate made twice by a retry
    total, throttled = sum(proxy.calls.values()), sum(proxy.throttled.values())
    assert throttled > 10  # the proxy really did throttle
    assert total - throttled == BOARDS * CALLS_PER_BOARD + START_CALLS
    assert total < 2 * (BOARDS * CALLS_PER_BOARD + START_CALLS)  # bounded
    assert seen and set(seen) <= set(proxy.throttled)  # the dashboard heard of it
    assert sum(registrar.iot.throttles.values()) == throttled


def test_throttling_that_never_ends_is_a_transient_error(proxy: AwsProxy,
                                                         tmp_path: Path) -> None:
    proxy.deny["CreateThing"] = "ThrottlingException"
    registrar = AwsIotRegistrar(aws_section(proxy.url, max_attempts=2), CredentialStore(tmp_path),
                                station="line-1")
    with pytest.raises(RegistrationError, match="still throttling") as info:
        asyncio.run(run_boards(registrar, 1))
    assert info.value.transient


@pytest.mark.timing  # "waited more than 1 s" needs the boards to arrive together
def test_limiter_makes_boards_wait_and_says_so(proxy: AwsProxy, tmp_path: Path) -> None:
    seen: list[str] = []
    tps = dict(AWS_DEFAULT_TPS, CreateCertificateFromCsr=6.0)
    registrar = AwsIotRegistrar(aws_section(proxy.url, tps=tps), CredentialStore(tmp_path),
                                station="line-1", emit_throttled=seen.append)
    asyncio.run(run_boards(registrar))
    assert "CreateCertificateFromCsr" in seen  # the last boards waited more than 1 s
    assert proxy.throttled == {}


def test_rate_limiter_token_bucket() -> None:
    now = [100.0]
    limiter = RateLimiter({"A": 2.0}, clock=lambda: now[0])
    assert [limiter.reserve("A") for _ in range(2)] == [0.0, 0.0]  # one second of burst
    assert limiter.reserve("A") == pytest.approx(0.5)
    assert limiter.reserve("A") == pytest.approx(1.0)
    now[0] += 10
    assert limiter.reserve("A") == 0.0
    assert limiter.rate("unknown") == 10.0


def test_attribute_values_are_sanitised() -> None:
    assert attribute_value("line 1 (hall B)") == "line_1__hall_B_"
    assert len(attribute_value("x" * 900)) == 800


# -- errors at start ---------------------------------------------------------------------


def start(section: Any, tmp_path: Path) -> None:
    registrar = AwsIotRegistrar(section, CredentialStore(tmp_path), station="line-1")

    async def go() -> None:
        try:
            await registrar.start()
        finally:
            await registrar.close()

    asyncio.run(go())


def test_missing_credentials(moto: str, monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RegistrationError, match="no AWS credentials found: set AWS_PROFILE"):
        start(aws_section(moto), tmp_path)


def test_unknown_profile(moto: str, tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match="AWS profile 'factory'"):
        start(aws_section(moto, profile="factory"), tmp_path)


def test_invalid_region_name(moto: str, tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match="not an AWS region name"):
        start(aws_section("", region="eu west 1"), tmp_path)


def test_unreachable_endpoint(aws_env: None, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistrationError, match=f"cannot reach AWS IoT at {url}"):
        start(aws_section(url, max_attempts=1), tmp_path)


def test_access_denied_names_the_action(proxy: AwsProxy, tmp_path: Path) -> None:
    proxy.deny["DescribeThing"] = "AccessDeniedException"
    with pytest.raises(RegistrationError, match=r"denied iot:DescribeThing .*"
                                                r"station-iam-permissions\.json") as info:
        start(aws_section(proxy.url), tmp_path)
    assert not info.value.transient


def test_access_denied_on_a_board_names_the_action(proxy: AwsProxy, tmp_path: Path) -> None:
    proxy.deny["CreateCertificateFromCsr"] = "AccessDeniedException"
    registrar = AwsIotRegistrar(aws_section(proxy.url), CredentialStore(tmp_path),
                                station="line-1")
    with pytest.raises(RegistrationError, match="denied iot:CreateCertificateFromCsr"):
        asyncio.run(run_boards(registrar, 1))


def test_rejected_credentials(proxy: AwsProxy, tmp_path: Path) -> None:
    proxy.deny["DescribeEndpoint"] = "UnrecognizedClientException"
    with pytest.raises(RegistrationError, match="rejected the station's credentials"):
        start(aws_section(proxy.url), tmp_path)


def test_invalid_policy_document(moto: str, tmp_path: Path) -> None:
    bad = tmp_path / "policy.json"
    bad.write_text(json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Maybe", "Action": "iot:Connect", "Resource": "*"}]}))
    with pytest.raises(RegistrationError, match=r"policy.json is invalid: "
                                                r"Statement\[0\]\.Effect"):
        start(aws_section(moto, policy_document=bad), tmp_path)
    bad.write_text("{not json")
    with pytest.raises(RegistrationError, match="not valid JSON"):
        start(aws_section(moto, policy_document=bad), tmp_path)


def test_policy_rejected_by_aws(proxy: AwsProxy, tmp_path: Path) -> None:
    proxy.deny["CreatePolicy"] = "MalformedPolicyException"
    with pytest.raises(RegistrationError, match="AWS rejected the policy document"):
        start(aws_section(proxy.url), tmp_path)


def test_existing_policy_with_another_document(moto: str, iot: Any, tmp_path: Path) -> None:
    iot.create_policy(policyName="station-device", policyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}))
    with pytest.raises(RegistrationError, match="exists with a document different"):
        start(aws_section(moto), tmp_path)
    start(aws_section(moto, policy_name="station-device-v2"), tmp_path)
    start(replace(aws_section(moto), policy_name="station-device-v2"), tmp_path)  # twice: ok


def test_two_problems_at_start_name_the_first_check_and_create_nothing(
        proxy: AwsProxy, tmp_path: Path) -> None:
    """The start's read-only checks go out together; the error is still the first
    check's, and nothing is created while any check fails."""
    proxy.deny["ListThingPrincipals"] = "AccessDeniedException"
    proxy.deny["DescribeThingGroup"] = "AccessDeniedException"
    for _ in range(3):
        with pytest.raises(RegistrationError, match=r"denied iot:ListThingPrincipals "):
            start(aws_section(proxy.url), tmp_path)
    assert proxy.calls["DescribeThingGroup"] >= 1, "the group was not checked"
    created = [op for op in proxy.calls if op.startswith("Create")]
    assert created == [], created
