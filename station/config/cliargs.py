"""Checked numbers for command-line options, as strict as the config's.

argparse's plain ``type=int`` takes ``--exit-after 0`` and ``--boards -3`` and the station
then waits forever for boards that can never come. These types turn such a count into
argparse's own one-line error (exit 2, before anything starts), worded like the config's
messages: what the value must be, and what was given. Used by every subcommand, the
simulator's included, so one option means one rule everywhere.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _whole(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def at_least(minimum: int) -> Callable[[str], int]:
    """An int option that must be ``minimum`` or more (a count of boards: 1)."""

    def parse(text: str) -> int:
        value = _whole(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"  # argparse names the type in errors
    return parse


def seconds(text: str) -> float:
    """A duration option: a finite number of seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, not {text}")
    return value


positive = at_least(1)
"""Counts of boards: ``--exit-after N``, ``--boards N``."""
