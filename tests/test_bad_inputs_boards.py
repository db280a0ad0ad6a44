"""The bad-input matrix (issue #6), part 2: ports and disks, with other boards in flight.

A per-board fault fails that board only, with an error naming its port, while the same
`station run` finishes the good boards beside it; the ledger keeps every row. A disk
fault (certs_out not writable, full) fails the boards that need it, with the path
named, and leaves what was written before intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial

from station.daemon import EXIT_BOARDS_FAILED, EXIT_CONFIG, EXIT_OK
from station.sim import Faults, PluggedBoard, Rig
from tests.test_bad_inputs import (
    CLI_TIMEOUT,
    EARLIER_JOB,
    Site,
    quick_rig,
    unprivileged,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def rig(site: Site) -> Iterator[Rig]:
    with quick_rig(site) as r:
        yield r

GOOD_BOARDS = 3


# -- ports: one bad board among good ones ------------------------------------------------


def _permission_denied(rig: Rig, stack: contextlib.ExitStack) -> PluggedBoard:
    """The node belongs to another user, mode 0600: the station's user is not in dialout."""
    board = rig.plug(chip="esp32")
    os.chown(board.pty, 65534, 65534)
    os.chmod(board.pty, 0o600)
    return board


def _held_by_another_program(rig: Rig, stack: contextlib.ExitStack) -> PluggedBoard:
    """A serial monitor (or ModemManager) has the port open and locked."""
    board = rig.plug(chip="esp32")
    monitor = serial.Serial()
    monitor.port = board.port
    monitor.exclusive = True
    monitor.open()
    stack.callback(monitor.close)
    return board


HOLD_PORT = """\
import serial, sys
port = serial.Serial()
port.port, port.exclusive = sys.argv[1], True
port.open()
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def _held_by_modemmanager(rig: Rig, stack: contextlib.ExitStack) -> PluggedBoard:
    """ModemManager probing a new native-USB ttyACM port: a process of that name (Python
    started through a link called ModemManager, so /proc says so) holds it locked."""
    board = rig.plug(chip="esp32s3", usb="jtag")
    exe = rig.directory.parent / "mm" / "ModemManager"
    exe.parent.mkdir(exist_ok=True)
    if not exe.exists():
        os.symlink(sys.executable, exe)
    # the link hides the venv from the interpreter: hand it our import path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    mm = subprocess.Popen([str(exe), "-c", HOLD_PORT, board.port], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env)

    def release() -> None:
        assert mm.stdin is not None and mm.stdout is not None
        mm.stdin.close()
        mm.wait(timeout=CLI_TIMEOUT)
        mm.stdout.close()

    stack.callback(release)
    assert mm.stdout is not None and mm.stdout.readline() == "held\n"
    return board


def _stale_node(rig: Rig, stack: contextlib.ExitStack) -> str:
    """A device node whose driver is gone: open() fails with ENXIO."""
    node = rig.directory.parent / "stale-tty"
    try:
        os.mknod(node, 0o20660, os.makedev(240, 7))  # 240-254: no driver registers these
    except OSError as e:
        pytest.skip(f"cannot make a device node here ({e.strerror})")
    link = rig.directory / "pci-0000:00:14.0-usb-0:2.1:1.0-port0"
    os.symlink(node, link)
    return str(link)


def _not_an_esp(rig: Rig, stack: contextlib.ExitStack) -> PluggedBoard:
    """A GPS receiver (or any other serial device) answering NMEA."""
    return rig.plug(chip="esp32", faults=Faults(garbage=True))


def _vanishes_during_connect(rig: Rig, stack: contextlib.ExitStack) -> PluggedBoard:
    """Unplugged while the stub is uploaded (3000 bytes into the session)."""
    return rig.plug(chip="esp32", faults=Faults(unplug_after=3000))


PORT_CASES: dict[str, tuple[Callable[[Rig, contextlib.ExitStack], PluggedBoard | str],
                            str, str, list[str]]] = {
    # case: (make the bad port, its result, its failed stage, what its error says)
    "port permission denied": (_permission_denied, "failed", "connect",
                               ["cannot open", "permission denied", "'dialout' group"]),
    "port held by another program": (_held_by_another_program, "failed", "connect",
                                     ["cannot open", "another program holds the port"]),
    "native-USB port held by ModemManager": (
        _held_by_modemmanager, "failed", "connect",
        ["cannot open", "another program holds the port (ModemManager (pid ",
         'a udev rule setting ENV{ID_MM_DEVICE_IGNORE}="1" (see config/udev-notes.md)']),
    "port node without a device": (_stale_node, "failed", "connect",
                                   ["cannot open", "No such device or address"]),
    "not an ESP": (_not_an_esp, "failed", "connect",
                   ["something answers, but not an ESP bootloader",
                    "Invalid head of packet"]),
    "port vanishes during connect": (_vanishes_during_connect, "removed", "connect", []),
}


@pytest.mark.parametrize("case", list(PORT_CASES))
def test_a_bad_port_fails_alone_and_the_other_slots_are_served(site: Site, rig: Rig,
                                                               case: str) -> None:
    make_bad, result_, stage, says = PORT_CASES[case]
    site.seed_ledger()
    good = [rig.plug(chip="esp32") for _ in range(GOOD_BOARDS)]
    with contextlib.ExitStack() as stack:
        bad = make_bad(rig, stack)
        port = bad if isinstance(bad, str) else bad.port
        prefix = unprivileged() if case == "port permission denied" else ()
        result = site.run(GOOD_BOARDS + 1, prefix=prefix)
    assert result.code == EXIT_BOARDS_FAILED, str(result)
    rows = site.rows_by_port()
    assert sorted(rows) == sorted([port, *(b.port for b in good)]), rows
    for board in good:
        assert rows[board.port]["result"] == "done", rows[board.port]
    row = rows[port]
    assert (row["result"], row["failed_stage"]) == (result_, stage), row
    if result_ == "failed":
        assert row["error"].startswith(f"{port}: "), row  # the port, first
        for text in says:
            assert text in row["error"], row
        # what the operator sees in the log lines
        assert f"failed at connect: {port}: " in result.stdout, result
    else:
        assert f"{port}" in result.stdout and "removed" in result.stdout, result
    assert "Traceback" not in result.stderr, result
    site.assert_history_kept()


# -- disks: certs_out not writable, full ---------------------------------------------------


def test_certs_out_not_writable_stops_check_and_run_at_start_naming_it(
        site: Site, rig: Rig) -> None:
    prefix = unprivileged()
    site.seed_ledger()
    site.certs_out.mkdir()
    site.certs_out.chmod(0o500)
    complaint = f"credentials.out_dir: {site.certs_out}: not writable by this user"
    check = site.check(prefix=prefix)
    assert check.code == EXIT_CONFIG, check
    assert complaint in check.complaint(), check
    boards = [rig.plug(chip="esp32") for _ in range(2)]
    result = site.run(len(boards), prefix=prefix)
    assert result.code == EXIT_CONFIG, result  # before any board is touched
    assert complaint in result.complaint(), result
    assert all(rig.flash(b) == b"\xff" * len(rig.flash(b)) for b in boards)
    assert list(site.certs_out.iterdir()) == []
    site.assert_history_kept()


@contextlib.contextmanager
def small_disk(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` (root, or CAP_SYS_ADMIN, only)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                            str(path)], capture_output=True, text=True, timeout=CLI_TIMEOUT,
                           check=False)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full disk: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        umount = subprocess.run(["umount", str(path)], capture_output=True, text=True,
                                timeout=CLI_TIMEOUT, check=False)
        if umount.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], timeout=CLI_TIMEOUT, check=False)


def fill(folder: Path) -> Path:
    """Write a file until the disk says it is full; returns it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)  # unbuffered: the error comes here, not at close
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "filler"}


