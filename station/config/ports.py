"""[ports] of station.toml: which ports, at what rate, which slots, which hub hosts.

The largest section, and the one a line edits most (globs, rates per adapter, slot
labels, hub URLs, the BOOT + EN wait): its checks live here so reader.py stays a list of
sections. Errors name the key, as every section's do (_table.Table).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from station.config._table import Table
from station.ports import (
    MAX_BRIDGE_BAUD,
    ROM_BAUD,
    BaudSettings,
    adapter_key_error,
    remote_url_problem,
)

AskButtons = Literal["remote", "all", "never"]
ASK_BUTTONS: tuple[AskButtons, ...] = ("remote", "all", "never")


@dataclass(frozen=True)
class HealthSection:
    """When a slot is flagged (station/health/slothealth.py): failures at one stage on its last
    boards. 0 turns a rule off."""

    consecutive: int = 3
    window: int = 6
    failures_in_window: int = 4


@dataclass(frozen=True)
class PortsSection:
    watch: tuple[str, ...] = ("/dev/ttyUSB*", "/dev/ttyACM*")
    baud: int | Literal["auto"] = 921600
    rescan_interval: float = 2.0
    slots: Mapping[str, str] = field(default_factory=dict)
    park_unhealthy: bool = False
    health: HealthSection = field(default_factory=HealthSection)
    reenumerate_window: float = 5.0
    """Seconds within which a port the station reset may vanish and come back at the same
    USB location as the same board (station/ports/reenumeration.py); 0 turns the rule off."""
    max_baud: int | None = None
    baud_by_adapter: Mapping[str, int] = field(default_factory=dict)
    baud_by_port: Mapping[str, int] = field(default_factory=dict)
    remote: tuple[str, ...] = ()
    """`rfc2217://host:port` ports on hub hosts (station/ports/remote.py)."""
    buttons_timeout: float = 120.0
    """Seconds a board without auto-reset waits for BOOT + EN (flash/_connect.py)."""
    ask_buttons: AskButtons = "remote"
    """Which ports ask for BOOT + EN when the reset sequence finds no download mode:
    "remote" (a missing or slow circuit is the common case there), "all" (also local
    bridges: a line of boards without auto-reset) or "never"."""

    @property
    def line(self) -> BaudSettings:
        """The line-rate settings (station/ports/baud.py): rate per port and the ladder's cap."""
        return BaudSettings(baud=None if self.baud == "auto" else int(self.baud),
                            max_baud=self.max_baud, by_adapter=self.baud_by_adapter,
                            by_port=self.baud_by_port)


def ports_section(t: Table) -> PortsSection:
    watch = t.get("watch", list, ["/dev/ttyUSB*", "/dev/ttyACM*"])
    if not watch:
        raise t.error("watch", "must name at least one glob")
    for pattern in watch:
        if not isinstance(pattern, str):
            raise t.error("watch", f"globs must be strings, not {pattern!r}")
        _check_glob(t, pattern)
    baud, max_baud, by_adapter, by_port = _line_rates(t)
    slots = t.get("slots", dict, {})
    for key, label in slots.items():
        if not isinstance(label, str):
            raise t.error(f"slots.{key}", f"must be a string label, not {label!r}")
    p = PortsSection(
        watch=tuple(str(t.resolve(w)) for w in watch),
        baud=baud,
        rescan_interval=t.number("rescan_interval", 2.0, minimum=0.1),
        slots=dict(slots),
        park_unhealthy=t.get("park_unhealthy", bool, False),
        health=_health(t.sub("health")),
        reenumerate_window=t.number("reenumerate_window", 5.0),
        max_baud=max_baud, baud_by_adapter=by_adapter, baud_by_port=by_port,
        remote=_remote_ports(t),
        buttons_timeout=t.number("buttons_timeout", 120.0, minimum=1.0),
        ask_buttons=_ask_buttons(t),
    )
    if p.reenumerate_window > 120:
        raise t.error("reenumerate_window", f"{p.reenumerate_window:g} s is longer than any "
                                            "USB re-enumeration (0.2-2 s); at most 120")
    t.done()
    return p


