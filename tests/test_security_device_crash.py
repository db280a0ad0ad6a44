"""key = "device" lines whose station is SIGKILLed once the plaintext is on the flash.

On a device-key line the restarted station's connect never starts or cuts short a first
boot (station/flash/first_boot_guard.py: the long reset delay first, no reset while a
pass is under way). If this station had verified the plaintext (its "plaintext after"
journal line), the board is good: the restarted station writes nothing (a blank chip's
plaintext is checked by its MD5s; an encrypted one could not take plaintext again), its
own reset runs the first boot where none ran yet, and the boot check is the proof that
finishes the board with its one key. Real `station run`s over virtual boards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from station.daemon import EXIT_OK
from station.demo import make_demo_firmware
from station.identity import CRASH_ENV
from station.sim import Rig
from station.sim.efuse import EfuseArray
from station.worker import WRITTEN
from tests.registrykit import wait_until
from tests.securekit import (
    APP_SIZE,
    MARKS,
    SecureLine,
    decrypt_with_fuses,
    device_line,
    efuse_file,
    mac_of,
)
from tests.test_secure_cert_locked import (
    _partition_holds_its_credentials,
    ds_device_board_killed_at,
)

pytestmark = MARKS
CHIP = "esp32c3"
APP_AT = 0x10000
WRITING, PLAINTEXT = ("plaintext", "before"), ("plaintext", "after")
BEFORE, AFTER = ("first_boot", "before"), ("first_boot", "after")


def _one_key_under_which_the_app_decrypts(line: SecureLine, flash: bytes, files: Path,
                                          tmp_path: Path) -> None:
    """One flash-encryption key in the board's eFuses (the one its first boot made),
    and the app in the flash dump is ciphertext that key turns back into the build's."""
    assert EfuseArray(CHIP, files).blocks_with_purpose("XTS_AES_128_KEY") == [4]
    app = (line.builds[CHIP].parent / "app.bin").read_bytes()
    stored = flash[APP_AT:APP_AT + len(app) + (-len(app) % 16)]
    assert stored[:len(app)] != app
    assert decrypt_with_fuses(CHIP, files, stored, APP_AT, tmp_path)[:len(app)] == app


def _finished_with_its_one_key(line: SecureLine, flash: bytes, files: Path,
                               tmp_path: Path, written: bool = False) -> dict[str, object]:
    """The restarted run's row: done, boot ok in release mode, nothing written (no flash
    or verify time; `written`: written and verified again); one flash-encryption key,
    under which the app decrypts."""
    rows = line.ledger()
    assert len(rows) == 2, rows
    assert rows[0]["result"] == "failed" and "station stopped during" in rows[0]["error"]
    last = rows[-1]
    assert (last["result"], last["boot"]) == ("done", "ok"), last
    assert "Flash encryption mode is RELEASE" in last["boot_log"]
    wrote = {"flash", "verify"} & set(last["timings"])
    assert wrote == ({"flash", "verify"} if written else set()), last["timings"]
    _one_key_under_which_the_app_decrypts(line, flash, files, tmp_path)
    return last


@pytest.mark.parametrize("point", ["plaintext:after", "first_boot:before",
                                   "first_boot:after"])
def test_a_device_key_board_killed_after_its_verified_plaintext_is_finished_by_its_boot(
        tmp_path: Path, point: str) -> None:
    line = device_line(tmp_path, chips=(CHIP,))
    with line.rig() as rig:
        board = rig.plug(chip=CHIP)
        killed = line.run(1, env={CRASH_ENV: f"security:{point}"})
        assert killed.code == -9, killed
        assert line.journal(mac_of(board))[-1] == tuple(point.split(":"))
        at_kill = rig.flash(board)
        again = line.run(1)
        flash, files = rig.flash(board), efuse_file(rig, board)
    assert again.code == EXIT_OK, again
    _finished_with_its_one_key(line, flash, files, tmp_path)
    journal = line.journal(mac_of(board))
    if point == "first_boot:after":  # done but for its record: the boot is checked again
        assert journal == [WRITING, PLAINTEXT, BEFORE, AFTER, AFTER], journal
        assert flash == at_kill  # the ciphertext its first boot made, untouched
    else:  # found blank with its plaintext: the restart's own reset ran its first boot
        assert journal == [WRITING, PLAINTEXT, BEFORE, AFTER], journal
        assert flash != at_kill


