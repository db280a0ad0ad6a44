"""Scaling: the station flashing 1, 4, 8 and 16 boards at once; T(16)/T(1).

Wall time runs from the first plug (the rig's JSON line) to the last board's `done`
(events.jsonl). Run alone: `python benchmarks/scaling.py`.
"""

from __future__ import annotations

import sys
from typing import Any

import common

SIZES = (1, 4, 8, 16)
RATIO_LIMIT = 1.10


def run(ctx: common.Context) -> dict[str, Any]:
    runs = {n: ctx.station(n) for n in SIZES}
    t1, t16 = runs[1].wall_s, runs[16].wall_s
    return {
        "baud": common.BAUD,
        "runs": [r.summary() for r in runs.values()],
        "wall_s": {str(n): round(r.wall_s, 2) for n, r in runs.items()},
        "ratio_16_1": round(t16 / t1, 3),
        "targets": [common.target("scaling T(16)/T(1)", t16 / t1, RATIO_LIMIT, "<=")],
    }


if __name__ == "__main__":
    sys.exit(common.standalone("scaling", run))
