"""Baud matrix (issue #11): the station and its peers at 921600, 2 M and 3 Mbaud.

One session, one rig model (esp-flasher-stub timing, line-rate throttling, CP2102N
bridges, which carry 3 Mbaud), one firmware (the 1.5 MB demo app of BENCHMARKS.md):

- the station on 1 and 16 boards at each rate (plug -> done, events.jsonl);
- esptool's CLI on one board (process start -> exit), and once per port on 16 boards;
- esp-batch-flash 0.2.0 (PyPI) on 1 and 16 boards. Its CLI finds ports only by globbing
  /dev/ttyUSB* and /dev/ttyACM* (and `--ports` only filters that list), so it cannot see
  a virtual board at all: that is measured (its exit and message) and reported. Its
  flashing is its own `flash_device()` (one esptool process per port, output parsed for
  progress) run from a thread pool as its CLI does, given our ports: that part runs.
- CPU per board and peak RSS of the station at 16 boards and 3 Mbaud;
- a mixed rig with `baud = "auto"`: CP2102 boards (921600 at most), CP2102N boards and
  native USB-Serial/JTAG boards (ESP32-S3). A pty has no USB device, so the station sees
  every port as an unknown adapter; `[ports.baud_by_adapter] other = 3000000` starts
  them at 3 Mbaud and the ladder finds each CP2102's rate. Reported: every board done,
  the steps, and what a step-down board paid over a board of the same kind that did not.

Run alone: `python benchmarks/baud.py [--boards 1,16] [--rates 921600,2000000,3000000]
[--quick]` (`--quick`: one board per case, no flash timing; a smoke test of the code).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common
import flashmodel
import processes

RATES = (921_600, 2_000_000, 3_000_000)
SIZES = (1, 16)
RUN_TIMEOUT = 600.0
STEP_COST_LIMIT = 1.0  # s per board that steps down (issue #11 target)


# -- peers ---------------------------------------------------------------------------------


def esptool_runs(ctx: common.Context, boards: int, baud: int,
                 flash_timing: bool = True) -> dict[str, Any]:
    """One esptool CLI process per port, all at once (1 board: the plain CLI run)."""
    with processes.Processes() as procs:
        rig = processes.Rig(procs, boards, ctx.root / f"esptool-{boards}-{baud}",
                         flash_timing=flash_timing)
        try:
            rig.wait_plugged()
            started = [procs.start(common.esptool_cmd(port, ctx.firmware, baud),
                                   ctx.root / f"esptool-{boards}-{baud}-{n}.log")
                       for n, port in enumerate(rig.ports())]
            usages = [processes.wait_usage(p, RUN_TIMEOUT) for p in started]
        finally:
            rig.close()
    wall = processes.span_s(started, usages)
    return {"boards": boards, "baud": baud, "wall_s": round(wall, 2),
            "failed": sum(u.returncode != 0 for u in usages),
            "cpu_s_per_board": round(statistics.fmean(u.cpu_s for u in usages), 3),
            "peak_rss_mb": round(max(u.max_rss_mb for u in usages), 1)}


def batch_flash_cli_on_ptys(ctx: common.Context) -> dict[str, Any]:
    """esp-batch-flash's own CLI, pointed at a virtual board's port with --ports."""
    with processes.Processes() as procs:
        rig = processes.Rig(procs, 1, ctx.root / "ebf-cli", flash_timing=False)
        try:
            rig.wait_plugged()
            port = rig.ports()[0]
            cli = Path(sys.executable).parent / "esp-batch-flash"
            proc = subprocess.run(
                [str(cli), "--ports", port, "--flash-args", str(flash_args_file(ctx)),
                 "--chip", common.CHIP, "--no-progress", "--skip-deps-check"],
                cwd=ctx.root, capture_output=True, text=True, timeout=60,
                stdin=subprocess.DEVNULL, check=False)
        finally:
            rig.close()
    said = [line for line in proc.stdout.splitlines() if "❌" in line or "⚠" in line]
    return {"exit_code": proc.returncode, "said": said[:3],
            "why": "its port discovery globs only /dev/ttyUSB* and /dev/ttyACM*; --ports "
                   "filters that list, so a pty (or any by-path name) is never found"}


def flash_args_file(ctx: common.Context) -> Path:
    """ESP-IDF's `flash_args` text file (what esp-batch-flash reads) for our images."""
    path = ctx.root / "ebf" / "flash_args"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        args = ctx.firmware.write_flash_args()
        options = " ".join("--" + a[2:].replace("-", "_") if a.startswith("--") else a
                           for a in args[:6])
        lines = [options] + [f"{args[i]} {args[i + 1]}" for i in range(6, len(args), 2)]
        path.write_text("\n".join(lines) + "\n")
    return path