def test_a_ds_device_key_board_killed_after_its_verified_plaintext_is_finished(
        tmp_path: Path) -> None:
    """The same on a DS line: the HMAC key burned, the esp_secure_cert partition written
    and verified; the board's first boot encrypts it after the restart, and the
    boot check sees the app find its credentials with its one HMAC key."""
    line, board, flash, files = ds_device_board_killed_at("security:plaintext:after",
                                                          tmp_path)
    last = _finished_with_its_one_key(line, flash, files, tmp_path)
    assert "Successfully obtained and verified the contents of esp_secure_cert " \
           "partition" in str(last["boot_log"])
    assert line.journal(mac_of(board)) == [WRITING, ("ds_key", "before"),
                                           ("ds_key", "after"), PLAINTEXT, BEFORE, AFTER]
    _partition_holds_its_credentials(flash, files, last, tmp_path)


def test_a_restarts_connect_never_cuts_the_first_boot_short(tmp_path: Path) -> None:
    """With the flash's real timing the first boot takes about a second. esptool's own
    resets (0.05 s first: a 10 uF devkit boots from flash and starts the pass; the next
    attempt, a second later, cuts it short) left the bootloader ciphertext with the
    counter unset: "invalid header", needs rework. On a device-key line the connect's
    first reset holds GPIO0 long enough to enter download mode (first_boot_guard.py), the
    plaintext is found as verified and not written again, and the station's own reset
    runs the first boot through: done, with its one key."""
    line = device_line(tmp_path, chips=(CHIP,))
    with Rig(line.hub, seed=41, throttle=False, flash_timing=True,
             pty_lines=line.root / "pty-lines.sock") as rig:
        board = rig.plug(chip=CHIP)
        assert line.run(1, env={CRASH_ENV: "security:plaintext:after"}).code == -9
        at_kill = rig.flash(board)
        again = line.run(1)
        flash, files = rig.flash(board), efuse_file(rig, board)
    assert again.code == EXIT_OK, again
    _finished_with_its_one_key(line, flash, files, tmp_path)
    assert flash != at_kill
    assert line.journal(mac_of(board)) == [WRITING, PLAINTEXT, BEFORE, AFTER]


