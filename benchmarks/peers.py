"""Peers: the usual ways, on the same rig, images and baud as the station.

(a) sequential: `python -m esptool ... write-flash` once per board, one after another
    (the seed's prepare script). Wall time is linear in the boards by construction, so
    it runs on SEQUENTIAL_BOARDS boards and T(16) is projected as 16 x the mean run.
(b) parallel: one esptool process per port, all started at once (what esptool's
    maintainers suggest, e.g. with GNU parallel), on 16 boards.
Each esptool run's wall time, CPU seconds and peak RSS come from os.wait4.
Run alone: `python benchmarks/peers.py`.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import common
import processes

SEQUENTIAL_BOARDS = 3
PARALLEL_BOARDS = 16
RUN_TIMEOUT = 300.0


def _runs_summary(usages: list[processes.Usage]) -> dict[str, Any]:
    return {"runs": len(usages), "failed": sum(u.returncode != 0 for u in usages),
            "wall_s_mean": round(statistics.fmean(u.wall_s for u in usages), 3),
            "wall_s_max": round(max(u.wall_s for u in usages), 3),
            "cpu_s_per_board": round(statistics.fmean(u.cpu_s for u in usages), 3),
            "peak_rss_mb": round(max(u.max_rss_mb for u in usages), 1)}


def sequential(ctx: common.Context, boards: int = SEQUENTIAL_BOARDS) -> dict[str, Any]:
    if "esptool_sequential" in ctx.shared:
        return dict(ctx.shared["esptool_sequential"])
    print(f"  esptool CLI, sequential on {boards} board(s) ...", flush=True)
    usages: list[processes.Usage] = []
    with processes.Processes() as procs:
        rig = processes.Rig(procs, boards, ctx.root / "esptool-seq")
        try:
            rig.wait_plugged()
            for n, port in enumerate(rig.ports()):
                log = ctx.root / f"esptool-seq-{n}.log"
                usages.append(processes.wait_usage(
                    procs.start(common.esptool_cmd(port, ctx.firmware), log), RUN_TIMEOUT))
        finally:
            rig.close()
    total = sum(u.wall_s for u in usages)
    out = {"boards": boards, **_runs_summary(usages), "wall_s": round(total, 2),
           "projected_wall_s_16": round(16 * total / boards, 1), "ratio_16_1": 16.0,
           "loadavg": common.loadavg()}
    print(f"    {out['wall_s_mean']:.2f}s per board, {out['cpu_s_per_board']:.2f} CPU-s",
          flush=True)
    ctx.shared["esptool_sequential"] = out
    return out


def parallel(ctx: common.Context, boards: int = PARALLEL_BOARDS) -> dict[str, Any]:
    print(f"  esptool CLI, one process per port on {boards} boards ...", flush=True)
    with processes.Processes() as procs:
        rig = processes.Rig(procs, boards, ctx.root / "esptool-par")
        try:
            rig.wait_plugged()
            started = [procs.start(common.esptool_cmd(port, ctx.firmware),
                                   ctx.root / f"esptool-par-{n}.log")
                       for n, port in enumerate(rig.ports())]
            usages = [processes.wait_usage(p, RUN_TIMEOUT) for p in started]
        finally:
            rig.close()
    wall = processes.span_s(started, usages)
    out = {"boards": boards, **_runs_summary(usages), "wall_s": round(wall, 2),
           "loadavg": common.loadavg()}
    print(f"    {wall:.2f}s for {boards}, {out['failed']} failed", flush=True)
    return out


def run(ctx: common.Context) -> dict[str, Any]:
    seq = sequential(ctx)
    par = parallel(ctx)
    station1 = ctx.station(1)
    station16 = ctx.station(16)
    one_run = seq["wall_s_mean"]
    par["ratio_16_1"] = round(par["wall_s"] / one_run, 3)
    return {
        "esptool_sequential": seq,
        "esptool_parallel": par,
        "station": {"wall_s_1": round(station1.wall_s, 2),
                    "wall_s_16": round(station16.wall_s, 2),
                    "ratio_16_1": round(station16.wall_s / station1.wall_s, 3)},
        "targets": [
            common.target("station T(1) s vs one esptool CLI run", station1.wall_s, one_run,
                          "<=", "s", note="plug -> done vs esptool process start -> exit"),
            common.target("station T(16) s vs one esptool CLI run", station16.wall_s,
                          one_run * 1.10, "<=", "s",
                          note=f"esptool per port: {par['wall_s']:.1f}s for 16, "
                               f"sequential: ~{seq['projected_wall_s_16']:.0f}s"),
        ],
    }


if __name__ == "__main__":
    sys.exit(common.standalone("peers", run))
