"""`make bench`: every benchmark in one session, one table, one JSON.

Runs scaling, efficiency, peers, host, registration, the baud matrix and connect per chip
sharing the firmware and the station runs (the 16-board run serves four of them),
projects boards per hour for 16 ports, prints the targets table and writes
benchmarks/results/latest.json (copy it to benchmarks/latest-results.json to publish the
figures).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import baud
import common
import connect
import efficiency
import flashmodel
import host
import peers
import registration
import scaling
import security

BENCHMARKS: tuple[tuple[str, Callable[[common.Context], dict[str, Any]]], ...] = (
    ("scaling", scaling.run),
    ("efficiency", efficiency.run),
    ("peers", peers.run),
    ("host", host.run),
    ("registration", registration.run),
    ("baud", baud.run),  # issue #11: the baud matrix, esp-batch-flash, the mixed rig
    ("connect", connect.run),  # issue #23: connect per chip, the step-down per rung
    ("security", security.run),  # issue #20: what locking adds per board (16 boards, 2 Mbaud)
)
PORTS = 16


def projection(result: dict[str, Any]) -> dict[str, Any]:
    """Boards per hour for 16 ports from the measured 16-board wall time (no handling
    time: a real line adds the seconds an operator needs to swap 16 boards)."""
    out: dict[str, Any] = {"ports": PORTS}
    wall = result.get("scaling", {}).get("wall_s", {}).get(str(PORTS))
    if wall:
        out["station_wall_s"] = wall
        out["station_boards_per_hour"] = round(PORTS * 3600 / wall)
    reg = result.get("registration", {}).get("wall_s_aws")
    if reg:
        out["station_aws_boards_per_hour"] = round(PORTS * 3600 / reg)
    peer = result.get("peers", {})
    if peer:
        seq = peer["esptool_sequential"]["wall_s_mean"]
        out["esptool_sequential_boards_per_hour"] = round(3600 / seq)
        out["esptool_parallel_boards_per_hour"] = round(
            PORTS * 3600 / peer["esptool_parallel"]["wall_s"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run every station benchmark")
    parser.add_argument("--only", nargs="*", choices=[n for n, _ in BENCHMARKS],
                        help="run only these")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the targets as a Markdown table")
    args = parser.parse_args(argv)
    started = time.monotonic()
    result: dict[str, Any] = {"machine": common.machine(), "loadavg_start": common.loadavg(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with common.context("all", args.keep) as ctx:
        if args.keep:
            print(f"scratch folder: {ctx.root}")
        result["firmware"] = {**ctx.firmware.summary(),
                              "floor_s": round(flashmodel.line_seconds(ctx.firmware.compressed), 3),
                              "baud": common.BAUD}
        for name, run in BENCHMARKS:
            if args.only and name not in args.only:
                continue
            print(f"{name}:", flush=True)
            result[name] = run(ctx)
    result["projection"] = projection(result)
    result["loadavg_end"] = common.loadavg()
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["targets"] = [row for name, _ in BENCHMARKS
                         for row in result.get(name, {}).get("targets", [])]
    path = common.write_json(result, "latest")
    print()
    print(f"targets (load average {result['loadavg_start']} -> {result['loadavg_end']}, "
          f"{common.BAUD} Bd, {result['duration_s']:.0f}s):")
    common.print_targets(result["targets"])
    print("projection:", ", ".join(f"{k} {v}" for k, v in result["projection"].items()))
    if args.markdown:
        print()
        print(common.markdown_targets(result["targets"]))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
