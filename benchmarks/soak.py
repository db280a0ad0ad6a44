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

The harness is split by concept: soak_plan.py (the settings, which board gets which
fault, the plug records), soak_station.py (the station process, its log, its ledger, its
station.toml), soak_report.py (the audit and the JSON report); this file runs the night.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.invariants import RssSample, Violation  # noqa: E402
from benchmarks.soak_aws import FaultyProxy, moto_server  # noqa: E402
from benchmarks.soak_disk import FullableDisk  # noqa: E402
from benchmarks.soak_pg import PASSWORD, Cluster, find_bindir  # noqa: E402
from benchmarks.soak_plan import (  # noqa: E402
    INTERRUPTED,
    PlugRecord,
    SoakConfig,
    fault_plan,
    faults_for,
)
from benchmarks.soak_report import audit, build_report  # noqa: E402
from benchmarks.soak_station import (  # noqa: E402
    LedgerPoll,
    LogWatch,
    StationProcess,
    aws_env,
    count_events,
    write_config,
)
from station.config import load  # noqa: E402
from station.demo import make_demo_firmware  # noqa: E402
from station.flash import load_firmware  # noqa: E402
from station.sim import Rig  # noqa: E402

POLL = 0.25
"""Seconds between two looks at the ledger and the log (a polling interval)."""
ACK_TIMEOUT = 30.0
"""How long the station may take to notice a board was pulled out."""



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
            found, facts = audit(cfg, self.records, self.rss, self.violations, bundle,
                                 aws_url=url, central=central if self.pg is not None else "")
            self.faults.update({f"aws_{k}": v for k, v in proxy.injected.items()
                                if k != "dropped"})
            self.windows.setdefault("aws_outage", {})["calls_dropped"] = \
                proxy.injected.get("dropped", 0)
            self.windows.setdefault("disk_full", {})["fills"] = disk.fills
            return build_report(self.cfg, self.records, self.rss, self.faults, self.windows,
                                self.notes, started=started, station=station,
                                violations=found, facts=facts)

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
            local = count_events(ledger, None)
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


def _port_name(index: int) -> str:
    from station.sim import by_path_name

    return by_path_name(index)



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
