"""`station check` on the host (station/check/host.py): ModemManager, brltty, the tty
group, single-TT hubs. Each problem is laid out in a fixture tree shaped like the parts
of / the check reads (/proc, udev rule folders, /usr/bin, /etc/group, /dev, /sys), and
the real `station check` is pointed at it; on this machine it must not fail either.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from station.check.host import HOST_ROOT_ENV, User, findings
from station.daemon import EXIT_OK
from tests.test_bad_inputs import Firmware, Site

pytestmark = pytest.mark.timeout(120)

USER = User("op", 1000, frozenset({1000}))


def put(root: Path, rel: str, text: str = "") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def modemmanager(root: Path) -> None:
    put(root, "proc/1/comm", "systemd\n")
    put(root, "proc/812/comm", "ModemManager\n")
    # ModemManager's own filter, product by product: it leaves the vendors probed
    put(root, "usr/lib/udev/rules.d/77-mm-usb-device-blacklist.rules",
        'ATTRS{idVendor}=="0403", ATTRS{idProduct}=="6001", ENV{ID_MM_DEVICE_IGNORE}="1"\n'
        'ENV{ID_MM_DEVICE_IGNORE}=="1", GOTO="mm_end"\n'
        'ATTRS{bInterfaceClass}=="e0", ENV{ID_MM_DEVICE_IGNORE}="1"\n')


def hub(root: Path, name: str, protocol: str) -> None:
    for file, value in (("bDeviceClass", "09"), ("bDeviceProtocol", protocol),
                        ("product", "USB2.0 Hub"), ("idVendor", "05e3"),
                        ("idProduct", "0608")):
        put(root, f"sys/bus/usb/devices/{name}/{file}", value + "\n")


def problems(root: Path, ports: list[str] | None = None) -> list[str]:
    return [str(f) for f in findings(root, ports or [], USER)]


def test_a_clean_host_has_nothing_to_say(tmp_path: Path) -> None:
    put(tmp_path, "proc/1/comm", "systemd\n")
    put(tmp_path, "etc/group", "dialout:x:20:op\n")
    hub(tmp_path, "usb1", "01")  # a root hub: the controller, not a hub on the desk
    hub(tmp_path, "1-1", "02")  # multi-TT
    assert problems(tmp_path) == []


def test_modemmanager_without_rules_for_the_rig_is_named_with_the_rule(tmp_path: Path) -> None:
    modemmanager(tmp_path)
    (found,) = problems(tmp_path)
    assert "ModemManager is running" in found
    assert "303a (Espressif" in found and "0403 (FTDI)" in found  # product rule: not enough
    assert 'ATTRS{idVendor}=="303a", ENV{ID_MM_DEVICE_IGNORE}="1"' in found
    put(tmp_path, "etc/udev/rules.d/99-station.rules",
        "# the rig\n" + "".join(f'SUBSYSTEM=="tty", ATTRS{{idVendor}}=="{v}", '
                                f'ENV{{ID_MM_DEVICE_IGNORE}}="1"\n'
                                for v in ("303a", "10c4", "1A86")))
    (found,) = problems(tmp_path)
    assert "0403 (FTDI)" in found and "303a" not in found.split("fix:")[0]
    # a rule by USB location covers every device behind those hub ports
    put(tmp_path, "etc/udev/rules.d/99-station.rules",
        'SUBSYSTEM=="tty", ENV{ID_PATH}=="pci-0000:00:14.0-usb-0:1.*", '
        'ENV{ID_MM_DEVICE_IGNORE}="1"\n')
    assert problems(tmp_path) == []


def test_brltty_installed_is_named(tmp_path: Path) -> None:
    put(tmp_path, "usr/lib/udev/rules.d/85-brltty.rules", "# brltty\n")
    (found,) = problems(tmp_path)
    assert "brltty is installed (/usr/lib/udev/rules.d/85-brltty.rules)" in found
    assert "apt remove brltty" in found


def test_a_user_outside_the_ttys_group_is_told_which_group(tmp_path: Path) -> None:
    node = put(tmp_path, "dev/ttyACM0")
    os.chown(node, 0, 4242)
    os.chmod(node, 0o660)
    put(tmp_path, "etc/group", "uucp:x:4242:\n")
    (found,) = problems(tmp_path)
    assert f"{node} belongs to group 'uucp' and op is not in it" in found
    assert "sudo usermod -aG uucp op" in found
    member = User("op", 1000, frozenset({1000, 4242}))
    assert findings(tmp_path, [], member) == []
    node.unlink()  # nothing plugged: judged by dialout's members
    put(tmp_path, "etc/group", "dialout:x:20:someone\n")
    (found,) = problems(tmp_path)
    assert "op is not in group 'dialout'" in found


def test_a_single_tt_hub_is_named(tmp_path: Path) -> None:
    hub(tmp_path, "1-1", "01")
    hub(tmp_path, "1-1.4", "02")
    (found,) = problems(tmp_path)
    assert "USB hub 1-1 (USB2.0 Hub, 05e3:0608) is single-TT" in found
    assert "multi-TT" in found


def test_station_check_warns_with_the_fixes_and_still_passes(tmp_path: Path,
                                                             firmware: Firmware) -> None:
    host = tmp_path / "host"
    modemmanager(host)
    put(host, "usr/bin/brltty")
    hub(host, "3-2", "01")
    site = Site(tmp_path, firmware)
    site.env[HOST_ROOT_ENV] = str(host)
    result = site.check()
    assert result.code == EXIT_OK, str(result)
    warnings = [line for line in result.stdout.splitlines() if "host" in line]
    assert len(warnings) == 3, result
    assert all(" warning: " in w and "; fix: " in w for w in warnings), result
    # and on this machine, whatever it runs or lacks, check passes
    del site.env[HOST_ROOT_ENV]
    result = site.check()
    assert result.code == EXIT_OK, str(result)
    assert any(line.startswith("host ") for line in result.stdout.splitlines()), result
