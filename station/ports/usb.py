"""What the host knows about a serial port's USB device, before anyone opens it.

esptool 5.6 itself decides "native USB" only from the port's VID:PID on the host
(`uses_usb_jtag_serial()` / `uses_usb_otg()` in its loader); the station reads the same
facts from pyserial's sysfs port info (`serial.tools.list_ports_linux.SysFS`), which is
what `comports()` builds for one tty:

- 303a:1001 is the USB-Serial/JTAG controller of ESP32-S3/C3/C5/C6/C61/H2/P4. Its USB
  serial number is the chip's MAC ("F4:12:FA:43:5C:88"), so the board can be named
  without touching it.
- any other 303a product id is the chip's USB-OTG (the ROM announces the chip's image
  id as product id, the app another one after re-enumerating).

Both reset by dropping off the bus. esptool recommends its watchdog reset for them (a
full system reset: a DTR/RTS reset after the BOOT button only resets the core and leaves
the chip in download mode), and falls back to the classic hard reset itself on chips
that have no watchdog reset. A pty, an RFC 2217 port or a bridge has no 303a VID: None.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from esp_pylib.constants import ESPRESSIF_VID, USB_JTAG_SERIAL_PID
from serial.tools.list_ports_linux import SysFS

from station.ports.baud import UNKNOWN, Adapter
from station.ports.baud import classify as classify_adapter

NativeKind = Literal["jtag", "otg"]
_MAC = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True)
class NativeUsb:
    """A port that is the chip's own USB."""

    kind: NativeKind
    vid: int
    pid: int
    serial_number: str | None

    @property
    def mac(self) -> str | None:
        """The MAC a USB-Serial/JTAG reports as its serial number (12 lower-case hex)."""
        if self.kind != "jtag" or not self.serial_number:
            return None
        text = self.serial_number.replace(":", "").replace("-", "").lower()
        return text if _MAC.match(text) else None


def classify(info: Any) -> NativeUsb | None:
    """pyserial port info (vid, pid, serial_number) -> NativeUsb, or None (not native)."""
    vid, pid = getattr(info, "vid", None), getattr(info, "pid", None)
    if vid != ESPRESSIF_VID or pid is None:
        return None
    kind: NativeKind = "jtag" if pid == USB_JTAG_SERIAL_PID else "otg"
    return NativeUsb(kind=kind, vid=vid, pid=pid,
                     serial_number=getattr(info, "serial_number", None))


def bridge_vid(port: str) -> int | None:
    """The USB vendor id of `port` if it is a USB-UART bridge (a USB device that is not
    Espressif's): the bridge stays on the bus through every chip reset. None for native
    USB and for ports without USB (pty, RFC 2217), which may re-enumerate for all we know."""
    try:
        vid = SysFS(os.path.realpath(port)).vid
    except Exception:  # the device vanished mid-read
        return None
    return vid if isinstance(vid, int) and vid != ESPRESSIF_VID else None


def native_usb(port: str) -> NativeUsb | None:
    """The native-USB facts of `port` (a device node or a link to one), from sysfs."""
    try:
        return classify(SysFS(os.path.realpath(port)))
    except Exception:  # the device vanished mid-read: sysfs is half there
        return None


def usb_adapter(port: str) -> Adapter:
    """The USB-UART bridge (or native USB) behind `port`, from the same sysfs info:
    VID:PID and product string (station/ports/baud.py names it). A pty: unknown."""
    try:
        return classify_adapter(SysFS(os.path.realpath(port)))
    except Exception:  # the device vanished mid-read: sysfs is half there
        return UNKNOWN


def holders(port: str) -> list[str]:
    """"name (pid N)" of the processes that have `port`'s device node open, as far as
    /proc lets this user see: names the program to stop when a port is busy."""
    try:
        node = os.path.realpath(port)
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    found = []
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(os.readlink(f"/proc/{pid}/fd/{fd}") == node for fd in fds):
                continue
            with open(f"/proc/{pid}/comm") as fh:
                found.append(f"{fh.read().strip()} (pid {pid})")
        except OSError:  # gone, or not ours to look at
            continue
    return found
