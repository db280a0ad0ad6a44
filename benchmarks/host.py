"""Host cost: CPU seconds per board and peak RSS of the station process at 16 boards,
against the CPU one esptool CLI run needs for the same board.

CPU and peak RSS are the kernel's rusage of the `station run` process (os.wait4; the
peak RSS is VmHWM), startup included. The rig's own CPU (the simulated boards) is
reported apart and is not host cost. Run alone: `python benchmarks/host.py`.
"""

from __future__ import annotations

import sys
from typing import Any

import common
import peers

BOARDS = 16
CPU_BEYOND_ESPTOOL = 0.5
RSS_LIMIT_MB = 250.0


def run(ctx: common.Context) -> dict[str, Any]:
    station = ctx.station(BOARDS)
    esptool = peers.sequential(ctx)
    per_board = station.usage.cpu_s / BOARDS
    beyond = per_board - esptool["cpu_s_per_board"]
    return {
        "boards": BOARDS,
        "station_cpu_s": round(station.usage.cpu_s, 2),
        "station_user_s": round(station.usage.user_s, 2),
        "station_sys_s": round(station.usage.sys_s, 2),
        "station_cpu_s_per_board": round(per_board, 3),
        "esptool_cpu_s_per_board": esptool["cpu_s_per_board"],
        "cpu_s_per_board_beyond_esptool": round(beyond, 3),
        "station_peak_rss_mb": round(station.usage.max_rss_mb, 1),
        "rig_cpu_s": station.rig_cpu_s,
        "targets": [
            common.target("host CPU-s/board beyond esptool's", beyond, CPU_BEYOND_ESPTOOL,
                          "<=", "s", note=f"station {per_board:.2f} vs esptool CLI "
                                          f"{esptool['cpu_s_per_board']:.2f} CPU-s/board"),
            common.target("station peak RSS MB (16 boards)", station.usage.max_rss_mb,
                          RSS_LIMIT_MB, "<=", " MB"),
        ],
    }


if __name__ == "__main__":
    sys.exit(common.standalone("host", run))
