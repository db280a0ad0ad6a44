"""The serial line's rate: which baud each port gets, and the ladder down when it fails.

Why it looks like this:

- The right rate depends on the USB-UART bridge, and the host knows the bridge before it
  opens the port: sysfs holds its VID:PID and product string (pyserial's port info). The
  limits below are the vendors' and drivers' (REAL-RIGS.md "Bridges and baud"; esptool
  #435): CP2102/2103 921600 (higher rates undefined in the Linux cp210x driver), CP2104
  2 Mbaud, CP2102N and FT232R 3 Mbaud, CH343/CH9102 6 Mbaud, CH340 unreliable above
  460800. CP2102, CP2102N and CP2104 share 10c4:ea60: only the product string tells them
  apart, and an unreadable one gets the slowest of them.
- Sources of the tops (issue #23): Silicon Labs' CP2102/9 data sheet "300 bps to 1 Mbps"
  (the highest standard rate below is 921600), CP2104 "300 bps to 2 Mbps" (section 6.1),
  CP2102N "up to 3 Mbaud"; Linux drivers/usb/serial/cp210x.c `cp210x_init_max_speed`
  clamps the same way (CP2102/2103 1000000, CP2104 2000000, CP2102N 3000000), so a
  CP2102 asked for 3 Mbaud runs at 1 Mbaud while the chip runs at 3: nothing gets
  through. FTDI's FT232R and FT231X data sheets: "up to 3 Mbaud"; FT2232D 3 Mbaud (its
  id 0403:6010 is shared with the 12-Mbaud FT2232H: the lower is kept); WCH's CH343
  6 Mbaud.
- Native USB-Serial/JTAG and USB-OTG ignore the baud rate (esptool#779): no change.
- esptool's `change_baud` never checks that the bridge followed (loader.py), and a
  cable or a hub can be worse than the bridge's data sheet. So every rate is tried, not
  trusted: a line that fails after a baud change steps down the ladder and the board
  goes on; the slot remembers (a bad cable stays bad) until the station restarts.
- A failure the table explains is not walked rung by rung (issue #23): a CP2102 that
  failed at 3 Mbaud goes straight to 921600, one failure instead of three (`rung_after`),
  and a rate the table says the adapter cannot carry is tried on the ROM, before the
  stub (`beyond`: a failure there costs no stub upload). A failure the table does not
  explain (an unknown adapter, or a rate its bridge carries: a cable) walks the ladder.
- The ladder ends at the ROM's own 115200: a board that fails there fails as before
  (retries, then `failed`), so a mute board is never stepped down forever.

This module is pure (no esptool, no serial I/O): config/ports.py validates keys with it,
flash/_connect.py asks it for rates and reports steps through it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from esp_pylib.constants import ESPRESSIF_VID  # native USB-Serial/JTAG and USB-OTG

ROM_BAUD = 115200
LADDER = (3_000_000, 2_000_000, 1_500_000, 921_600, 460_800, ROM_BAUD)
"""Standard rates tried top down after a line failure (issue #11)."""
MAX_BRIDGE_BAUD = 6_000_000  # CH343/CH9102, the fastest USB-UART bridge listed
AUTO_MAX_BAUD = 3_000_000  # [ports] max_baud's default with baud = "auto"
AUTO_UNKNOWN_BAUD = 921_600  # an unknown adapter under "auto": what most bridges carry
UNKNOWN_KEY = "other"  # [ports.baud_by_adapter] other = N: unknown adapters under "auto"

_VID_PID = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{4})$")


