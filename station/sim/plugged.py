"""A plugged board's names: its hub port's by-path name, its MAC, and the record a test
or the CLI gets back (`PluggedBoard`); what its flash holds when plugged. A piece of
rig.py, which plugs them.

A board the rig has plugged before (a replug) is the same chip: its flash dump and eFuse
file are loaded. So is a board an earlier run left files for, when the rig persists
(``--persist``); otherwise a new run's board is a new chip, whatever the directory holds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .bridge import DEFAULT_BRIDGE
from .faults import Faults

ESPRESSIF_OUI = bytes.fromhex("240ac4")
PRELOADED_SIZE = 2 * 1024 * 1024  # how much old firmware a preloaded board carries


def by_path_name(index: int) -> str:
    """The by-path style name of hub port ``index`` (0-based)."""
    return f"pci-0000:00:14.0-usb-0:1.{index + 1}:1.0-port0"


def parse_size(text: str) -> int:
    """Parse a flash size such as ``4MB``, ``512KB`` or ``0x400000``."""
    t = text.strip().upper()
    for suffix, factor in (("MB", 1 << 20), ("KB", 1 << 10), ("M", 1 << 20), ("K", 1 << 10)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * factor)
    return int(t, 0)


def fill_flash(data: bytearray, preloaded_seed: str | None, dump: Path | None) -> None:
    """A plugged board's flash: blank (0xFF) from the factory; old firmware (seeded
    pseudo-random bytes in the first 2 MB) when preloaded; what it held when it is the
    same board again (``dump``: a replug, or ``--persist`` and an earlier run's file)."""
    if preloaded_seed is not None:
        old = min(len(data), PRELOADED_SIZE)
        data[:old] = random.Random(preloaded_seed).randbytes(old)
    if dump is not None and dump.exists():
        previous = dump.read_bytes()
        data[:len(previous)] = previous[:len(data)]


def format_mac(mac: bytes) -> str:
    return mac.hex(":")


class MacAllocator:
    """Deterministic, unique MACs: Espressif OUI + a NIC part drawn from the seed.

    The NIC part is a multiple of 4, because ESP-IDF derives the Wi-Fi AP, Bluetooth
    and Ethernet MACs by adding 1..3 to the base MAC.
    """

    def __init__(self, seed: int, oui: bytes = ESPRESSIF_OUI) -> None:
        self._rng = random.Random(seed)
        self._oui = oui
        self._used: set[bytes] = set()
        self._plugged: set[bytes] = set()

    def reserve(self, mac: bytes) -> None:
        if mac in self._plugged:
            raise ValueError(f"MAC {format_mac(mac)} is already plugged in this rig")
        self._used.add(mac)
        self._plugged.add(mac)

    def release(self, mac: bytes) -> None:
        """The board was pulled out: it may be plugged again (never drawn again)."""
        self._plugged.discard(mac)

    def next(self) -> bytes:
        while True:
            mac = self._oui + (self._rng.getrandbits(22) * 4).to_bytes(3, "big")
            if mac not in self._used:
                self._used.add(mac)
                self._plugged.add(mac)
                return mac


@dataclass(frozen=True)
class PluggedBoard:
    """What a test or the CLI needs to know about a plugged board."""

    index: int
    port: str  # the by-path symlink: what the station sees
    pty: str  # the slave device it points at
    mac: str  # "24:0a:c4:12:34:56"
    chip: str
    dump_path: Path
    faults: Faults = field(default_factory=Faults)
    usb: str = "bridge"  # "bridge" | "jtag" | "otg"
    bridge: str | None = DEFAULT_BRIDGE  # bridge chip, None on native USB
    vid_pid: str = "10c4:ea60"  # what the host would see in download mode
    max_baud: int | None = None  # highest baud the bridge carries; None: native
    preloaded: bool = False  # came with old firmware (non-blank flash)
    stub_model: str = "flasher"  # whose flash schedule the stub follows
    rfc2217: str | None = None  # "rfc2217://127.0.0.1:PORT" when it has an RFC 2217 face
    reset_circuit: str | None = None  # "auto" | "none" on RFC 2217 bridge boards
    app_line: str | None = None  # what its "app" prints after its app_init lines
    en_cap_uf: float | None = None  # the EN capacitor of its reset circuit
    revision: str | None = None  # silicon revision other than chips._REVISIONS ("v1.0")