def batch_flash(ctx: common.Context, boards: int, baud: int,
                flash_timing: bool = True) -> dict[str, Any]:
    """esp-batch-flash's flash_device() for each port from a thread pool, as its CLI."""
    from esp_batch_flash import base

    options = flash_args_file(ctx).read_text().splitlines()[0].split()
    files = [(f"0x{i.offset:x}", str(i.path)) for i in ctx.firmware.images]
    logs = ctx.root / f"ebf-{boards}-{baud}"
    logs.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with processes.Processes() as procs:
        rig = processes.Rig(procs, boards, ctx.root / f"ebf-rig-{boards}-{baud}",
                         flash_timing=flash_timing)
        try:
            rig.wait_plugged()
            started = time.monotonic()
            # its progress printing goes nowhere: not what is measured here
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                    ThreadPoolExecutor(max_workers=boards) as pool:
                results = list(pool.map(
                    lambda port: base.flash_device(port, options, files, str(logs),
                                                   common.CHIP, baud), rig.ports()))
            wall = time.monotonic() - started
        finally:
            rig.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    ok = [bool(r[1]) if isinstance(r, tuple) else bool(r) for r in results]
    return {"boards": boards, "baud": baud, "wall_s": round(wall, 2),
            "failed": ok.count(False), "children_cpu_s_per_board": round(cpu / boards, 3),
            "note": "rig CPU included in children CPU (the rig is a child too)"}


# -- the mixed rig with "auto" -------------------------------------------------------------


MIXED = (("cp2102", "esp32", "bridge"), ("cp2102n", "esp32", "bridge"),
         ("jtag", "esp32s3", "jtag"))


def mixed_auto(ctx: common.Context, per_kind: int, flash_timing: bool = True
               ) -> dict[str, Any]:
    from station.demo import make_demo_firmware

    work = ctx.root / f"mixed-{per_kind}"
    s3 = make_demo_firmware(work / "fw-esp32s3", chip="esp32s3", app_size=common.APP_SIZE)
    dirs = {kind: work / f"ports-{kind}" for kind, _, _ in MIXED}
    slots = {str(d / common_by_path(i)): f"{kind}-{i + 1}"
             for kind, d in dirs.items() for i in range(per_kind)}
    config = work / "station.toml"
    config.write_text(f"""[station]
name = "bench-mixed"
state_dir = "state"
max_parallel = 16
[ports]
watch = {json.dumps([str(d / "pci-*") for d in dirs.values()])}
baud = "auto"
rescan_interval = 1.0
reenumerate_window = 5.0
[ports.baud_by_adapter]
other = 3000000
[ports.slots]
{"".join(f'{json.dumps(k)} = {json.dumps(v)}{chr(10)}' for k, v in slots.items())}
[[firmware]]
chip = "esp32"
flasher_args = {json.dumps(str(ctx.firmware.flasher_args))}
[[firmware]]
chip = "esp32s3"
flasher_args = {json.dumps(str(s3))}
[identity]
thing_name = "bench-{{mac}}"
[registrar]
kind = "none"
""")
    boards = per_kind * len(MIXED)
    with processes.Processes() as procs:
        station = procs.start([sys.executable, "-m", "station", "run", "--config", str(config),
                               "--exit-after", str(boards), "--headless"],
                              work / "station.out", cwd=work)
        processes.wait_watching(station)
        rigs = []
        for n, (kind, chip, usb) in enumerate(MIXED):
            extra = ["--chip", chip, "--usb", usb] + (["--bridge", kind] if usb == "bridge"
                                                      else [])
            rigs.append(processes.Rig(procs, per_kind, dirs[kind], seed=10 + n,
                                   flash_timing=flash_timing, extra_args=extra))
        try:
            for rig in rigs:
                rig.wait_plugged()
            usage = processes.wait_usage(station, RUN_TIMEOUT)
        finally:
            for rig in rigs:
                rig.close()
    events = processes.read_events(work / "state")
    started = {e["job_id"]: e["at"] for e in events if e["kind"] == "JobStarted"}
    jobs: dict[str, dict[str, Any]] = {}
    for e in events:
        job = jobs.setdefault(e["job_id"], {"slot": e["slot"], "steps": 0})
        if e["kind"] == "LineRate":
            job["baud"] = e["baud"]
            job["steps"] += e["stepped_from"] is not None
        elif e["kind"] == "JobFinished":
            job.update(result=e["result"], seconds=round(e["at"] - started[e["job_id"]], 2),
                       connect_s=round(e["timings"].get("connect", 0.0), 3))
    by_kind: dict[str, dict[str, Any]] = {}
    for kind, _, _ in MIXED:
        mine = [j for j in jobs.values() if j["slot"].startswith(f"{kind}-")]
        by_kind[kind] = {
            "boards": len(mine), "done": sum(j.get("result") == "done" for j in mine),
            "bauds": sorted({j.get("baud") for j in mine}, key=str),
            "steps": sum(j["steps"] for j in mine),
            "seconds_mean": round(statistics.fmean(j["seconds"] for j in mine), 2)
            if mine and all("seconds" in j for j in mine) else None,
            "connect_s_mean": round(statistics.fmean(j["connect_s"] for j in mine), 3)
            if mine and all("connect_s" in j for j in mine) else None}
    stepped = [j for j in jobs.values() if j["steps"]]
    calm = [j for j in jobs.values() if not j["steps"] and j["slot"].startswith("cp2102n-")]
    cost = None
    if stepped and calm:
        cost = round(statistics.fmean(j["connect_s"] for j in stepped)
                     - statistics.fmean(j["connect_s"] for j in calm), 3)
    return {"boards": boards, "exit_code": usage.returncode, "by_kind": by_kind,
            "lost": boards - sum(j.get("result") == "done" for j in jobs.values()),
            "step_cost_s_per_board": cost,
            "station_cpu_s_per_board": round(usage.cpu_s / boards, 3),
            "station_peak_rss_mb": round(usage.max_rss_mb, 1)}