def _ask_buttons(t: Table) -> AskButtons:
    value = t.get("ask_buttons", str, "remote")
    if value not in ASK_BUTTONS:
        raise t.error("ask_buttons", f"must be \"remote\", \"all\" or \"never\", "
                                     f"not {value!r}")
    return value


def _remote_ports(t: Table) -> tuple[str, ...]:
    """[ports] remote: `rfc2217://host:port` URLs, each once (a URL is its slot key)."""
    urls = t.get("remote", list, [])
    for url in urls:
        problem = remote_url_problem(url)
        if problem is not None:
            raise t.error("remote", problem)
    if len(set(urls)) != len(urls):
        raise t.error("remote", "lists a URL twice")
    return tuple(urls)


def _health(t: Table) -> HealthSection:
    h = HealthSection(consecutive=t.integer("consecutive", 3),
                      window=t.integer("window", 6),
                      failures_in_window=t.integer("failures_in_window", 4))
    if h.failures_in_window > h.window:
        raise t.error("failures_in_window", f"{h.failures_in_window} failures cannot fit in "
                                            f"a window of {h.window} boards")
    t.done()
    return h
def _rate(t: Table, key: str, value: object) -> int:
    """A baud rate a USB-UART bridge can run: 9600 up to the fastest bridge's."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise t.error(key, f"must be an int baud rate, not {value!r}")
    if value < 9600 or value > MAX_BRIDGE_BAUD:
        raise t.error(key, f"{value} is beyond any USB-UART bridge (9600 to "
                           f"{MAX_BRIDGE_BAUD})")
    return value


def _line_rates(t: Table) -> tuple[int | Literal["auto"], int | None, dict[str, int],
                                    dict[str, int]]:
    """[ports] baud (an int or "auto"), max_baud, [ports.baud_by_adapter], baud_by_port."""
    raw = t.get("baud", (int, str), 921600)
    baud: int | Literal["auto"] = "auto"
    if isinstance(raw, str):
        if raw != "auto":
            raise t.error("baud", f'must be an int baud rate or "auto", not {raw!r}')
    else:
        baud = _rate(t, "baud", raw)
    max_baud = None
    if "max_baud" in t.data:
        max_baud = t.get("max_baud", int, 0)
        if max_baud < ROM_BAUD or max_baud > MAX_BRIDGE_BAUD:
            raise t.error("max_baud", f"{max_baud} is outside what a bridge runs ({ROM_BAUD} "
                                      f"to {MAX_BRIDGE_BAUD})")
        if isinstance(baud, int) and baud > max_baud:
            raise t.error("baud", f"{baud} is above [ports] max_baud ({max_baud})")
    by_adapter: dict[str, int] = {}
    for key, value in t.get("baud_by_adapter", dict, {}).items():
        reason = adapter_key_error(key)
        if reason is not None:
            raise t.error(f"baud_by_adapter.{key}", reason)
        by_adapter[key.lower()] = _rate(t, f"baud_by_adapter.{key}", value)
    by_port = {key: _rate(t, f"baud_by_port.{key}", value)
               for key, value in t.get("baud_by_port", dict, {}).items()}
    return baud, max_baud, by_adapter, by_port


def _check_glob(t: Table, pattern: str) -> None:
    folder = Path(pattern).parent
    if not pattern.strip() or Path(pattern).name in ("", "."):
        raise t.error("watch", f"{pattern!r} is not a glob of port names")
    if glob.has_magic(str(folder)):
        raise t.error("watch", f"{pattern!r}: wildcards are allowed only in the last "
                               "part (the folder is watched for new ports)")
    name = Path(pattern).name
    if name.count("[") != name.count("]") or re.search(r"\[[^\]]*$", name):
        raise t.error("watch", f"{pattern!r} is not a valid glob: unclosed '['")
