"""Fixtures: one moto server per session (reset per test), dummy AWS credentials in the
test's environment only, a proxy in front of moto, and a boto3 client to look at moto."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest

from station.config import AwsSection
from station.events import RegistrationStep
from station.identity import BoardFacts, Journal
from station.parts import BoardIdentity
from tests.registrar.awsproxy import AwsProxy, moto_server, reset_moto

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "config" / "aws-iot-policy.json"
REGION = "eu-west-1"


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials for this test only; the host's ~/.aws is never read."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def moto(moto_url: str, aws_env: None) -> str:
    reset_moto(moto_url)
    return moto_url


@pytest.fixture
def proxy(moto: str) -> Iterator[AwsProxy]:
    """Moto behind the proxy, which makes CSR certificates INACTIVE as AWS does."""
    with AwsProxy(moto) as p:
        yield p


@pytest.fixture
def iot(moto: str) -> Iterator[Any]:
    client = boto3.session.Session().client("iot", region_name=REGION, endpoint_url=moto)
    try:
        yield client
    finally:
        client.close()


def aws_section(endpoint_url: str, **overrides: Any) -> AwsSection:
    section = AwsSection(region=REGION, endpoint_url=endpoint_url, policy_document=POLICY,
                         thing_group="lot-42", max_attempts=10, retry_mode="standard")
    return replace(section, **overrides)


def board(n: int, station: str = "line-1") -> BoardFacts:
    mac = f"24a1600000{n:02x}"
    return BoardFacts(identity=BoardIdentity(chip="esp32", mac=mac),
                      thing_name=f"station-{mac}", station=station,
                      firmware_hash="ab" * 32)


class MemoryJournal:
    """Collects RegistrationSteps like the ledger would (not durable: same-process tests)."""

    def __init__(self) -> None:
        self.steps: list[RegistrationStep] = []

    def for_board(self, facts: BoardFacts) -> Journal:
        return self.journal_for(facts.identity.mac, facts.thing_name)

    def journal_for(self, mac: str, thing: str) -> Journal:
        async def journal(step: str, cid: str | None, arn: str | None) -> None:
            self.steps.append(RegistrationStep(job_id="t", port="", slot="", mac=mac,
                                               thing_name=thing, step=step,
                                               certificate_id=cid, certificate_arn=arn))
        return journal


class FileJournal:
    """A durable JSON-lines journal (fsync per line), for crash tests across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def journal_for(self, mac: str, thing: str) -> Journal:
        async def journal(step: str, cid: str | None, arn: str | None) -> None:
            line = json.dumps({"mac": mac, "thing": thing, "step": step, "id": cid,
                               "arn": arn}) + "\n"
            await asyncio.to_thread(self._append, line)
        return journal

    def _append(self, line: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def steps(self) -> list[RegistrationStep]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            d = json.loads(line)
            out.append(RegistrationStep(job_id="crash", port="", slot="", mac=d["mac"],
                                        thing_name=d["thing"], step=d["step"],
                                        certificate_id=d["id"], certificate_arn=d["arn"]))
        return out


def certificates(iot: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for page in iot.get_paginator("list_certificates").paginate():
        out += page["certificates"]
    return out


def things(iot: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for page in iot.get_paginator("list_things").paginate():
        for t in page["things"]:
            out[t["thingName"]] = t
    return out


def thing_certificates(iot: Any, thing: str) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in iot.list_thing_principals(thingName=thing)["principals"]]


Run = Callable[..., Any]
