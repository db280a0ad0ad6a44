"""Fault injection for virtual boards, and the compact ``--fault`` spec syntax.

Spec: ``INDEX:KIND[=VALUE][,KIND[=VALUE]...]``; repeat ``--fault`` for more boards, or
for more faults on one board. INDEX is the board's 0-based plug index. Kinds:

==================  =============================================================
``unplug_after=N``  the board vanishes (pty closed, symlink removed) once it has
                    received N bytes from the host, typically mid-write
``mute``            never answers anything, not even SYNC
``corrupt=RATE``    each byte sent to the host has a bit flipped with probability
                    RATE (e.g. 0.001)
``slow=FACTOR``     flash operations take FACTOR times longer (alias ``slow_flash``)
``garbage``         answers with text that is not SLIP (alias ``not_esp``): a serial
                    device that is not an ESP in download mode
``busy``            another program holds the port with an exclusive lock (as
                    pyserial's ``exclusive=True`` takes it: a serial monitor, a
                    second station), so esptool cannot open it (alias ``held``)
``reset_timing``    the auto-reset circuit's EN delay is too short for the host's
                    line changes (RFC 2217 face): the chip wakes before GPIO0 is
                    low and boots the app instead of download mode, as under heavy
                    USB load; esptool reports "Wrong boot mode detected"
``pull_after_burns=N``  the board is pulled right after its Nth eFuse program
                    command (the burns done stay burned: a half-locked board)
``weak_efuse=BLOCK``  a fuse bit of that eFuse block never blows (Espressif advisory
                    AR2022-006): every burn of the block leaves the RS decoder
                    reporting an error (not on the ESP32's 3/4 coding)
``locked=KIND``     the board arrives burned by another line: ``sdm`` (secure
                    download mode), ``key`` (an XTS key with its purpose in the
                    first key block, protected), ``encrypted`` (that key and the
                    crypt counter on), ``secure_boot`` (a foreign digest, enabled)
==================  =============================================================

Example: ``--fault 3:unplug_after=200000 --fault 5:mute --fault 7:corrupt=0.001``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    """Faults of one board. The default is a healthy board."""

    unplug_after: int | None = None
    mute: bool = False
    corrupt: float = 0.0
    slow_flash: float = 1.0
    garbage: bool = False
    busy: bool = False
    reset_timing: bool = False
    pull_after_burns: int | None = None
    weak_efuse: int | None = None
    locked: str | None = None

    def describe(self) -> str:
        """The spec form (without index), e.g. ``mute,corrupt=0.001``; ``""`` if healthy."""
        parts: list[str] = []
        if self.unplug_after is not None:
            parts.append(f"unplug_after={self.unplug_after}")
        if self.mute:
            parts.append("mute")
        if self.corrupt:
            parts.append(f"corrupt={self.corrupt:g}")
        if self.slow_flash != 1.0:
            parts.append(f"slow={self.slow_flash:g}")
        if self.garbage:
            parts.append("garbage")
        if self.busy:
            parts.append("busy")
        if self.reset_timing:
            parts.append("reset_timing")
        if self.pull_after_burns is not None:
            parts.append(f"pull_after_burns={self.pull_after_burns}")
        if self.weak_efuse is not None:
            parts.append(f"weak_efuse={self.weak_efuse}")
        if self.locked is not None:
            parts.append(f"locked={self.locked}")
        return ",".join(parts)


_ALIASES = {"slow_flash": "slow", "not_esp": "garbage", "held": "busy"}
_FLAGS = {"mute", "garbage", "busy", "reset_timing"}
_VALUED = {"unplug_after", "corrupt", "slow", "pull_after_burns", "weak_efuse", "locked"}
LOCKS = ("sdm", "key", "encrypted", "secure_boot")


def _apply(faults: Faults, item: str) -> Faults:
    kind, sep, value = item.partition("=")
    kind = _ALIASES.get(kind.strip(), kind.strip())
    value = value.strip()
    if kind in _FLAGS:
        if sep:
            raise ValueError(f"fault {kind!r} takes no value")
        return dataclasses.replace(faults, **{kind: True})  # type: ignore[arg-type]
    if kind not in _VALUED:
        known = ", ".join(sorted(_FLAGS | _VALUED | set(_ALIASES)))
        raise ValueError(f"unknown fault kind {kind!r} (known: {known})")
    if not sep or not value:
        raise ValueError(f"fault {kind!r} needs a value, e.g. {kind}=...")
    if kind == "locked":
        if value not in LOCKS:
            raise ValueError(f"locked must be one of {', '.join(LOCKS)}, got {value!r}")
        return dataclasses.replace(faults, locked=value)
    try:
        if kind in ("pull_after_burns", "weak_efuse"):
            count = int(value, 0)
            if count < (1 if kind == "pull_after_burns" else 0):
                raise ValueError
            return dataclasses.replace(faults, **{kind: count})  # type: ignore[arg-type]
        if kind == "unplug_after":
            count = int(value, 0)
            if count < 0:
                raise ValueError
            return dataclasses.replace(faults, unplug_after=count)
        number = float(value)
    except ValueError:
        raise ValueError(f"bad value {value!r} for fault {kind!r}") from None
    if kind == "corrupt":
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"corrupt rate must be within [0, 1], got {value}")
        return dataclasses.replace(faults, corrupt=number)
    if number <= 0:
        raise ValueError(f"slow factor must be positive, got {value}")
    return dataclasses.replace(faults, slow_flash=number)


def parse_fault_spec(spec: str) -> tuple[int, Faults]:
    """Parse one ``INDEX:KIND[=VALUE][,...]`` spec into (index, faults)."""
    index_text, sep, kinds = spec.partition(":")
    try:
        index = int(index_text)
    except ValueError:
        index = -1
    if index < 0 or not sep or not kinds.strip():
        raise ValueError(f"fault spec {spec!r} must look like INDEX:KIND[=VALUE], e.g. 3:mute")
    faults = Faults()
    for item in kinds.split(","):
        faults = _apply(faults, item)
    return index, faults


def parse_fault_specs(specs: list[str]) -> dict[int, Faults]:
    """Parse repeated ``--fault`` options; specs for the same board are combined."""
    result: dict[int, Faults] = {}
    for spec in specs:
        index, _ = parse_fault_spec(spec)
        base = result.get(index, Faults())
        for item in spec.partition(":")[2].split(","):
            base = _apply(base, item)
        result[index] = base
    return result
