"""The station under soak: `station run` as systemd runs it (started, SIGKILLed, started
again), its log read as it grows, its ledger read while it runs, and its station.toml.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.soak_aws import REGION, registrar_toml
from benchmarks.soak_plan import SoakConfig

STOP_TIMEOUT = 120.0
PORT_LINE = re.compile(r"port (added|removed): (\S+)")


class StationProcess:
    """`station run` as systemd would run it: started, killed, started again."""

    def __init__(self, config: Path, state: Path, env: dict[str, str]) -> None:
        self.config = config
        self.state = state
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.started_at = 0.0
        self.log_offset = 0
        self.exits: list[dict[str, Any]] = []
        self.kills = 0

    @property
    def log_path(self) -> Path:
        return self.state / "station.log"

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = (self.state.parent / "station.out").open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "station", "run", "--config", str(self.config),
                 "--headless"], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, cwd=str(self.config.parent))
        finally:
            out.close()
        self.generation += 1
        self.started_at = time.time()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self, expected: bool) -> int | None:
        """If it exited: note it and forget the process; returns the code."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.exits.append({"generation": self.generation, "code": code, "expected": expected,
                           "at": round(time.time(), 1)})
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills += 1
        self.reap(expected=True)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        return self.reap(expected=True)

    def rss_kb(self) -> int | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None


class LogWatch:
    """Reads the station's log as it grows: which ports the running station has seen."""

    def __init__(self, station: StationProcess) -> None:
        self.station = station
        self.generation = 0
        self.offset = 0
        self.ports: dict[str, str] = {}  # port -> "added" | "removed", this process
        self.reconciled = 0
        self.interrupted = 0

    def poll(self) -> None:
        if self.generation != self.station.generation:
            self.generation = self.station.generation
            self.offset = self.station.log_offset
            self.ports = {}
        path = self.station.log_path
        if not path.exists():
            return
        with path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            m = PORT_LINE.search(line)
            if m:
                self.ports[m.group(2)] = m.group(1)
            elif "reconcile: " in line:
                self.reconciled += 1
            elif "was interrupted by the last stop" in line:
                self.interrupted += 1

    def saw_removed(self, port: str) -> bool:
        return self.ports.get(port) != "added"


class LedgerPoll:
    """Read-only looks at the station's ledger while it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def jobs_since(self, since: float) -> list[dict[str, Any]] | None:
        if not self.path.exists():
            return []
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error:
            return None
        try:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT job_id, port, mac, result, error, failed_stage, "
                                "started_at FROM jobs WHERE started_at >= ? ORDER BY "
                                "started_at, rowid", (since,))
            return [dict(r) for r in rows]
        except sqlite3.Error:
            return None  # a checkpoint in progress, a locked moment: look again next poll
        finally:
            conn.close()


def count_events(ledger: Path, kind: str | None) -> int:
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)
    try:
        if kind is None:
            return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
        return int(conn.execute("SELECT count(*) FROM events WHERE kind = ?",
                                (kind,)).fetchone()[0])
    finally:
        conn.close()



def write_config(cfg: SoakConfig, flasher_args: Path, proxy_url: str,
                 central: str = "") -> Path:
    timeouts = "\n".join(f"{k} = {v}" for k, v in cfg.timeouts.items())
    text = f"""\
# Written by benchmarks/soak.py
[station]
name = "soak"
state_dir = "state"
max_parallel = {cfg.slots}

[ports]
watch = [{json.dumps(str(cfg.workdir / 'rig' / 'pci-*'))}]
baud = 921600
rescan_interval = 0.5
# Bridge boards only, and the operator swaps a board 0.5 s after its final row: on a
# pty the station cannot see the bridge's USB vendor id (it would on a real rig), so the
# same-board rule for ports that re-enumerate after a reset is off for this line.
reenumerate_window = 0

[firmware]
chip = "esp32"
flasher_args = {json.dumps(str(flasher_args))}

[identity]
thing_name = "soak-{{mac}}"

[worker]
retries = {cfg.retries}
retry_delay = 1.0
drain_timeout = 60.0

[worker.timeouts]
{timeouts}

{registrar_toml(proxy_url, "soak-device", 'thing_group = "soak-lot"' + chr(10) +
                'max_attempts = 10')}

[credentials]
out_dir = "certs_out"
partition = "nvs"
namespace = "station"
"""
    if central:
        text += f'\n[ledger]\ncentral = "{central}"\n'
    path = cfg.workdir / "station.toml"
    path.write_text(text)
    return path


def aws_env(workdir: Path) -> dict[str, str]:
    """Dummy credentials for moto; the host's ~/.aws is never read."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION=REGION, AWS_CONFIG_FILE=str(workdir / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(workdir / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true", PYTHONUNBUFFERED="1")
    return env