@dataclass(frozen=True)
class Bridge:
    """A known USB-UART bridge: its USB id, product-string token, and top baud."""

    name: str
    vid: int
    pid: int
    max_baud: int

    @property
    def vid_pid(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"


BRIDGES: dict[str, Bridge] = {b.name: b for b in (
    Bridge("cp2102", 0x10C4, 0xEA60, 921_600),
    Bridge("cp2104", 0x10C4, 0xEA60, 2_000_000),
    Bridge("cp2102n", 0x10C4, 0xEA60, 3_000_000),
    Bridge("ch340", 0x1A86, 0x7523, 460_800),
    Bridge("ch343", 0x1A86, 0x55D3, 6_000_000),
    Bridge("ch9102", 0x1A86, 0x55D4, 6_000_000),
    Bridge("ft232r", 0x0403, 0x6001, 3_000_000),
    Bridge("ft2232", 0x0403, 0x6010, 3_000_000),  # FT2232D 3M; FT2232H (same id) 12M
    Bridge("ft231x", 0x0403, 0x6015, 3_000_000),  # FT230X/FT231X share the id, both 3M
)}


@dataclass(frozen=True)
class Adapter:
    """What sysfs says about a port's USB device; `bridge` when we know the chip."""

    vid: int | None = None
    pid: int | None = None
    product: str | None = None
    bridge: Bridge | None = None
    # every bridge the port may be: several where they share the USB id and the product
    # string does not say which (`bridge` is then the slowest of them)
    candidates: tuple[Bridge, ...] = ()

    @property
    def tops(self) -> tuple[int, ...]:
        """The top rates the port's bridge may have (data sheets), lowest first; () when
        the adapter is not in the table."""
        bridges = self.candidates or ((self.bridge,) if self.bridge is not None else ())
        return tuple(sorted({b.max_baud for b in bridges}))

    @property
    def native(self) -> bool:
        return self.vid == ESPRESSIF_VID

    @property
    def vid_pid(self) -> str | None:
        return None if self.vid is None or self.pid is None else f"{self.vid:04x}:{self.pid:04x}"

    def describe(self) -> str:
        if self.native:
            return f"native USB {self.vid_pid}"
        if self.bridge is not None:
            return self.bridge.name
        return self.vid_pid or "unknown adapter"


UNKNOWN = Adapter()


def classify(info: Any) -> Adapter:
    """pyserial port info (vid, pid, product) -> Adapter. Shared ids go by product."""
    vid, pid = getattr(info, "vid", None), getattr(info, "pid", None)
    if vid is None or pid is None:
        return UNKNOWN
    product = getattr(info, "product", None)
    same_id = [b for b in BRIDGES.values() if (b.vid, b.pid) == (vid, pid)]
    token = (product or "").split()[0].lower() if (product or "").strip() else ""
    named = [b for b in same_id if b.name == token]
    if named:
        bridge: Bridge | None = named[0]
    elif len(same_id) == 1:
        bridge = same_id[0]
    else:  # several chips share the id and the product is unknown: the slowest is safe
        bridge = min(same_id, key=lambda b: b.max_baud) if same_id else None
    candidates = (bridge,) if named and bridge is not None else tuple(same_id)
    return Adapter(vid=vid, pid=pid, product=product, bridge=bridge, candidates=candidates)


def adapter_key_error(key: str) -> str | None:
    """Why `key` is no [ports.baud_by_adapter] key, or None if it is one."""
    k = key.lower()
    if k == UNKNOWN_KEY or k in BRIDGES or _VID_PID.match(k):
        return None
    return (f"neither a VID:PID like \"10c4:ea60\" nor a known adapter "
            f"({', '.join(BRIDGES)}, or {UNKNOWN_KEY})")


def next_lower(rate: int) -> int | None:
    """The next ladder rate below `rate`; None at the ROM's rate (the ladder's end)."""
    return next((r for r in LADDER if r < rate), None)


def beyond(rate: int, adapter: Adapter) -> bool:
    """Whether `rate` is above every top the adapter may have: its data sheet says it
    cannot carry it. Still tried (a table can be wrong, the configured rate is the
    user's), but where a failure is cheap: on the ROM, before the stub."""
    tops = adapter.tops
    return bool(tops) and rate > tops[-1]


def rung_after(rate: int, adapter: Adapter) -> int | None:
    """The rate to try after a line failure at `rate`; None at the ladder's end.

    Where the adapter's table entry explains the failure (some bridge it may be tops out
    below `rate`), the highest ladder rate within the fastest such top: one step, however
    many rungs it skips. Otherwise (an unknown adapter, or one whose bridge carries `rate`:
    a cable or a hub) the next rung down."""
    lower = next_lower(rate)
    if lower is None:
        return None
    below = [top for top in adapter.tops if top < rate]
    if not below:
        return lower
    return max(r for r in LADDER if r <= max(below[-1], ROM_BAUD))


LINE_SIGNS = ("Timed out", "timed out", "Invalid head of packet", "Invalid SLIP escape",
              "Packet content transfer stopped", "No serial data received", "checksum",
              "Checksum", "no matching reply", "Response doesn't match request",
              "No more data to read")
"""esptool failure texts that point at the serial line rather than the chip or flash."""


def points_at_line(message: str) -> bool:
    return any(sign in message for sign in LINE_SIGNS)


@dataclass(frozen=True)
class BaudSettings:
    """[ports] baud, max_baud, baud_by_adapter, baud_by_port (validated by config/ports.py)."""

    baud: int | None = 921_600  # None: "auto" (the adapter's top rate)
    max_baud: int | None = None  # None: AUTO_MAX_BAUD under "auto", else no cap
    by_adapter: Mapping[str, int] = field(default_factory=dict)  # lower-case keys
    by_port: Mapping[str, int] = field(default_factory=dict)  # slot, USB location or path

    @property
    def cap(self) -> int | None:
        if self.max_baud is not None:
            return self.max_baud
        return AUTO_MAX_BAUD if self.baud is None else None

    def rate_for(self, adapter: Adapter, keys: tuple[str, ...] = ()) -> tuple[int | None, str]:
        """(rate, why) for a port; rate None: native USB, the baud is left alone.

        Order: the port's own rate ([ports.baud_by_port], by slot, location or path),
        the adapter's by name, then by VID:PID, then `baud` (or, under "auto", the
        bridge's top rate, or `other`/921600 for an unknown adapter); max_baud caps all.
        """
        if adapter.native:
            return None, adapter.describe()
        rate, why = None, ""
        for key in keys:
            if key in self.by_port:
                rate, why = self.by_port[key], f"baud_by_port {key}"
                break
        if rate is None:
            for name in (adapter.bridge.name if adapter.bridge else None, adapter.vid_pid):
                if name is not None and name in self.by_adapter:
                    rate, why = self.by_adapter[name], f"baud_by_adapter {name}"
                    break
        if rate is None and self.baud is not None:
            rate, why = self.baud, "baud"
        if rate is None and adapter.bridge is not None:
            rate, why = adapter.bridge.max_baud, f"auto: {adapter.bridge.name}"
        if rate is None:
            rate = self.by_adapter.get(UNKNOWN_KEY, AUTO_UNKNOWN_BAUD)
            why = f"auto: {adapter.describe()}"
        cap = self.cap
        if cap is not None and rate > cap:
            rate, why = cap, f"{why}, max_baud"
        return rate, why


@dataclass(frozen=True)
class Step:
    """One step down the ladder, with the failure that forced it."""

    slot: str
    from_baud: int
    to_baud: int
    reason: str


@dataclass(frozen=True)
class RateNote:
    """What the flasher reports about a board's line: its rate, or a step down."""

    baud: int | None
    adapter: str
    stepped_from: int | None = None
    reason: str | None = None
    remembered: bool = False


class SlotMemory:
    """The rate each slot stepped down to, until the station restarts (thread-safe:
    sessions step down on their own threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rates: dict[str, Step] = {}

    def remember(self, step: Step) -> None:
        with self._lock:
            old = self._rates.get(step.slot)
            if old is None or step.to_baud < old.to_baud:
                self._rates[step.slot] = step

    def recall(self, slot: str) -> Step | None:
        with self._lock:
            return self._rates.get(slot)

    def limit(self, slot: str, rate: int) -> tuple[int, Step | None]:
        """`rate`, lowered to what the slot stepped down to before (and that step)."""
        step = self.recall(slot)
        if step is not None and step.to_baud < rate:
            return step.to_baud, step
        return rate, None