def test_a_station_killed_during_the_first_boot_waits_it_out_on_restart(
        tmp_path: Path) -> None:
    """SIGKILL while the board's first boot rewrites a 512 KB app (about 7 s with the
    flash's real timing). The restarted station finds the board silent inside the app's
    region, which listening cannot tell from a board at rest; its job's last journal line,
    "first_boot before", says a pass may be running, so no reset comes until it prints
    "Flash encryption completed" (within the boot timeout). The board is finished: done,
    boot ok, its one key, nothing written."""
    line = device_line(tmp_path, chips=(CHIP,))
    line.builds[CHIP] = make_demo_firmware(tmp_path / "build-big", chip=CHIP,
                                           app_size=0x80000, device_key=True)
    line.extra = {"verify": {"boot": "app", "boot_timeout": 30.0}}
    with Rig(line.hub, seed=42, throttle=False, flash_timing=True,
             pty_lines=line.root / "pty-lines.sock") as rig:
        board = rig.plug(chip=CHIP)
        station = subprocess.Popen(
            [sys.executable, "-m", "station", "run", "--headless", "--exit-after", "1",
             "--config", str(line.write())], cwd=line.root, env=line.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # the pass is inside the app's region
            wait_until("first boot at the app", lambda: f"Encrypting partition 2 at offset "
                       f"{APP_AT:#x}" in rig.console(board) or station.poll() is not None,
                       timeout=120)
        finally:
            station.kill()
            station.wait(timeout=30)
        assert station.returncode == -9
        again = line.run(1)
        flash, files = rig.flash(board), efuse_file(rig, board)
    assert again.code == EXIT_OK, again
    _finished_with_its_one_key(line, flash, files, tmp_path)
    assert line.journal(mac_of(board)) == [WRITING, PLAINTEXT, BEFORE, AFTER]


def test_a_self_encrypted_board_with_other_firmware_is_refused(tmp_path: Path) -> None:
    """Killed after its first boot, then the line changes its firmware: the board holds
    ciphertext of the old build and cannot take plaintext of the new one: refused with
    the reason, nothing written (its boot is not taken for the new build's)."""
    line = device_line(tmp_path, chips=(CHIP,))
    with line.rig() as rig:
        board = rig.plug(chip=CHIP)
        assert line.run(1, env={CRASH_ENV: "security:first_boot:after"}).code == -9
        at_kill = rig.flash(board)
        line.builds[CHIP] = make_demo_firmware(tmp_path / "build2", chip=CHIP,
                                               app_size=APP_SIZE, device_key=True, seed=7)
        again = line.run(1)
        flash = rig.flash(board)
    assert again.code != EXIT_OK
    last = line.ledger()[-1]
    assert last["result"] == "failed", last
    assert "its first boot encrypted other firmware than this line's" in last["error"], last
    assert flash == at_kill


@pytest.mark.parametrize("point", [WRITTEN, "security:plaintext:before"])
def test_a_device_key_board_killed_before_its_plaintext_is_verified_is_finished(
        tmp_path: Path, point: str) -> None:
    """SIGKILL once the plaintext, bootloader last, is on the flash and before its verify
    (flash:written: no "plaintext after" line), or before the first write. Closing the
    port is not a reset on this circuit (first_boot_guard.py), so the chip sits in its
    stub, blank: the restarted station cannot take the unverified plaintext for verified,
    writes it again, verifies it, and the board's first boot finishes it with its one
    key."""
    line = device_line(tmp_path, chips=(CHIP,))
    with line.rig() as rig:
        board = rig.plug(chip=CHIP)
        killed = line.run(1, env={CRASH_ENV: point})
        assert killed.code == -9, killed
        assert PLAINTEXT not in line.journal(mac_of(board))
        assert rig.boot_modes(board).count("flash") == 0  # no first boot in between
        again = line.run(1)
        flash, files = rig.flash(board), efuse_file(rig, board)
    assert again.code == EXIT_OK, again
    _finished_with_its_one_key(line, flash, files, tmp_path, written=True)
    assert line.journal(mac_of(board)) == [WRITING, WRITING, PLAINTEXT, BEFORE, AFTER]


def test_a_ds_device_key_board_killed_before_its_plaintext_is_verified_is_finished(
        tmp_path: Path) -> None:
    """The same cut on a DS line, its HMAC key burned before the partition was written:
    the restarted station finds that key its own (journal, certs_out), writes the
    plaintext again with the same DS data, and the board's first boot encrypts it: done,
    one HMAC key, one flash-encryption key, the partition holding its credentials."""
    line, board, flash, files = ds_device_board_killed_at(WRITTEN, tmp_path)
    last = _finished_with_its_one_key(line, flash, files, tmp_path, written=True)
    assert line.journal(mac_of(board)) == [WRITING, ("ds_key", "before"), ("ds_key", "after"),
                                           WRITING, PLAINTEXT, BEFORE, AFTER]
    _partition_holds_its_credentials(flash, files, last, tmp_path)


def test_a_board_that_boots_between_the_last_write_and_the_verify_needs_rework(
        tmp_path: Path) -> None:
    """Killed between the last write and its verify (flash:written), then the board
    wakes from flash before the station is back (on a real line the port's close may
    reset it; here a finger taps EN): its first boot makes its key and encrypts a
    plaintext this station never verified. It cannot be written again, nor proved
    whole: the restarted station says "needs rework", names this station's unverified
    plaintext as the reason (not "another line"), and writes and burns nothing."""
    line = device_line(tmp_path, chips=(CHIP,))
    with line.rig() as rig:
        board = rig.plug(chip=CHIP)
        assert line.run(1, env={CRASH_ENV: WRITTEN}).code == -9
        rig.press_en(board)
        wait_until("the first boot's pass", lambda: "Flash encryption completed"
                   in rig.console(board), timeout=60)
        booted, fuses_before = rig.flash(board), efuse_file(rig, board).read_bytes()
        again = line.run(1)
        flash, files = rig.flash(board), efuse_file(rig, board)
        assert files.read_bytes() == fuses_before  # nothing burned by the restart
    assert again.code != EXIT_OK, again
    rows = line.ledger()
    assert len(rows) == 2, rows
    assert rows[0]["result"] == "failed" and "station stopped during" in rows[0]["error"]
    last = rows[-1]
    assert last["result"] == "failed", last
    assert "needs rework" in last["error"], last
    assert "before this station verified the plaintext it wrote" in last["error"], last
    assert "another line" not in last["error"], last
    assert flash == booted  # nothing written over what its first boot encrypted
    _one_key_under_which_the_app_decrypts(line, flash, files, tmp_path)
