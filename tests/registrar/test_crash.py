"""kill -9 after each journaled registration step, then reconcile in a new process.

The end state is checked on the server itself: no ACTIVE certificate without its thing,
its key on disk and its journal rows; no thing left without its certificate once the
board registers again; no duplicate certificate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from station.identity import CRASH_ENV, PRIVATE_KEY_FILE, CredentialStore
from tests.registrar.awsproxy import AwsProxy
from tests.registrar.conftest import (
    ROOT,
    FileJournal,
    board,
    certificates,
    thing_certificates,
    things,
)

CSR_STEPS = ["key-written", "cert-created", "policy-attached", "thing-created",
             "cert-attached", "group-added", "cert-activated"]
CHILD_TIMEOUT = 60


def child(mode: str, url: str, out: Path, journal: Path, n: int = 1,
          crash_after: str | None = None,
          key_source: str = "csr") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    if crash_after:
        env[CRASH_ENV] = crash_after
    return subprocess.run(
        [sys.executable, "-m", "tests.registrar.crash_child", mode, url, str(out),
         str(journal), str(n), key_source],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT)


def assert_no_orphan(iot: Any, out: Path, journal: FileJournal) -> None:
    """Every ACTIVE certificate has its thing, its key on disk and its journal rows."""
    journaled = {s.certificate_id for s in journal.steps() if s.step == "cert-activated"}
    for cert in certificates(iot):
        if cert["status"] != "ACTIVE":
            continue
        cid = cert["certificateId"]
        assert cid in journaled, f"ACTIVE certificate {cid} has no ledger row"
        owners = iot.list_principal_things(principal=cert["certificateArn"])["things"]
        assert len(owners) == 1, f"ACTIVE certificate {cid} is on no thing"
        assert (out / owners[0] / PRIVATE_KEY_FILE).exists(), f"no key for {cid}"


# Every step is also killed end to end (a real `station run`, restarted: test_station_aws.py,
# test_killed_after_a_registration_step_then_restarted). Here, in a registrar of its own,
# `make test` kills at the steps that end differently (nothing made yet, a certificate to
# revoke, one to park, a key source's own step); `make soak` kills at every one.
KEPT = {("key-written", "csr"), ("cert-created", "csr"), ("cert-activated", "csr"),
        ("cert-attached", "aws")}


@pytest.mark.slow
@pytest.mark.parametrize("step,key_source", [
    pytest.param(step, source, marks=() if (step, source) in KEPT else pytest.mark.soak)
    for step, source in [(s, "csr") for s in CSR_STEPS] + [
        ("cert-created", "aws"), ("key-written", "aws"), ("cert-attached", "aws")]])
def test_kill_after_step_then_reconcile(step: str, key_source: str, proxy: AwsProxy,
                                        iot: Any, tmp_path: Path) -> None:
    out, jpath = tmp_path / "certs_out", tmp_path / "journal.jsonl"
    journal = FileJournal(jpath)
    crashed = child("register", proxy.url, out, jpath, crash_after=step,
                    key_source=key_source)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert journal.steps()[-1].step == step
    # before any repair, moto (via the proxy, like AWS) holds no usable orphan
    assert_no_orphan(iot, out, journal)

    repaired = child("reconcile", proxy.url, out, jpath, key_source=key_source)
    assert repaired.returncode == 0, repaired.stderr
    assert_no_orphan(iot, out, journal)
    if step == "cert-activated":  # complete, but the board never got it: parked
        assert "never put on its board: inactive until the board comes back" in \
            repaired.stdout
        assert [c["status"] for c in certificates(iot)] == ["INACTIVE"]
    elif step != "key-written" or key_source == "aws":
        assert certificates(iot) == [], "an interrupted certificate was left behind"
        assert "revoked and deleted" in repaired.stdout

    again = child("register", proxy.url, out, jpath, key_source=key_source)
    assert again.returncode == 0, again.stderr
    thing = board(1).thing_name
    assert list(things(iot)) == [thing]
    certs = certificates(iot)
    assert len(certs) == 1 and certs[0]["status"] == "ACTIVE"
    assert thing_certificates(iot, thing) == [certs[0]["certificateId"]]
    assert_no_orphan(iot, out, journal)
    # a second reconcile finds nothing left to do
    assert child("reconcile", proxy.url, out, jpath).stdout == ""


@pytest.mark.slow
def test_kill_while_replacing_a_certificate(proxy: AwsProxy, iot: Any, tmp_path: Path) -> None:
    """The station lost a board's key; it is killed right after revoking the old one."""
    out, jpath = tmp_path / "certs_out", tmp_path / "journal.jsonl"
    journal = FileJournal(jpath)
    assert child("register", proxy.url, out, jpath).returncode == 0
    asyncio.run(CredentialStore(out).forget_private_key(board(1).thing_name))
    crashed = child("register", proxy.url, out, jpath, crash_after="cert-revoked")
    assert crashed.returncode == -signal.SIGKILL
    assert_no_orphan(iot, out, journal)
    repaired = child("reconcile", proxy.url, out, jpath)
    assert repaired.returncode == 0 and "revoked and deleted" in repaired.stdout
    assert certificates(iot) == []  # the replacement it began is finished
    assert_no_orphan(iot, out, journal)
    assert child("register", proxy.url, out, jpath).returncode == 0
    certs = certificates(iot)
    assert len(certs) == 1 and certs[0]["status"] == "ACTIVE"
    assert thing_certificates(iot, board(1).thing_name) == [certs[0]["certificateId"]]
