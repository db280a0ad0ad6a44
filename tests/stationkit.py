"""Helpers for end-to-end tests of `station run` against a moto server (tests/test_station_aws.py).

A `AwsLine` is one station on a rig of virtual boards, registering with AWS IoT through
an endpoint the test chooses (moto, or a proxy in front of it): it writes the
station.toml, runs the real `station` command in a subprocess with dummy AWS credentials
(never the host's), and reads back what the station left: ledger rows, certs_out, and
each board's flash. `Aws` looks at the server side with boto3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from benchmarks.soak_aws import POLICY, REGION, registrar_toml
from station.flash import FirmwareBundle
from station.identity import CRASH_ENV
from station.sim import PluggedBoard, Rig
from tests.eventlog import event_log
from tests.registrar.awsproxy import AwsProxy

STATION = "line-1"
THING_TEMPLATE = "line1-{mac}"
GROUP = "lot-42"
RUN_TIMEOUT = 240.0
"""`station run` with up to 16 unthrottled boards; generous, teammates share the cores."""
COMMAND_TIMEOUT = 60.0
"""`station check`, `station ledger`, `station reconcile`."""


def aws_registrar(endpoint: str, more: str = "") -> str:
    """[registrar] for AWS IoT at `endpoint`; `more`: lines for [registrar.aws]."""
    return registrar_toml(endpoint, "station-device", more)


def aws_env(home: Path, *, credentials: bool = True) -> dict[str, str]:
    """The station's environment: dummy credentials (or none), nothing from the host's AWS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != CRASH_ENV}
    env.update(AWS_CONFIG_FILE=str(home / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true")
    if credentials:
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    return env


def mac_hex(board: PluggedBoard) -> str:
    """The MAC as the station writes it: 12 lower-case hex digits."""
    return board.mac.replace(":", "")


def thing_of(board: PluggedBoard) -> str:
    return THING_TEMPLATE.format(mac=mac_hex(board))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class AwsLine:
    """A station (config, state, certs_out) on a rig, registering with AWS at `endpoint`."""

    root: Path
    rig: Rig
    firmware: Path  # flasher_args.json
    bundle: FirmwareBundle
    endpoint: str
    aws: dict[str, Any] = field(default_factory=dict)  # extra [registrar.aws] keys
    keep_private_keys: bool = True
    env: dict[str, str] = field(default_factory=dict)
    extra: str = ""  # more TOML: sections after [credentials] (e.g. [registry])

    _proc: subprocess.Popen[bytes] | None = None
    _out: Path = Path()

    def __post_init__(self) -> None:
        if not self.env:
            self.env = aws_env(self.root)
        self.write_config()

    def __enter__(self) -> AwsLine:
        return self

    def __exit__(self, *_: object) -> None:
        """Kill a station a failed test left running."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=COMMAND_TIMEOUT)

    @property
    def config(self) -> Path:
        return self.root / "station.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def certs_out(self) -> Path:
        return self.root / "certs_out"

    def write_config(self, **aws: Any) -> Path:
        """station.toml for this line; `aws` overrides [registrar.aws] keys."""
        section: dict[str, Any] = {
            "region": REGION, "endpoint_url": self.endpoint, "policy_name": "station-device",
            "policy_document": str(POLICY), "thing_group": GROUP, "key_source": "csr",
            "max_attempts": 10, **self.aws, **aws}
        aws_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in section.items())
        text = f"""\
[station]
name = "{STATION}"
state_dir = "state"
max_parallel = 16

[ports]
watch = [{json.dumps(str(self.rig.directory / "pci-*"))}]
rescan_interval = 0.5
# bridge boards re-plugged right after done: on a pty the station cannot see the bridge
# (a real one has a USB vendor id), so the rule for re-enumerating ports is off
reenumerate_window = 0

[firmware]
chip = "esp32"
flasher_args = {json.dumps(str(self.firmware))}

[identity]
thing_name = "{THING_TEMPLATE}"

[worker]
retry_delay = 0.2

[registrar]
kind = "aws-iot"

[registrar.aws]
{aws_lines}

[credentials]
out_dir = "certs_out"
partition = "nvs"
namespace = "station"
keep_private_keys = {json.dumps(self.keep_private_keys)}
{self.extra}"""
        self.config.write_text(text)
        return self.config

    def command(self, *args: str, env: dict[str, str] | None = None,
                timeout: float = COMMAND_TIMEOUT) -> Result:
        """`station <args> --config station.toml`, outputs in files (no pipe to fill)."""
        out, err = self.root / "out.txt", self.root / "err.txt"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.run(
                [sys.executable, "-m", "station", *args, "--config", str(self.config)],
                cwd=self.root, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
                stdout=o, stderr=e, timeout=timeout, check=False)
        return Result(proc.returncode, out.read_text(errors="replace"),
                      err.read_text(errors="replace"))

    def run(self, boards: int, *args: str, env: dict[str, str] | None = None,
            timeout: float = RUN_TIMEOUT) -> Result:
        """`station run --headless --exit-after <boards>`, to its end."""
        return self.command("run", "--headless", "--exit-after", str(boards), *args, env=env,
                            timeout=timeout)

    def start(self, boards: int, *args: str) -> None:
        """`station run --headless --exit-after <boards>` in the background."""
        self._out = self.root / "run.out"
        with self._out.open("wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "station", "run", "--config", str(self.config),
                 "--headless", "--exit-after", str(boards), *args],
                cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)

    def wait(self, timeout: float = RUN_TIMEOUT) -> Result:
        """The background station's end (its stdout and stderr together)."""
        assert self._proc is not None
        returncode = self._proc.wait(timeout=timeout)
        self._proc = None
        return Result(returncode, self._out.read_text(errors="replace"), "")

    def wait_for(self, what: str, ready: Callable[[], bool],
                 timeout: float = RUN_TIMEOUT) -> None:
        """Poll the station's outputs until `ready()`; fails if the station exits first."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"station: no {what} after {timeout:g}s")
            try:
                code = self._proc.wait(timeout=0.05)  # the pause between polls
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(f"station exited with {code} before {what}:\n"
                                 f"{self._out.read_text(errors='replace')}")

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The station's event log (state/events.jsonl) lines of one kind."""
        return event_log(self.state / "events.jsonl", kind)

    def log_count(self, text: str) -> int:
        """How often `text` occurs in the station's log (state/station.log)."""
        path = self.state / "station.log"
        return path.read_text(errors="replace").count(text) if path.exists() else 0

    def replug(self, board: PluggedBoard) -> PluggedBoard:
        """Pull `board` out and plug it into the same socket again (its flash kept)."""
        removed = f"port removed: {board.port}"
        before = self.log_count(removed)
        self.rig.unplug(board)
        if self._proc is not None and self._proc.poll() is None:
            # a link re-made onto a reused pty could look unchanged: let the station see
            # the port go before it comes back
            self.wait_for(f"removal of {board.port}",
                          lambda: self.log_count(removed) > before)
        return self.rig.plug(chip=board.chip, mac=board.mac, index=board.index)

    def ledger(self) -> list[dict[str, Any]]:
        """`station ledger --format json`, oldest job first."""
        result = self.command("ledger", "--format", "json")
        assert result.returncode == 0, result
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    def flash(self, board: PluggedBoard) -> bytes:
        return self.rig.flash(board)


class Aws:
    """The server's side, through boto3 (straight to moto, never through a test proxy)."""

    def __init__(self, client: Any) -> None:
        self.iot = client

    def certificates(self) -> dict[str, dict[str, Any]]:
        """certificate id -> {certificateId, certificateArn, status, ...}."""
        out: dict[str, dict[str, Any]] = {}
        for page in self.iot.get_paginator("list_certificates").paginate():
            for cert in page["certificates"]:
                out[cert["certificateId"]] = cert
        return out

    def active(self) -> dict[str, dict[str, Any]]:
        return {cid: c for cid, c in self.certificates().items() if c["status"] == "ACTIVE"}

    def things(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for page in self.iot.get_paginator("list_things").paginate():
            for thing in page["things"]:
                out[thing["thingName"]] = thing
        return out

    def principals(self, thing: str) -> list[str]:
        """Certificate ids attached to `thing`."""
        reply = self.iot.list_thing_principals(thingName=thing)
        return [p.rsplit("/", 1)[-1] for p in reply["principals"]]

    def owners(self, arn: str) -> list[str]:
        """Things a certificate is attached to."""
        return list(self.iot.list_principal_things(principal=arn)["things"])

    def policies(self, arn: str) -> list[str]:
        reply = self.iot.list_attached_policies(target=arn)
        return [p["policyName"] for p in reply["policies"]]

    def group(self, name: str) -> set[str]:
        out: set[str] = set()
        for page in self.iot.get_paginator("list_things_in_thing_group").paginate(
                thingGroupName=name):
            out |= set(page["things"])
        return out

    def certificate_pem(self, cid: str) -> str:
        reply = self.iot.describe_certificate(certificateId=cid)
        return str(reply["certificateDescription"]["certificatePem"])


@contextmanager
def aws_client(url: str) -> Iterator[Aws]:
    session = boto3.session.Session(aws_access_key_id="testing",
                                    aws_secret_access_key="testing", region_name=REGION)
    client = session.client("iot", endpoint_url=url)
    try:
        yield Aws(client)
    finally:
        client.close()


class GatedProxy(AwsProxy):
    """The proxy, holding the first call of `gate` until the test sets `release`.

    `reached` is set when the call arrives: the station is then waiting on AWS, at a
    known step of a registration, for as long as the test likes.
    """

    def __init__(self, target: str, gate: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.gate = gate
        self.reached = threading.Event()
        self.release = threading.Event()

    def _decide(self, op: str, path: str = "") -> str | None:
        if op == self.gate and not self.reached.is_set():
            self.reached.set()
            self.release.wait(timeout=RUN_TIMEOUT)  # on the proxy's request thread
        return super()._decide(op, path)

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        super().__exit__(*exc)