def common_by_path(index: int) -> str:
    return f"pci-0000:00:14.0-usb-0:1.{index + 1}:1.0-port0"  # station/sim's by-path names


# -- the matrix ---------------------------------------------------------------------------


def run(ctx: common.Context, rates: tuple[int, ...] = RATES, sizes: tuple[int, ...] = SIZES,
        quick: bool = False) -> dict[str, Any]:
    timing = not quick
    floor = {str(b): round(flashmodel.line_seconds(ctx.firmware.compressed, b), 3) for b in rates}
    out: dict[str, Any] = {"rates": list(rates), "sizes": list(sizes), "floor_s": floor,
                           "station": {}, "esptool": {}, "esp_batch_flash": {}}
    targets: list[dict[str, Any]] = []
    for baud in rates:
        for boards in sizes:
            key = f"{boards}@{baud}"
            print(f"  {key}: station ...", flush=True)
            run_ = ctx.station(boards, baud=baud, flash_timing=timing)
            out["station"][key] = run_.summary()
            print(f"    {run_.wall_s:.2f}s; esptool CLI ...", flush=True)
            out["esptool"][key] = esptool_runs(ctx, boards, baud, timing)
            print(f"    {out['esptool'][key]['wall_s']:.2f}s; esp-batch-flash ...", flush=True)
            out["esp_batch_flash"][key] = batch_flash(ctx, boards, baud, timing)
            print(f"    {out['esp_batch_flash'][key]['wall_s']:.2f}s", flush=True)
        one = out["station"].get(f"1@{baud}")
        if one:
            per_board = one["per_board_s"]["mean"]
            targets.append(common.target(
                f"per board at {baud} Bd <= floor + 1.0 s", per_board, floor[str(baud)] + 1.0,
                "<=", "s", note=f"floor {floor[str(baud)]:.2f}s"))
        many = out["station"].get(f"16@{baud}")
        if one and many and baud in (921_600, 2_000_000):
            targets.append(common.target(f"T(16)/T(1) at {baud} Bd",
                                         many["wall_s"] / one["wall_s"], 1.03, "<="))
        if many and baud == 2_000_000:
            esp = out["esptool"][f"16@{baud}"]["wall_s"]
            targets.append(common.target("16 boards at 2 Mbaud, s", many["wall_s"], 7.0, "<=",
                                         "s"))
            targets.append(common.target("esptool per port / station at 2 Mbaud",
                                         esp / many["wall_s"], 1.5, ">=", "x"))
        if many and baud == 3_000_000:
            targets.append(common.target("host CPU-s/board, 16 boards at 3 Mbaud",
                                         many["station_cpu_s_per_board"], 0.15, "<=", "s"))
            targets.append(common.target("peak RSS MB, 16 boards at 3 Mbaud",
                                         many["station_peak_rss_mb"], 150.0, "<=", " MB"))
    print("  esp-batch-flash CLI on a virtual port ...", flush=True)
    out["esp_batch_flash_cli"] = batch_flash_cli_on_ptys(ctx)
    per_kind = 1 if quick else max(1, max(sizes) // len(MIXED))
    print(f"  mixed rig, baud = \"auto\", {per_kind * len(MIXED)} boards ...", flush=True)
    mixed = mixed_auto(ctx, per_kind, timing)
    out["mixed_auto"] = mixed
    targets.append(common.target("mixed rig \"auto\": boards lost", mixed["lost"], 0, "<="))
    targets.append(common.target("mixed rig: s per board that steps down",
                                 mixed["step_cost_s_per_board"], STEP_COST_LIMIT, "<=", "s"))
    out["targets"] = targets
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="station benchmark: the baud matrix")
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--boards", default=",".join(map(str, SIZES)))
    parser.add_argument("--quick", action="store_true",
                        help="no flash timing: a smoke test of this code, not figures")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    rates = tuple(int(r) for r in args.rates.split(","))
    sizes = tuple(int(b) for b in args.boards.split(","))
    load = common.loadavg()
    with common.context("baud", args.keep) as ctx:
        if args.keep:
            print(f"scratch folder: {ctx.root}")
        result = {"machine": common.machine(), "loadavg_start": load,
                  "baud": run(ctx, rates, sizes, args.quick), "loadavg_end": common.loadavg()}
    path = common.write_json(result, "baud-quick" if args.quick else "baud")
    common.print_targets(result["baud"]["targets"])
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
