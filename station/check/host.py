"""`station check`'s look at the host: what breaks a real native-USB rig, and the fix.

None of these stop a station from starting (a rig may run fine without udev rules if
ModemManager is not installed), so they are warnings, each with its fix, never errors:

- ModemManager running, with no udev rule that sets `ID_MM_DEVICE_IGNORE` for Espressif
  (303a: USB-Serial/JTAG and USB-OTG) and the common bridges: it opens every new ttyACM
  port for 10-20 s of AT probing, so the station finds the port busy or the bootloader
  sync upset (esptool docs "troubleshooting"; ModemManager's udev filter).
- brltty installed: its udev rules claim CH340 and CP210x ports for braille displays
  (pop-os/pop#2475), and the port vanishes or stays busy.
- the station's user not in the group that owns the tty nodes (dialout on Debian and
  Ubuntu, uucp on Arch): every port fails with "permission denied".
- a USB 2.0 hub whose sysfs says single-TT (`bDeviceProtocol` 1): all full-speed devices
  behind it (every bridge and USB-Serial/JTAG) share one 12 Mbit/s transaction
  translator, so 16 boards at 921600 baud no longer run in parallel.

Everything is read below `root` (`/` on a rig): /proc for running programs, the udev rule
folders, /usr/bin, /etc/group, /dev and /sys/bus/usb/devices. Tests point `root` at a
fixture tree (the CLI takes it from STATION_HOST_ROOT, which exists for tests only).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HOST_ROOT_ENV = "STATION_HOST_ROOT"
UDEV_RULE_DIRS = ("etc/udev/rules.d", "run/udev/rules.d", "lib/udev/rules.d",
                  "usr/lib/udev/rules.d")
# Vendor ids ModemManager must leave alone on a rig: Espressif's own USB and the bridges.
RIG_VENDORS = {"303a": "Espressif USB-Serial/JTAG and USB-OTG", "10c4": "CP210x",
               "1a86": "CH34x", "0403": "FTDI"}
BRLTTY_PATHS = ("usr/bin/brltty", "bin/brltty", "usr/sbin/brltty", "sbin/brltty")
_MM_IGNORE = re.compile(r'ENV\{ID_MM_DEVICE_IGNORE\}\s*\+?=\s*"1"')
_VENDOR = re.compile(r'ATTRS?\{idVendor\}\s*==\s*"([0-9a-fA-F]{4})"')
_PRODUCT = re.compile(r"ATTRS?\{idProduct\}\s*==")
_LOCATION = re.compile(r"ENV\{ID_PATH\}|DEVPATH|KERNELS")  # a rule by the hub's ports


@dataclass(frozen=True)
class Finding:
    """A problem of the host and how to fix it."""

    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.problem}; fix: {self.fix}"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def current(cls) -> User:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, frozenset([os.getegid(), *os.getgroups()]))


def findings(root: Path = Path("/"), ports: Sequence[str] = (),
             user: User | None = None) -> list[Finding]:
    """Everything wrong with the host for a rig; `ports` are the ports plugged now."""
    user = user or User.current()
    return [*_modemmanager(root), *_brltty(root), *_tty_group(root, ports, user),
            *_single_tt_hubs(root)]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _running(root: Path, name: str) -> bool:
    try:
        pids = [p for p in os.listdir(root / "proc") if p.isdigit()]
    except OSError:
        return False
    return any(_read(root / "proc" / pid / "comm").strip() == name for pid in pids)


def _rule_lines(root: Path) -> Iterable[str]:
    for folder in UDEV_RULE_DIRS:
        try:
            files = sorted((root / folder).glob("*.rules"))
        except OSError:
            continue
        for file in files:
            for line in _read(file).splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    yield line


def _mm_ignored_vendors(root: Path) -> set[str] | None:
    """Vendors a rule tells ModemManager to ignore; None: a rule ignores every device at
    some USB location (the hub's ID_PATH), which covers the rig's boards whatever they
    are. Rules by anything else (an interface class, one product) leave vendors probed."""
    vendors: set[str] = set()
    for line in _rule_lines(root):
        if not _MM_IGNORE.search(line) or _PRODUCT.search(line):
            continue  # a rule for one product leaves the vendor's other products probed
        found = _VENDOR.findall(line)
        if not found and _LOCATION.search(line):
            return None
        vendors |= {v.lower() for v in found}
    return vendors


def _modemmanager(root: Path) -> list[Finding]:
    if not _running(root, "ModemManager"):
        return []
    ignored = _mm_ignored_vendors(root)
    if ignored is None:
        return []
    missing = [v for v in RIG_VENDORS if v not in ignored]
    if not missing:
        return []
    names = ", ".join(f"{v} ({RIG_VENDORS[v]})" for v in missing)
    rules = " ".join(f'ATTRS{{idVendor}}=="{v}", ENV{{ID_MM_DEVICE_IGNORE}}="1";'
                     for v in missing)
    return [Finding(
        f"ModemManager is running and no udev rule sets ID_MM_DEVICE_IGNORE for {names}: "
        "it opens new ttyACM/ttyUSB ports for 10-20 s of AT probing, and boards fail "
        "busy or out of sync",
        f"add /etc/udev/rules.d/99-station.rules with {rules} then `udevadm control "
        "--reload` (see config/udev-notes.md); or `systemctl disable --now ModemManager`")]


def _brltty(root: Path) -> list[Finding]:
    found = [p for p in BRLTTY_PATHS if (root / p).exists()]
    for folder in UDEV_RULE_DIRS:
        try:
            found += [str(f.relative_to(root)) for f in (root / folder).glob("*brltty*")]
        except OSError:
            continue
    if not found:
        return []
    return [Finding(
        f"brltty is installed (/{found[0]}): its udev rules claim CH340 and CP210x serial "
        "ports for braille displays, and those ports vanish or stay busy",
        "`sudo apt remove brltty` if no braille display is used, or mask its rule: "
        "`ln -s /dev/null /etc/udev/rules.d/85-brltty.rules`")]


def _group_name(root: Path, gid: int) -> str:
    for line in _read(root / "etc" / "group").splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[2] == str(gid):
            return parts[0]
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _group(root: Path, name: str) -> tuple[int, set[str]] | None:
    for line in _read(root / "etc" / "group").splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[0] == name and parts[2].isdigit():
            return int(parts[2]), {m for m in parts[3].split(",") if m}
    return None


def _can_use(st: os.stat_result, user: User) -> bool:
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        need = stat.S_IRUSR | stat.S_IWUSR
    elif st.st_gid in user.gids:
        need = stat.S_IRGRP | stat.S_IWGRP
    else:
        need = stat.S_IROTH | stat.S_IWOTH
    return st.st_mode & need == need


def _tty_group(root: Path, ports: Sequence[str], user: User) -> list[Finding]:
    nodes = [*(os.path.realpath(p) for p in ports),
             *(str(p) for pattern in ("ttyUSB*", "ttyACM*")
               for p in sorted((root / "dev").glob(pattern)))]
    out: dict[int, Finding] = {}
    for node in dict.fromkeys(nodes):
        try:
            st = os.stat(node)
        except OSError:
            continue
        if _can_use(st, user) or st.st_gid in out:
            continue
        group = _group_name(root, st.st_gid)
        out[st.st_gid] = Finding(
            f"{node} belongs to group '{group}' and {user.name} is not in it: the station "
            "cannot open the rig's ports",
            f"`sudo usermod -aG {group} {user.name}`, then log in again (see "
            "config/udev-notes.md)")
    if nodes or user.uid == 0:
        return list(out.values())
    dialout = _group(root, "dialout")  # nothing plugged: judge by the usual group
    if dialout is not None and dialout[0] not in user.gids and user.name not in dialout[1]:
        return [Finding(f"{user.name} is not in group 'dialout', which owns serial ports "
                        "on this system: the station will not be able to open them",
                        f"`sudo usermod -aG dialout {user.name}`, then log in again")]
    return []


def _single_tt_hubs(root: Path) -> list[Finding]:
    out = []
    devices = root / "sys" / "bus" / "usb" / "devices"
    try:
        entries = sorted(devices.iterdir())
    except OSError:
        return []
    for dev in entries:
        name = dev.name
        if ":" in name or name.startswith("usb"):
            continue  # interfaces, and root hubs (the host controller, not a hub on the desk)
        if _read(dev / "bDeviceClass").strip() != "09":
            continue
        if _read(dev / "bDeviceProtocol").strip() != "01":
            continue  # 00: a full-speed hub; 02: multi-TT
        product = _read(dev / "product").strip() or "hub"
        ids = f"{_read(dev / 'idVendor').strip()}:{_read(dev / 'idProduct').strip()}"
        out.append(Finding(
            f"USB hub {name} ({product}, {ids}) is single-TT: every full-speed board behind "
            "it (USB-UART bridges and USB-Serial/JTAG are full speed) shares one 12 Mbit/s, "
            "so boards no longer flash in parallel at full baud",
            "use a multi-TT hub (`lsusb -v` says \"TT per port\"), or spread the boards "
            "over several hubs or root ports"))
    return out
