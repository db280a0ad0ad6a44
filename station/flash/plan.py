"""What a board gets: the plan for its chip, built once at start and shared by workers.

A station may hold firmware for several chips (`[[firmware]]`); it learns a board's chip
only once connected, so the worker is handed `Plans` (one `Plan` per chip) and picks.
Plain data and two callables: no esptool, no config, no cloud.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from station.errors import WrongChipError
from station.parts import BoardIdentity, BootJudge, DeviceCredentials, Region


@dataclass(frozen=True)
class Plan:
    """What every board gets; built once at start and shared by all workers."""

    chip: str
    regions: tuple[Region, ...]
    firmware_hash: str
    station: str
    thing_name: Callable[[BoardIdentity], str]
    credentials_region: Callable[[DeviceCredentials], Region] | None = None
    """Builds the per-board data partition; None when the registrar makes no credentials."""
    boot: BootJudge | None = None
    """[verify] boot: what the board must print after the reset (station/bootcheck.py)."""

    @property
    def flash_end(self) -> int:
        """The highest byte the common images write."""
        return max((r.end for r in self.regions), default=0)


@dataclass(frozen=True)
class Plans:
    """The plan for each chip the station has firmware for: the worker picks one by the
    chip it finds on the board. One plan is the single-product line of old."""

    by_chip: Mapping[str, Plan]

    def __post_init__(self) -> None:
        if not self.by_chip:
            raise ValueError("a station needs at least one plan")

    @classmethod
    def one(cls, plan: Plan) -> Plans:
        return cls({plan.chip: plan})

    @property
    def any(self) -> Plan:
        """One of the plans, for what they share (station name, thing names)."""
        return next(iter(self.by_chip.values()))

    @property
    def station(self) -> str:
        return self.any.station

    @property
    def firmware_hash(self) -> str:
        """Known before the board is: with one firmware only (else set at identify)."""
        plans = list(self.by_chip.values())
        return plans[0].firmware_hash if len(plans) == 1 else ""

    def pick(self, chip: str) -> Plan:
        """The plan for `chip`; a board no firmware is for fails before any write."""
        plan = self.by_chip.get(chip)
        if plan is None:
            raise WrongChipError(chip, tuple(self.by_chip))
        return plan
