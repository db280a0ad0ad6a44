"""Where boards appear, and the line to them, up to where esptool takes over.

    hotplug.py        local ports: which exist now, and when they come and go (watchdog)
    remote.py         hub hosts' ports (RFC 2217): presence, the connection kept between jobs
    remoteurl.py      what a remote port is called: the `rfc2217://host:port` rules
    usb.py            what sysfs says about a port's USB device: bridge or the chip's own USB
    reenumeration.py  the same-board rule: a port that vanishes after our reset comes back
    baud.py           the line rate per port and adapter, and the ladder down when it fails
    serial.py         the serial edge under esptool: abortable ports, esptool's logger
"""

from station.ports.baud import (
    MAX_BRIDGE_BAUD,
    ROM_BAUD,
    Adapter,
    BaudSettings,
    RateNote,
    SlotMemory,
    Step,
    adapter_key_error,
    beyond,
    next_lower,
    points_at_line,
    rung_after,
)
from station.ports.hotplug import PortInfo, PortWatcher, scan
from station.ports.reenumeration import Reenumerations
from station.ports.remote import PROBE_TIMEOUT, RemotePorts, probe_all
from station.ports.remoteurl import RemoteLinks, host_port, is_remote, remote_url_problem
from station.ports.serial import (
    LocalPort,
    RemotePort,
    first_line,
    open_error,
    quiet_esptool,
    set_port_tag,
)
from station.ports.usb import NativeUsb, bridge_vid, native_usb, usb_adapter

__all__ = [
    "MAX_BRIDGE_BAUD", "PROBE_TIMEOUT", "ROM_BAUD", "Adapter", "BaudSettings", "LocalPort",
    "NativeUsb", "PortInfo", "PortWatcher", "RateNote", "Reenumerations", "RemoteLinks",
    "RemotePort", "RemotePorts", "SlotMemory", "Step", "adapter_key_error", "beyond",
    "bridge_vid", "first_line", "host_port", "is_remote", "native_usb", "next_lower", "open_error",
    "points_at_line", "probe_all", "quiet_esptool", "remote_url_problem", "rung_after", "scan",
    "set_port_tag", "usb_adapter",
]
