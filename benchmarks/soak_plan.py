"""The soak's plan: its settings (`SoakConfig`), which board gets which board fault, and
the record the harness keeps of every plug (`PlugRecord`). Deterministic from the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from station.sim import Faults

ROOT = Path(__file__).resolve().parents[1]
SIM_FAULTS = ("unplug_mid_flash", "mute", "corrupt", "slow_flash", "not_esp")
INTERRUPTED = "station stopped during"


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