def test_a_full_certs_out_disk_stops_the_station_at_start_and_keeps_what_was_written(
        site: Site, rig: Rig) -> None:
    site.seed_ledger()
    with small_disk(site.certs_out):
        first = rig.plug(chip="esp32")
        assert site.run(1).code == EXIT_OK
        before = snapshot(site.certs_out)
        assert len(before) == 4, before  # cert, key, public key, registration.json
        filler = fill(site.certs_out)
        complaint = f"credentials.out_dir: {site.certs_out}: No space left on device"

        check = site.check()
        assert check.code == EXIT_CONFIG, check
        assert complaint in check.complaint(), check

        rig.unplug(first)
        boards = [rig.plug(chip="esp32") for _ in range(2)]
        result = site.run(len(boards))
        assert result.code == EXIT_CONFIG, result  # not one board per night lost to it
        assert complaint in result.complaint(), result
        # the first board's files are whole, and no half-written file is left behind
        assert snapshot(site.certs_out) == before
        assert not [p for p in site.certs_out.rglob("*") if p.name.endswith(".tmp")]

        # space freed: the same boards go through
        filler.unlink()
        result = site.run(len(boards))
        assert result.code == EXIT_OK, str(result)
    site.assert_history_kept()
    results = [row["result"] for row in site.ledger() if row["job_id"] != EARLIER_JOB]
    assert sorted(results) == ["done"] * 3


def test_a_full_state_disk_stops_the_station_at_start_naming_the_ledger(
        site: Site, rig: Rig) -> None:
    with small_disk(site.state, "512k"):
        first = rig.plug(chip="esp32")
        assert site.run(1).code == EXIT_OK
        before = site.rows_by_port()
        fill(site.state)
        rig.unplug(first)
        rig.plug(chip="esp32")
        result = site.run(1)
        assert result.code == EXIT_CONFIG, str(result)
        line = result.complaint()
        ledger = site.state / "ledger.sqlite3"
        assert f"ledger: {ledger}: cannot be opened or written" in line, result
        assert "has free space" in line, result
        (site.state / "filler").unlink()
        assert site.rows_by_port() == before  # the night before is all there
