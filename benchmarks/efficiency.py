"""Efficiency: per board, the flash phase against the line-rate floor, and what every
other stage costs.

floor = compressed bytes sent x 10 bits / baud (start + 8 data + stop bits per byte;
SLIP escapes, packet headers and replies are the station's overhead, not the floor's).
`flash_model_s` is the write phase the legacy stub's blocking erases would allow with an
infinitely fast host (see flashmodel.modelled_flash_seconds), kept for comparison: the rig
now models esp-flasher-stub (esptool 5.6's default), which erases in the background and
skips blank sectors, so on a new (blank) board the line is the bound.
Run alone: `python benchmarks/efficiency.py`.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import common
import flashmodel

BOARDS = 16
FLASH_SPEED_LIMIT = 0.90  # flash phase speed / line-rate floor speed
TOTAL_FACTOR, TOTAL_PLUS = 1.15, 2.0
OVERHEAD_STAGES = ("connect", "identify", "register", "verify", "reset")


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def run(ctx: common.Context) -> dict[str, Any]:
    fw = ctx.firmware
    floor = flashmodel.line_seconds(fw.compressed)
    model = flashmodel.modelled_flash_seconds(fw)
    out: dict[str, Any] = {"firmware": fw.summary(), "baud": common.BAUD,
                           "floor_s": round(floor, 3), "flash_model_s": round(model, 3),
                           "by_boards": {}}
    sizes = sorted({1, BOARDS} | {key[0] for key in ctx.station_runs  # (boards, kind,
                                  if key[1:] == ("none", True, common.BAUD, ())})  # timing...)
    for boards in sizes:
        run_ = ctx.station(boards)
        flash = [j["timings"]["flash"] for j in run_.jobs]
        total = run_.per_board()
        speed = [floor / f for f in flash]
        overhead = {s: _stats([j["timings"].get(s, 0.0) for j in run_.jobs])
                    for s in OVERHEAD_STAGES}
        out["by_boards"][str(boards)] = {
            "flash_s": _stats(flash),
            "flash_speed_vs_floor": _stats(speed),
            "flash_speed_vs_model": _stats([model / f for f in flash]),
            "total_s": _stats(total),
            "overhead_s": overhead,
            "other_stages_s": round(statistics.fmean(
                [t - f for t, f in zip(total, flash, strict=True)]), 3),
        }
    # The same board with the rig's flash model off: what is left is the line, the
    # protocol and the host, which tells the station's share from the flash chip's.
    line_only = ctx.station(1, flash_timing=False)
    flash = line_only.jobs[0]["timings"]["flash"]
    out["line_only_1_board"] = {"flash_s": round(flash, 3),
                                "flash_speed_vs_floor": round(floor / flash, 3),
                                "total_s": round(line_only.per_board()[0], 3),
                                "stage_s": line_only.stage_means()}
    at16 = out["by_boards"][str(BOARDS)]
    total_limit = TOTAL_FACTOR * floor + TOTAL_PLUS
    out["total_limit_s"] = round(total_limit, 3)
    out["targets"] = [
        common.target("flash speed / line floor (16 boards, mean)",
                      at16["flash_speed_vs_floor"]["mean"], FLASH_SPEED_LIMIT, ">=",
                      note=f"the legacy stub's erases would allow {floor / model:.3f}; "
                           f"without it the station gets {floor / flash:.3f}"),
        common.target("per-board total s (16 boards, mean)", at16["total_s"]["mean"],
                      total_limit, "<=", "s",
                      note=f"1.15 x floor + 2 s; {line_only.per_board()[0]:.2f}s "
                           "without the flash chip model"),
    ]
    return out


if __name__ == "__main__":
    sys.exit(common.standalone("efficiency", run))
