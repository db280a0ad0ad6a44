"""Connect under load (issue #23, T(16)/T(1)): N boards connecting at once, and the CPU
that costs the host and the rig on this machine.

A rig (`python -m station.sim`, its own process, line and flash timing on, N ESP32
boards on CP2102N bridges); the station's flasher (`EsptoolFlasher.open`, this process,
one thread per board as in the station) connects to all N at once at the rate, twice
(the slot's first board, then a later one). Reported per round: each board's connect,
the CPU seconds of this process (`time.process_time`) and of the rig (its
/proc/<pid>/stat utime + stime) over the round; with `--profile`, the top functions of
this process by own time (cProfile, all threads) for the later round.

Run alone: `python benchmarks/connectload.py [--boards 1,16] [--baud 2000000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import processes

TICKS = os.sysconf("SC_CLK_TCK")
OPEN_TIMEOUT = 60.0


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _round(flasher: Any, ports: list[str], rig_pid: int,
           profiles: list[cProfile.Profile] | None) -> dict[str, Any]:
    from station.flash.session import EsptoolSession

    original = EsptoolSession.connect_blocking

    def profiled(self: Any) -> None:  # on the session's thread: cProfile is per thread
        assert profiles is not None
        profiler = cProfile.Profile()
        profiles.append(profiler)
        profiler.runcall(original, self)

    async def one(port: str) -> float:
        started = time.perf_counter()
        session = await asyncio.wait_for(flasher.open(port), OPEN_TIMEOUT)
        took = time.perf_counter() - started
        await session.close()
        return took

    async def all_of() -> list[float]:
        return list(await asyncio.gather(*(one(p) for p in ports)))

    if profiles is not None:
        EsptoolSession.connect_blocking = profiled  # type: ignore[method-assign]
    cpu0, rig0, wall0 = time.process_time(), _cpu_of(rig_pid), time.perf_counter()
    try:
        times = asyncio.run(all_of())
    finally:
        EsptoolSession.connect_blocking = original  # type: ignore[method-assign]
    return {"wall_s": round(time.perf_counter() - wall0, 3),
            "connect_s": {"mean": round(statistics.fmean(times), 3),
                          "max": round(max(times), 3)},
            "host_cpu_s": round(time.process_time() - cpu0, 3),
            "rig_cpu_s": round(_cpu_of(rig_pid) - rig0, 3)}


def run(boards: int, baud: int, root: Path, profile: bool) -> dict[str, Any]:
    from station.flash import EsptoolFlasher

    out: dict[str, Any] = {"boards": boards, "baud": baud}
    with processes.Processes() as procs:
        rig = processes.Rig(procs, boards, root / f"rig-{boards}",
                            extra_args=["--chip", "esp32", "--bridge", "cp2102n"])
        ports = [e["port"] for e in rig.wait_plugged()]
        flasher = EsptoolFlasher(baud=baud, chips=("esp32",))
        out["first"] = _round(flasher, ports, rig.proc.pid, None)
        profiles: list[cProfile.Profile] | None = [] if profile else None
        out["later"] = _round(flasher, ports, rig.proc.pid, profiles)
        if profiles:
            text = io.StringIO()
            stats = pstats.Stats(profiles[0], stream=text)
            for more in profiles[1:]:
                stats.add(more)
            stats.sort_stats("tottime").print_stats(15)
            out["profile"] = text.getvalue()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="station benchmark: connect under load")
    parser.add_argument("--boards", default="1,16")
    parser.add_argument("--baud", type=int, default=2_000_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--name", default=None, help="results/<name>.json")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": common.machine(), "loadavg_start": common.loadavg(),
                              "runs": []}
    with common.workspace("connectload") as root:
        for n in (int(b) for b in args.boards.split(",")):
            r = run(n, args.baud, root, args.profile)
            print(r.pop("profile", ""))
            print(json.dumps(r), flush=True)
            result["runs"].append(r)
    result["loadavg_end"] = common.loadavg()
    if args.name:
        print(f"written {common.write_json(result, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
