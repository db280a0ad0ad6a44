"""Stations that ship to a central PostgreSQL, for tests/test_central*.py.

A `CentralLine` is one `station run` (a real subprocess) on its own rig of virtual boards
(unthrottled: timing does not matter here), with `[ledger] central` pointing at the
test's PostgreSQL database and the password in PGPASSWORD. It reads back what a person
would: `station ledger` (local), `station ledger --central`, `station board`, the
metrics endpoint and the station's own output.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from station.sim import PluggedBoard, Rig
from tests.eventlog import event_log
from tests.pgkit import free_port, pg_env

RUN_TIMEOUT = 240.0
COMMAND_TIMEOUT = 60.0


def mac_hex(board: PluggedBoard) -> str:
    return board.mac.replace(":", "")


@dataclass
class CentralLine:
    root: Path
    name: str
    firmware: Path  # flasher_args.json
    central: str  # URL without password
    rig: Rig
    extra: str = ""  # more TOML (sections after [ledger])
    ports: str = ""  # more [ports] keys (e.g. remote = [...])
    watch: str = "pci-*"  # the [ports] watch glob inside the rig's folder
    ledger_extra: str = ""  # more [ledger] keys
    identity: str = ""  # more [identity] keys
    registrar: str = '[registrar]\nkind = "none"\n'
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=pg_env)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.metrics_port:
            self.metrics_port = free_port()
        self.write_config()

    @property
    def config(self) -> Path:
        return self.root / "station.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def write_config(self) -> None:
        self.config.write_text(f"""\
[station]
name = "{self.name}"
state_dir = "state"
[ports]
watch = [{json.dumps(str(self.rig.directory / self.watch))}]
rescan_interval = 0.2
{self.ports}
[firmware]
chip = "esp32"
flasher_args = {json.dumps(str(self.firmware))}
[identity]
thing_name = "{self.name}-{{mac}}"
{self.identity}
[worker]
retry_delay = 0.2
{self.registrar}
[credentials]
out_dir = "certs_out"
[ledger]
central = {json.dumps(self.central)}
{self.ledger_extra}
[metrics]
listen = "127.0.0.1:{self.metrics_port}"
{self.extra}""")

    # -- running -----------------------------------------------------------------------

    def start(self, *args: str, env: dict[str, str] | None = None) -> None:
        with (self.root / "station.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "station", "run", "--config", str(self.config),
                 "--headless", *args], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**self.env, **(env or {})}, cwd=self.root)

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not exit within {timeout}s:\n{self.output()[-3000:]}")
        self.proc = None
        return code

    def stop(self) -> int:
        """SIGTERM (the graceful stop: the replicator ships what is left) and wait."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(COMMAND_TIMEOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def output(self) -> str:
        path = self.root / "station.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def until(self, what: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) before {what}:\n"
                            f"{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: timed out after {timeout}s waiting for {what}:\n"
                            f"{self.output()[-3000:]}")
            time.sleep(0.05)  # polling interval of a deadline-bound wait

    def events(self) -> list[dict[str, Any]]:
        return event_log(self.state / "events.jsonl")

    def finished(self) -> int:
        return sum(1 for e in self.events() if e["kind"] == "JobFinished")

    # -- reading back ------------------------------------------------------------------

    def command(self, *args: str,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "station", *args, "--config", str(self.config)],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
            env={**self.env, **(env or {})}, cwd=self.root, stdin=subprocess.DEVNULL)

    def local_jobs(self) -> list[dict[str, Any]]:
        out = self.command("ledger", "--format", "json")
        assert out.returncode == 0, out.stderr
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def central_jobs(self, *args: str) -> list[dict[str, Any]]:
        out = self.command("ledger", "--central", "--format", "json", *args)
        assert out.returncode == 0, out.stderr
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def scrape(self) -> dict[str, float]:
        """The metrics endpoint, parsed: `name{labels}` -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return parse_metrics(text)

    def try_scrape(self) -> dict[str, float] | None:
        try:
            return self.scrape()
        except OSError:
            return None


def parse_metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def local_events(state: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def env_without_password() -> dict[str, str]:
    return {k: v for k, v in pg_env().items() if k != "PGPASSWORD"}


__all__ = ["CentralLine", "mac_hex", "parse_metrics", "local_events"]


@contextlib.contextmanager
def central_lines(root: Path, firmware: Path, central: str,
                  first_seed: int) -> Iterator[Callable[..., CentralLine]]:
    """`make(name, **kwargs)`: a station named `name` on its own unthrottled virtual rig,
    shipping to `central`; every line made is killed and its rig closed at the end."""
    lines: list[CentralLine] = []

    def make(name: str, **kwargs: Any) -> CentralLine:
        rig = Rig(root / f"rig-{name}", seed=first_seed + len(lines), throttle=False,
                  flash_timing=False)
        line = CentralLine(root=root / name, name=name, firmware=firmware, central=central,
                           rig=rig, **kwargs)
        lines.append(line)
        return line

    try:
        yield make
    finally:
        for line in lines:
            line.kill()
            line.rig.close()
