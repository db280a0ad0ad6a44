"""Soak: an unattended night on a virtual rig, with faults, crashes and a final audit.

    .venv/bin/python benchmarks/soak.py --boards 500          # `make soak`
    .venv/bin/python benchmarks/soak.py --boards 32 --faults-per-kind 2 --kill-every 16 \
        --no-throttle --outage-s 8 --disk-full-s 4             # what tests/test_soak.py runs

What runs where:
* the station is the unchanged `station run --config ... --headless`, a subprocess, with
  the `aws-iot` registrar pointed at a faulty loopback proxy (benchmarks/soak_aws.py) in
  front of a moto server (its own subprocess);
* the virtual boards are a `Rig` in this (the harness's) process: like an operator it
  keeps 16 slots busy, unplugging each board once the ledger has its final row and
  plugging a new one (new MAC, from the seed); a board that fell out (unplug fault) is
  re-seated once, without the fault;
* certs_out is a small tmpfs the harness fills up for a while (benchmarks/soak_disk.py);
* every K boards the station is SIGKILLed and started again, as systemd would;
* the station ships its ledger to a central PostgreSQL (benchmarks/soak_pg.py: the
  distro's server in a throw-away cluster), which the harness stops for a while
  (`pg_outage_s`) as it does AWS; at the end the checker holds PostgreSQL to the local
  ledger, event by event and job by job.

How the harness knows a board is final: it polls the ledger (read-only SQLite; WAL lets
it read while the station writes) for the job on the board's port since it was plugged.
A job closed by `close_interrupted` after a SIGKILL is not final for the board: the
restarted station takes the board again. Before plugging a new board into a slot the
harness waits (with a deadline) until the station's log says it saw the old port go,
since a new pty may reuse the old one's device node.

At the end the station gets SIGTERM, the invariant checker (benchmarks/invariants.py)
audits ledger, flash dumps, certs_out and moto, and a JSON report is written to
benchmarks/results/soak-<n>.json. Exit status 0 only with 0 violations and every board
that no fault touched done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.invariants import (  # noqa: E402
    Plug,
    RssSample,
    Violation,
    check_all,
    read_jobs,
)
from benchmarks.soak_aws import FaultyProxy, moto_server  # noqa: E402
from benchmarks.soak_disk import FullableDisk  # noqa: E402
from benchmarks.soak_pg import PASSWORD, Cluster, find_bindir  # noqa: E402
from station.config import load  # noqa: E402
from station.demo import make_demo_firmware  # noqa: E402
from station.flash import load_firmware  # noqa: E402
from station.sim import Faults, Rig  # noqa: E402

POLL = 0.25
"""Seconds between two looks at the ledger and the log (a polling interval)."""
ACK_TIMEOUT = 30.0
"""How long the station may take to notice a board was pulled out."""
STOP_TIMEOUT = 120.0
REGION = "eu-west-1"
POLICY = ROOT / "config" / "aws-iot-policy.json"
SIM_FAULTS = ("unplug_mid_flash", "mute", "corrupt", "slow_flash", "not_esp")
INTERRUPTED = "station stopped during"
PORT_LINE = re.compile(r"port (added|removed): (\S+)")


@dataclass
class SoakConfig:
    boards: int = 500
    slots: int = 16
    seed: int = 1
    workdir: Path = ROOT / "benchmarks" / "results" / "soak-work"
    throttle: bool = True  # serial line rate and flash timing of real boards
    app_size: int = 1_000_000  # the demo build's 1.5 MB app makes the 500-board run 50% longer
    fault_share: float = 0.15  # share of boards with a board fault (when per_kind unset)
    faults_per_kind: int | None = None  # exactly this many boards of each board fault
    kill_every: int = 60  # SIGKILL the station every K settled boards (0: never)
    aws_throttle: float = 0.05  # share of AWS calls answered ThrottlingException
    aws_errors: float = 0.02  # share answered 5xx (half after AWS did the work)
    outage_at: float = 0.35  # AWS goes away when this share of boards is settled
    outage_s: float = 60.0
    disk_full_at: float = 0.7  # certs_out fills up when this share is settled
    disk_full_s: float = 20.0
    central: bool = True  # ship to a central PostgreSQL (skipped with a note if none)
    pg_outage_at: float = 0.5  # PostgreSQL goes away when this share is settled
    pg_outage_s: float = 60.0
    restart_delay: float = 5.0  # RestartSec of config/station.service
    swap_s: float = 0.5  # an operator's hand: a slot stays empty at least this long
    retries: int = 2
    timeouts: dict[str, float] = field(default_factory=lambda: {
        "connect": 20.0, "identify": 15.0, "register": 150.0, "flash": 240.0,
        "verify": 60.0, "reset": 15.0})
    deadline_s: float = 4 * 3600.0
    keep_work: bool = True

    def stuck_budget(self) -> float:
        """The longest a board may take (station up) before its slot counts as stuck."""
        return sum(self.timeouts.values()) * (self.retries + 1) + self.retries * 1.0 + 60.0


@dataclass
class PlugRecord:
    board: int  # 0..N-1
    mac: str  # 12 hex digits
    index: int  # hub port
    port: str
    fault: str | None
    faults: Faults
    plugged_at: float
    reseat: bool = False
    down_s: float = 0.0  # time the station was not running while this board waited
    settled_at: float | None = None
    unplugged_at: float | None = None
    gone_at: float | None = None  # the rig pulled it (unplug fault)
    result: str | None = None
    error: str | None = None
    failed_stage: str | None = None
    hit_by: set[str] = field(default_factory=set)
    stuck: bool = False


# -- parts ------------------------------------------------------------------------------


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

[registrar]
kind = "aws-iot"

[registrar.aws]
region = "{REGION}"
endpoint_url = "{proxy_url}"
policy_name = "soak-device"
policy_document = {json.dumps(str(POLICY))}
thing_group = "soak-lot"
max_attempts = 10

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


def fault_plan(cfg: SoakConfig) -> list[str | None]:
    """Which board fault each board gets (None: a healthy board); deterministic."""
    rng = random.Random(cfg.seed * 7919)
    plan: list[str | None] = [None] * cfg.boards
    if cfg.faults_per_kind is not None:
        kinds = [k for k in SIM_FAULTS for _ in range(cfg.faults_per_kind)]
    else:
        count = round(cfg.boards * cfg.fault_share)
        kinds = [SIM_FAULTS[i % len(SIM_FAULTS)] for i in range(count)]
    # Spread over the run, never in the first slot-full (the warm-up has its own figures).
    first = min(cfg.slots, max(0, cfg.boards - len(kinds)))
    where = rng.sample(range(first, cfg.boards), min(len(kinds), cfg.boards - first))
    rng.shuffle(kinds)
    for board, kind in zip(where, kinds, strict=False):
        plan[board] = kind
    return plan


def faults_for(kind: str | None, rng: random.Random, app_size: int) -> Faults:
    if kind == "unplug_mid_flash":  # bytes from the host: the stub, then the images
        return Faults(unplug_after=rng.randint(40_000, max(50_000, int(app_size * 0.5))))
    if kind == "mute":
        return Faults(mute=True)
    if kind == "corrupt":
        return Faults(corrupt=rng.choice((0.0005, 0.001, 0.002)))
    if kind == "slow_flash":
        return Faults(slow_flash=3.0)
    if kind == "not_esp":
        return Faults(garbage=True)
    return Faults()


def failure_reason(result: str | None, stage: str | None, error: str | None) -> str:
    """A stable bucket for the report: result@stage: what, without ids and numbers."""
    text = error or ""
    for pattern, name in (
            (r"No serial data received", "no serial data (mute)"),
            (r"Invalid head of packet|not an ESP|serial noise", "not an ESP"),
            (INTERRUPTED, "station killed; board gone before restart"),
            (r"cannot write|No space left|ENOSPC|cannot create", "certs_out not writable"),
            (r"cannot reach AWS|Unreachable", "AWS unreachable"),
            (r"[Tt]hrottl", "AWS throttling"),
            (r"timed out", "timeout"),
            (r"aborted", "aborted")):
        if re.search(pattern, text):
            what = name
            break
    else:
        text = re.sub(r"/\S+", "PATH", text)  # ports and files differ per board
        what = re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "#", text)[:80] or "-"
    return f"{result}@{stage or '-'}: {what}"


# -- the run ----------------------------------------------------------------------------


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.plan = fault_plan(cfg)
        self.rng = random.Random(cfg.seed)
        self.records: list[PlugRecord] = []
        self.slots: dict[int, PlugRecord | None] = dict.fromkeys(range(cfg.slots))
        self.free_since: dict[int, float] = dict.fromkeys(range(cfg.slots), 0.0)
        self.next_board = 0
        self.reseat: list[PlugRecord] = []
        self.violations: list[Violation] = []
        self.rss: list[RssSample] = []
        self.faults: Counter[str] = Counter()
        self.rig_events: list[dict[str, Any]] = []
        self.windows: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.pg: Cluster | None = None

    @property
    def settled(self) -> int:
        return sum(1 for r in self.records if r.settled_at is not None)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.workdir.exists():
            shutil.rmtree(cfg.workdir)
        cfg.workdir.mkdir(parents=True)
        started = time.time()
        flasher_args = make_demo_firmware(cfg.workdir / "firmware", chip="esp32",
                                          app_size=cfg.app_size, seed=cfg.seed)
        disk = FullableDisk(cfg.workdir / "certs_out")
        with contextlib.ExitStack() as stack:
            if disk.mount():
                stack.callback(self._save_and_unmount, disk)
            else:
                self.notes.append(f"disk-full fault not injected: {disk.unavailable}")
            url = stack.enter_context(moto_server(str(cfg.workdir / "moto.log")))
            proxy = stack.enter_context(FaultyProxy(
                url, throttle_share=cfg.aws_throttle, error_share=cfg.aws_errors,
                seed=cfg.seed))
            central = self._start_pg(stack)
            config_path = write_config(cfg, flasher_args, proxy.url, central)
            config = load(config_path)
            bundle = load_firmware(config.firmware)
            station = StationProcess(config_path, cfg.workdir / "state",
                                     {**aws_env(cfg.workdir), "PGPASSWORD": PASSWORD})
            stack.callback(self._ensure_stopped, station)
            rig = stack.enter_context(Rig(cfg.workdir / "rig", seed=cfg.seed,
                                          throttle=cfg.throttle, flash_timing=cfg.throttle,
                                          on_event=self.rig_events.append))
            self._loop(station, rig, proxy, disk)
            self._end_pg_outage(station)
            code = station.stop()
            if code != 0:
                self.violations.append(Violation("exit", "station",
                                                  f"SIGTERM at the end: exit {code}"))
            rig.close()  # every board out, every flash dumped
            proxy.up()  # the audit's view of AWS is moto itself, but be tidy
            import boto3

            iot = boto3.session.Session(
                aws_access_key_id="testing", aws_secret_access_key="testing",
                region_name=REGION).client("iot", endpoint_url=url)
            try:
                found, facts = check_all(
                    ledger=cfg.workdir / "state" / "ledger.sqlite3",
                    dumps=cfg.workdir / "rig", certs_out=cfg.workdir / "certs_out",
                    bundle=bundle, partition="nvs", namespace="station",
                    plugs=[Plug(r.mac, r.port, r.plugged_at, r.unplugged_at)
                           for r in self.records],
                    iot=iot, stuck=self.violations, rss=self.rss)
            finally:
                iot.close()
            if self.pg is not None:
                from benchmarks.invariants import check_central

                more, facts["central"] = check_central(
                    cfg.workdir / "state" / "ledger.sqlite3", central, "soak", PASSWORD)
                found += more
            self.faults.update({f"aws_{k}": v for k, v in proxy.injected.items()
                                if k != "dropped"})
            self.windows.setdefault("aws_outage", {})["calls_dropped"] = \
                proxy.injected.get("dropped", 0)
            self.windows.setdefault("disk_full", {})["fills"] = disk.fills
            return self._report(started, station, found, facts)

    def _start_pg(self, stack: contextlib.ExitStack) -> str:
        """The central PostgreSQL, or "" with a note if this machine has no server."""
        bindir = find_bindir() if self.cfg.central else None
        if bindir is None:
            if self.cfg.central:
                self.notes.append("central ledger not soaked: no PostgreSQL server binaries")
            return ""
        self.pg = Cluster(bindir)
        stack.callback(self.pg.destroy)
        self.pg.init()
        self.pg.sql("CREATE DATABASE factory OWNER station")
        return self.pg.url("factory")

    def _end_pg_outage(self, station: StationProcess) -> None:
        """PostgreSQL back if its outage is still on; then the station must catch up."""
        if self.pg is None:
            return
        w = self.windows.get("pg_outage", {})
        if "start" in w and "end" not in w:
            self.pg.start()
            w["end"] = time.time()
            w["seconds"] = round(w["end"] - w["start"], 1)
        ledger = self.cfg.workdir / "state" / "ledger.sqlite3"
        deadline = time.monotonic() + 60.0
        started = time.monotonic()
        while time.monotonic() < deadline and station.alive():
            local = _count_events(ledger, None)
            shipped = self.pg.sql("SELECT coalesce(max(shipped_seq), 0) FROM stations",
                                  database="factory")[0][0]
            if shipped == local:
                w["caught_up_after_end_s"] = round(time.monotonic() - started, 1)
                return
            time.sleep(POLL)  # the polling interval of a deadline-bound wait
        self.violations.append(Violation("central", "soak", "the central ledger did not "
                                         "catch up within 60 s after the run"))

    def _save_and_unmount(self, disk: FullableDisk) -> None:
        """Keep certs_out for a look afterwards (the tmpfs goes with the unmount)."""
        saved = self.cfg.workdir / "certs_out.saved"
        with contextlib.suppress(OSError):
            disk.free()
            if self.cfg.keep_work:
                shutil.copytree(disk.mountpoint, saved, symlinks=True)
        disk.unmount()

    @staticmethod
    def _ensure_stopped(station: StationProcess) -> None:
        if station.alive():
            assert station.proc is not None
            station.proc.kill()
            station.proc.wait(timeout=30)

    # -- the operator, the supervisor and the saboteur --------------------------------

    def _loop(self, station: StationProcess, rig: Rig, proxy: FaultyProxy,
              disk: FullableDisk) -> None:
        cfg = self.cfg
        ledger = LedgerPoll(cfg.workdir / "state" / "ledger.sqlite3")
        log = LogWatch(station)
        since = time.time()
        deadline = time.monotonic() + cfg.deadline_s
        next_kill = cfg.kill_every or None
        restart_at: float | None = time.monotonic()
        last_rss = last_progress = 0.0
        last_tick = time.monotonic()
        while True:
            now_m = time.monotonic()
            now = time.time()
            tick, last_tick = now_m - last_tick, now_m
            if now_m > deadline:
                self.violations.append(Violation("stuck", "soak",
                                                 f"the soak outlived its {cfg.deadline_s}s"))
                return
            # systemd: a station that exited is started again after RestartSec
            if station.proc is not None and station.reap(expected=False) is not None:
                restart_at = now_m + cfg.restart_delay
            if station.proc is None and restart_at is not None and now_m >= restart_at:
                station.start()
                restart_at = None
            log.poll()
            if station.alive() and now_m - last_rss >= 1.0:
                rss = station.rss_kb()
                if rss is not None and station.proc is not None:
                    self.rss.append(RssSample(now, station.proc.pid, self.settled, rss))
                last_rss = now_m
            self._windows(now, proxy, disk)
            jobs = ledger.jobs_since(since)
            if jobs is not None:
                self._settle(jobs, station, rig, now, tick)
            boards_settled = sum(1 for r in self.records
                                 if r.settled_at is not None and not r.reseat)
            if next_kill is not None and next_kill <= boards_settled < cfg.boards \
                    and station.alive():
                in_flight = [r for r in self.records if r.settled_at is None]
                if in_flight:
                    for r in in_flight:
                        r.hit_by.add("sigkill")
                    station.kill()
                    self.faults["sigkill"] += 1
                    restart_at = time.monotonic() + cfg.restart_delay
                    next_kill += cfg.kill_every
            self._operator(rig, log, station, now)
            if now_m - last_progress >= 30.0:
                last_progress = now_m
                print(f"soak: {self.settled} settled, {self.next_board}/{cfg.boards} plugged, "
                      f"{station.kills} kills, {len(self.violations)} violations so far",
                      file=sys.stderr, flush=True)
            if self.next_board >= cfg.boards and not self.reseat and \
                    all(r.unplugged_at is not None for r in self.records):
                return
            time.sleep(POLL)  # the polling interval of a deadline-bound loop

    def _windows(self, now: float, proxy: FaultyProxy, disk: FullableDisk) -> None:
        cfg = self.cfg
        progress = self.settled / max(1, cfg.boards)
        for name, at, length in (("aws_outage", cfg.outage_at, cfg.outage_s),
                                 ("disk_full", cfg.disk_full_at, cfg.disk_full_s),
                                 ("pg_outage", cfg.pg_outage_at, cfg.pg_outage_s)):
            if length <= 0 or (name == "disk_full" and not disk.mounted) or \
                    (name == "pg_outage" and self.pg is None):
                continue
            w = self.windows.setdefault(name, {})
            if "start" not in w and progress >= at:
                w["start"] = now
                if name == "aws_outage":
                    proxy.down()
                elif name == "pg_outage":
                    assert self.pg is not None
                    self.pg.stop()
                else:
                    w["bytes_filled"] = disk.fill()
                self.faults[name] += 1
            if "start" in w and "end" not in w:
                for r in self.records:
                    # a PostgreSQL outage must not touch any board: not an excuse either
                    if r.settled_at is None and name != "pg_outage":
                        r.hit_by.add(name)
                if now - w["start"] >= length:
                    w["end"] = now
                    w["seconds"] = round(now - w["start"], 1)
                    if name == "aws_outage":
                        proxy.up()
                    elif name == "pg_outage":
                        assert self.pg is not None
                        self.pg.start()
                    else:
                        disk.free()

    def _settle(self, jobs: list[dict[str, Any]], station: StationProcess, rig: Rig,
                now: float, tick: float) -> None:
        by_port: dict[str, list[dict[str, Any]]] = {}
        for job in jobs:
            by_port.setdefault(job["port"], []).append(job)
        gone = {e["mac"].replace(":", ""): e for e in self.rig_events
                if e.get("event") == "unplugged" and e.get("reason") == "fault"}
        for r in self.records:
            if r.settled_at is not None:
                continue
            if r.gone_at is None and r.mac in gone and not r.reseat:
                r.gone_at = now
            if not station.alive():
                r.down_s += tick
            mine = [j for j in by_port.get(r.port, []) if j["started_at"] >= r.plugged_at
                    and j["mac"] in (None, r.mac)]
            job = mine[-1] if mine else None
            if job is not None and job["result"] is not None:
                interrupted = (job["error"] or "").startswith(INTERRUPTED)
                board_gone_before_restart = r.gone_at is not None and \
                    station.alive() and station.started_at > r.gone_at
                if not interrupted or board_gone_before_restart:
                    r.settled_at = now
                    r.result, r.error = job["result"], job["error"]
                    r.failed_stage = job["failed_stage"]
                    continue
            waited = now - r.plugged_at - r.down_s
            if waited > self.cfg.stuck_budget():
                r.stuck = True
                r.settled_at = now
                r.result = "stuck"
                self.violations.append(Violation(
                    "stuck", r.mac, f"slot {r.index} ({r.port}) not final after {waited:.0f}s"
                                    f" (stage timeouts allow {self.cfg.stuck_budget():.0f}s); "
                                    f"last job: {job}"))

    def _operator(self, rig: Rig, log: LogWatch, station: StationProcess, now: float) -> None:
        cfg = self.cfg
        for index, r in self.slots.items():
            if r is not None and r.settled_at is not None:
                rig.unplug(index)  # idempotent: a board that fell out is already out
                r.unplugged_at = now
                self.slots[index] = None
                self.free_since[index] = now
                if r.fault == "unplug_mid_flash" and not r.reseat and r.result != "done":
                    self.reseat.append(r)  # the operator pushes the loose board back in
        for index, r in self.slots.items():
            if r is not None:
                continue
            if now - self.free_since[index] < cfg.swap_s:
                continue
            port = str(rig.directory / _port_name(index))
            if station.alive() and not log.saw_removed(port):
                if now - self.free_since[index] > ACK_TIMEOUT:
                    self.violations.append(Violation(
                        "stuck", port, f"the station did not see the unplug in {ACK_TIMEOUT}s"))
                    self.free_since[index] = now  # report once per ACK_TIMEOUT, keep going
                continue
            if self.reseat:
                old = self.reseat.pop(0)
                self._plug(rig, index, old.board, None, reseat_of=old)
            elif self.next_board < cfg.boards:
                board = self.next_board
                self.next_board += 1
                self._plug(rig, index, board, self.plan[board])

    def _plug(self, rig: Rig, index: int, board: int, fault: str | None,
              reseat_of: PlugRecord | None = None) -> None:
        faults = faults_for(fault, self.rng, self.cfg.app_size)
        mac = None if reseat_of is None else reseat_of.mac
        # Taken before the call: the station may see the port (and start its job) before
        # plug() returns to this thread.
        plugged_at = time.time()
        plugged = rig.plug(index=index, mac=mac, faults=faults)
        record = PlugRecord(board=board, mac=plugged.mac.replace(":", ""), index=index,
                            port=plugged.port, fault=fault, faults=faults,
                            plugged_at=plugged_at, reseat=reseat_of is not None)
        if fault is not None:
            record.hit_by.add(fault)
            self.faults[fault] += 1
        if reseat_of is not None:
            record.hit_by |= reseat_of.hit_by
            self.faults["reseat"] += 1
        self.records.append(record)
        self.slots[index] = record

    # -- the report -------------------------------------------------------------------

    def _report(self, started: float, station: StationProcess, violations: list[Violation],
                facts: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        ended = time.time()
        jobs = read_jobs(cfg.workdir / "state" / "ledger.sqlite3")
        by_mac: dict[str, list[PlugRecord]] = {}
        for r in self.records:
            by_mac.setdefault(r.mac, []).append(r)
        done = {mac for mac, rs in by_mac.items() if rs[-1].result in ("done", "skipped")}
        hit = {mac for mac, rs in by_mac.items() if any(r.hit_by for r in rs)}
        failed_by_reason: Counter[str] = Counter()
        for mac, rs in by_mac.items():
            if mac not in done:
                last = rs[-1]
                failed_by_reason[failure_reason(last.result, last.failed_stage,
                                                last.error)] += 1
        fault_free_not_done = sorted(set(by_mac) - hit - done)
        hit_by: Counter[str] = Counter()
        for mac in hit:
            for kind in set().union(*(r.hit_by for r in by_mac[mac])):
                hit_by[kind] += 1
        recovered = {mac for mac, rs in by_mac.items() if mac in done and
                     any(j["mac"] == mac and j["result"] not in ("done", "skipped")
                         for j in jobs)}
        retries = _count_events(cfg.workdir / "state" / "ledger.sqlite3", "Retrying")
        hours = (ended - started) / 3600
        curve = _thin([(s.boards_final, round(s.rss_kb / 1024, 1), s.pid) for s in self.rss],
                      60)
        report = {
            "passed": not violations and not fault_free_not_done,
            "config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in asdict(cfg).items()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(ended - started, 1),
            "boards": {
                "plugged": len(by_mac), "plugs": len(self.records), "done": len(done),
                "not_done": len(by_mac) - len(done), "hit_by_a_fault": len(hit),
                "hit_share": round(len(hit) / max(1, len(by_mac)), 3),
                "fault_free": len(set(by_mac) - hit),
                "fault_free_done": len((set(by_mac) - hit) & done),
                "hit_but_done": len(hit & done),
            },
            "boards_hit_by_kind": dict(sorted(hit_by.items())),
            "failed_by_reason": dict(failed_by_reason.most_common()),
            "faults_injected": dict(sorted(self.faults.items())),
            "fault_windows": {k: {kk: (round(vv, 1) if isinstance(vv, float) else vv)
                                  for kk, vv in w.items() if kk not in ("start", "end")}
                              for k, w in self.windows.items()},
            "restarts": {"sigkill": station.kills,
                         "starts": station.generation,
                         "unexpected_exits": [e for e in station.exits if not e["expected"]]},
            "recoveries": {
                "boards_done_after_a_failed_or_interrupted_job": len(recovered),
                "interrupted_jobs_closed_at_restart": _count_events(
                    cfg.workdir / "state" / "ledger.sqlite3", "Interrupted"),
                "registrations_reconciled_at_restart": _reconciled(cfg.workdir / "state"),
                "worker_retries": retries,
            },
            "invariant_violations": len(violations),
            "violations": [v.as_dict() for v in violations],
            "fault_free_not_done": fault_free_not_done,
            "boards_per_hour": round(len(done) / hours, 1) if hours > 0 else None,
            "board_seconds": _board_seconds(jobs),
            "rss_check": facts.get("rss", {}),
            "rss_mb_curve": curve,
            "ledger": {"jobs": facts.get("jobs"), "registration_rows":
                       facts.get("registration_rows")},
            "central": facts.get("central", {}),
            "aws": facts.get("aws", {}),
            "notes": self.notes,
        }
        return report


def _port_name(index: int) -> str:
    from station.sim.rig import by_path_name

    return by_path_name(index)


def _count_events(ledger: Path, kind: str | None) -> int:
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)
    try:
        if kind is None:
            return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
        return int(conn.execute("SELECT count(*) FROM events WHERE kind = ?",
                                (kind,)).fetchone()[0])
    finally:
        conn.close()


def _reconciled(state: Path) -> int:
    path = state / "station.log"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines()
               if "reconcile: " in line)


def _board_seconds(jobs: list[dict[str, Any]]) -> dict[str, float]:
    spans = sorted(j["finished_at"] - j["started_at"] for j in jobs
                   if j["result"] == "done" and j["finished_at"])
    if not spans:
        return {}
    return {"median": round(spans[len(spans) // 2], 1),
            "p95": round(spans[int(len(spans) * 0.95) - 1 if len(spans) > 1 else 0], 1),
            "max": round(spans[-1], 1)}


def _thin(points: list[tuple[int, float, int]], keep: int) -> list[list[Any]]:
    if len(points) <= keep:
        return [list(p) for p in points]
    step = len(points) / keep
    picked = [points[int(i * step)] for i in range(keep)] + [points[-1]]
    return [list(p) for p in picked]


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    return Soak(cfg).run()


@contextlib.contextmanager
def _stop_cleanly() -> Iterator[None]:
    """SIGINT or SIGTERM unwind the harness, so the station, moto and the tmpfs go too.

    (A job started with `&` from a script ignores SIGINT; SIGTERM is what `kill` sends.)
    """
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SoakConfig()
    p.add_argument("--boards", type=int, default=d.boards)
    p.add_argument("--slots", type=int, default=d.slots)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, help="report path (default "
                   "benchmarks/results/soak-<n>.json)")
    p.add_argument("--no-throttle", action="store_true",
                   help="boards at full speed instead of the serial line rate")
    p.add_argument("--app-size", type=int, default=d.app_size)
    p.add_argument("--fault-share", type=float, default=d.fault_share)
    p.add_argument("--faults-per-kind", type=int)
    p.add_argument("--kill-every", type=int, default=d.kill_every)
    p.add_argument("--aws-throttle", type=float, default=d.aws_throttle)
    p.add_argument("--aws-errors", type=float, default=d.aws_errors)
    p.add_argument("--outage-s", type=float, default=d.outage_s)
    p.add_argument("--disk-full-s", type=float, default=d.disk_full_s)
    p.add_argument("--pg-outage-s", type=float, default=d.pg_outage_s,
                   help="seconds the central PostgreSQL is stopped (0: never)")
    p.add_argument("--no-central", action="store_true", help="no central PostgreSQL")
    args = p.parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    cfg = SoakConfig(boards=args.boards, slots=args.slots, seed=args.seed,
                     workdir=args.workdir or results / f"soak-{args.boards}-work",
                     throttle=not args.no_throttle, app_size=args.app_size,
                     fault_share=args.fault_share, faults_per_kind=args.faults_per_kind,
                     kill_every=args.kill_every, aws_throttle=args.aws_throttle,
                     aws_errors=args.aws_errors, outage_s=args.outage_s,
                     disk_full_s=args.disk_full_s, pg_outage_s=args.pg_outage_s,
                     central=not args.no_central)
    with _stop_cleanly():
        report = run_soak(cfg)
    out = args.out or results / f"soak-{args.boards}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    b = report["boards"]
    print(f"soak: {b['plugged']} boards, {b['done']} done, {b['hit_by_a_fault']} hit by a "
          f"fault ({b['hit_share']:.0%}), {report['restarts']['sigkill']} SIGKILLs, "
          f"{report['invariant_violations']} violations, fault-free not done: "
          f"{len(report['fault_free_not_done'])}, {report['boards_per_hour']} boards/h; "
          f"report: {out}")
    for v in report["violations"][:20]:
        print(f"  violation {v['kind']}: {v['subject']}: {v['detail']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
