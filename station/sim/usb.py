"""How a board hangs off the host's USB: a UART bridge, USB-Serial/JTAG or USB-OTG.

The kind decides two things the station meets on a real line, and that a pty alone
cannot show:

* **Re-enumeration.** A native-USB board (the chip's own USB-Serial/JTAG, 303a:1001,
  or USB-OTG) *is* the USB device: when the chip resets, the device drops off the bus
  and enumerates again 0.2-2 s later as a new device node at the same USB location
  (same ``/dev/serial/by-path`` name). USB-OTG boards come back with the app's product
  id (TinyUSB CDC, 303a:4001) instead of the ROM's (esptool: ``uses_usb_otg()`` expects
  product id == the chip's ``IMAGE_CHIP_ID`` in download mode). A board behind a UART
  bridge keeps its port through any chip reset: the bridge stays powered.
* **Baud limit.** A bridge garbles bytes above its highest baud (:mod:`.bridge`);
  native USB ignores the baud rate altogether.

The product ids of the two native kinds come from esptool (``ESPRESSIF_VID``,
``USB_JTAG_SERIAL_PID``, ``IMAGE_CHIP_ID``); which chip has which peripheral from its
target class (``USB_SERIAL_JTAG_SUPPORTED``, ``USB_OTG_SUPPORTED``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from esptool.loader import ESPLoader

from .bridge import BRIDGES, DEFAULT_BRIDGE, Bridge
from .chips import ChipSpec

UsbKind = Literal["bridge", "jtag", "otg"]
USB_KINDS: tuple[UsbKind, ...] = ("bridge", "jtag", "otg")

# ESP-IDF's TinyUSB CDC app enumerates as 303a:4001 (REAL-RIGS.md, esptool PR #980).
TINYUSB_CDC_PID = 0x4001
# Native USB ignores the baud rate; USB-Serial/JTAG moves ~1.4 Mbit/s with the stub
# (esptool#779, REAL-RIGS.md). USB-OTG CDC is full speed too: the same figure is used.
NATIVE_USB_BYTES_PER_S = 1.4e6 / 8
# A native device is gone this long after a reset before it enumerates again.
DEFAULT_REENUMERATE_GAP = (0.2, 2.0)


def vid_pid(vid: int, pid: int) -> str:
    return f"{vid:04x}:{pid:04x}"


@dataclass(frozen=True)
class UsbLink:
    """The USB side of one board."""

    kind: UsbKind
    bridge: Bridge | None  # None on native USB
    vid: int
    pid: int  # in download mode (what the host sees while esptool talks to the ROM)
    app_pid: int  # after a reset into the application

    @property
    def native(self) -> bool:
        """The chip is the USB device: its resets re-enumerate the port."""
        return self.kind != "bridge"

    @property
    def bytes_per_s(self) -> float | None:
        """Throughput independent of the baud rate (native USB); None: the UART's."""
        return NATIVE_USB_BYTES_PER_S if self.native else None

    @property
    def max_baud(self) -> int | None:
        """Highest baud the link carries intact; None: native USB ignores the baud."""
        return self.bridge.max_baud if self.bridge is not None else None

    def describe(self) -> dict[str, object]:
        """The fields of the ``plugged`` event."""
        return {
            "usb": self.kind,
            "vid_pid": vid_pid(self.vid, self.pid),
            "app_vid_pid": vid_pid(self.vid, self.app_pid),
            "bridge": self.bridge.name if self.bridge is not None else None,
            "max_baud": self.max_baud,
        }


def usb_link(spec: ChipSpec, kind: str = "bridge", bridge: str | None = None) -> UsbLink:
    """Validate and build a board's USB link; errors name the choices."""
    if kind not in USB_KINDS:
        raise ValueError(f"unknown USB kind {kind!r}; choose one of {', '.join(USB_KINDS)}")
    if kind == "bridge":
        name = (bridge or DEFAULT_BRIDGE).lower()
        if name not in BRIDGES:
            raise ValueError(f"unknown bridge {name!r}; choose one of {', '.join(BRIDGES)}")
        b = BRIDGES[name]
        return UsbLink("bridge", b, b.vid, b.pid, b.pid)
    if bridge is not None:
        raise ValueError(f"a {kind} board has no bridge (got bridge={bridge!r})")
    if kind not in spec.usb_kinds:
        raise ValueError(f"{spec.name} has no USB-{'Serial/JTAG' if kind == 'jtag' else 'OTG'}; "
                         f"it can be plugged as {', '.join(spec.usb_kinds)}")
    if kind == "jtag":
        pid = ESPLoader.USB_JTAG_SERIAL_PID
        return UsbLink("jtag", None, ESPLoader.ESPRESSIF_VID, pid, pid)
    return UsbLink("otg", None, ESPLoader.ESPRESSIF_VID, spec.chip_id, TINYUSB_CDC_PID)


def draw_gap(gap: float | tuple[float, float], rng: random.Random) -> float:
    """Seconds a native board stays off the bus: fixed, or uniform in (low, high)."""
    if isinstance(gap, tuple):
        low, high = gap
        return rng.uniform(low, high)
    return gap


def parse_gap(text: str) -> float | tuple[float, float]:
    """``0.5`` (fixed) or ``0.2-2`` (uniform range), seconds, as --reenumerate-gap takes."""
    low, sep, high = text.partition("-")
    message = f"--reenumerate-gap must be S or MIN-MAX seconds, got {text!r}"
    try:
        first, second = float(low), float(high) if sep else float(low)
    except ValueError:
        raise ValueError(message) from None
    if first < 0 or second < first:
        raise ValueError(message)
    return (first, second) if sep else first
