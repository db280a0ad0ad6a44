"""The esp_secure_cert partition on a locked board (issue 21 with issue 20's [security]):
with flash encryption on, the partition is flagged `encrypted` (esp_secure_cert_mgr's
row), so the app reads it through `esp_partition_read`, which decrypts: the station must
write it encrypted with the board's key, like the app.

The real `station run` locks S3 and C3 boards (host key, release, secure boot v2,
lock-down) and gives them DS credentials from the local CA; afterwards the partition in
the flash dump is ciphertext, and `espsecure decrypt-flash-data` with the key read from
the board's eFuses (tests/securekit.py) turns it into the TLVs: the certificate certs_out
has and the DS data, no key. The boot check passes: the virtual app reads it through the
chip's decryption and signs with its DS key. The same with key = "device", where the
board's bootloader encrypts the partition on its first boot.

A station killed around the HMAC key's burn on such a line: with the host key the
restarted station finishes the board with one HMAC key and the partition encrypted;
with key = "device" too, the board's first boot encrypting the partition the restarted
station wrote (the bootloader written last, so the restart's connect boots nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from station.daemon import EXIT_OK
from station.demo import make_demo_firmware
from station.identity import CRASH_ENV, SecureCertFormatError, read_secure_cert
from station.identity.ds import DsData
from station.sim import PluggedBoard
from station.sim.efuse import EfuseArray
from station.worker import WRITTEN
from tests.securekit import (
    APP_SIZE,
    MARKS,
    SecureLine,
    decrypt_with_fuses,
    device_line,
    efuse_file,
    mac_of,
    signing_key,
)
from tests.test_ds import chip_decrypts

pytestmark = MARKS

CHIPS = ("esp32c3", "esp32s3")
CHIP = "esp32c3"
"""The crash test's chip: a restarted S3 with secure boot cannot be reconnected by the
virtual S3 (tests/test_security_crash.py)."""
AT, SIZE = 0xD000, 0x2000
DS_LOCAL_CA: dict[str, dict[str, Any]] = {
    "registrar": {"kind": "local-ca"}, "registrar.local_ca": {"dir": "ca"},
    "credentials": {"out_dir": "certs_out", "format": "esp_secure_cert", "ds": True}}


@pytest.mark.parametrize("key", ["host", "device"])
def test_the_partition_is_written_encrypted_on_a_locked_board(tmp_path: Path,
                                                               key: str) -> None:
    """key = "host": the station encrypts the partition with the key it burns; key =
    "device" (one C3): it writes plaintext, and the bootloader encrypts the flagged
    partition on the first boot with the key it makes, after the DS key's burn (so it
    takes another key block)."""
    device = key == "device"
    chips = ("esp32c3",) if device else CHIPS
    builds = {chip: make_demo_firmware(tmp_path / "build" / chip, chip=chip,
                                       app_size=APP_SIZE, secure=not device,
                                       device_key=device, secure_cert=True)
              for chip in chips}
    line = SecureLine(tmp_path, builds, signing_key(tmp_path / "sb.pem"))
    if device:
        line.security = {"flash_encryption": "release", "key": "device"}
    line.extra = DS_LOCAL_CA
    result, boards, flashes, files = line.plug_and_run(chips)
    assert result.code == EXIT_OK, result
    rows = line.rows()
    for board in boards:
        row = rows[mac_of(board)]
        assert (row["result"], row["boot"]) == ("done", "ok"), row
        assert device or row["lockdown"] == 1, row
        assert (row["credentials"], row["efuse_key_block"]) == ("esp_secure_cert",
                                                                "BLOCK_KEY5"), row
        # the app read it through the chip's decryption and signed with its DS key
        assert "Successfully obtained and verified the contents of esp_secure_cert " \
               "partition" in row["boot_log"], row["boot_log"]
        stored = flashes[board.mac][AT:AT + SIZE]
        with pytest.raises(SecureCertFormatError):
            read_secure_cert(stored)  # ciphertext: no TLV magic in the clear
        plain = decrypt_with_fuses(board.chip, files[board.mac], stored, AT, tmp_path)
        tlvs = {t.name: t for t in read_secure_cert(plain)}
        assert sorted(tlvs) == ["CA_CERT", "DEV_CERT", "DS_CONTEXT", "DS_DATA"]
        cert = (tmp_path / "certs_out" / row["thing_name"] / "certificate.pem.crt").read_text()
        assert tlvs["DEV_CERT"].text() == cert
        efuses = EfuseArray(board.chip, files[board.mac])
        assert efuses.blocks_with_purpose("HMAC_DOWN_DIGITAL_SIGNATURE") == [9]
        assert efuses.blocks_with_purpose("XTS_AES_128_KEY") == [4]  # BLOCK_KEY0


@pytest.mark.parametrize("point", ["ds_key:after", "ds_key:before", WRITTEN])
def test_a_locked_line_killed_around_the_hmac_burn_writes_one_key_encrypted(
        tmp_path: Path, point: str) -> None:
    """SIGKILL right after the HMAC key's burn (the flash-encryption key and the images
    are in, the partition is not), right before it, or once the partition is written and
    before its verify (flash:written: the journal's last line is the burn's): the
    restarted station finishes the board locked, with one HMAC key (killed before the
    burn: after one "plug the board again"), and the partition on flash is ciphertext
    under the board's flash-encryption key that decrypts to the certificate and the DS
    data of that HMAC key."""
    builds = {CHIP: make_demo_firmware(tmp_path / "build" / CHIP, chip=CHIP,
                                       app_size=APP_SIZE, secure=True, secure_cert=True)}
    line = SecureLine(tmp_path, builds, signing_key(tmp_path / "sb.pem"))
    line.extra = DS_LOCAL_CA
    with line.rig() as rig:
        board = rig.plug(chip=CHIP)
        killed = line.run(1, env={CRASH_ENV: point})
        assert killed.code == -9, killed
        last_line = ("ds_key", "after") if point == WRITTEN else tuple(point.split(":"))
        assert line.journal(mac_of(board))[-1] == last_line
        again = line.run(1)
        if point == "ds_key:before":
            assert again.code != EXIT_OK, again
            assert "plug the board again" in line.ledger()[-1]["error"]
            again = line.run(1)
        flash, files = rig.flash(board), efuse_file(rig, board)
    assert again.code == EXIT_OK, again
    rows = line.ledger()
    assert len(rows) == (3 if point == "ds_key:before" else 2), rows
    assert rows[0]["result"] == "failed" and "station stopped during" in rows[0]["error"]
    last = rows[-1]
    assert (last["result"], last["boot"], last["lockdown"]) == ("done", "ok", 1), last
    assert (last["credentials"], last["efuse_key_block"]) == ("esp_secure_cert",
                                                              "BLOCK_KEY5"), last
    journal = line.journal(mac_of(board))
    assert journal.count(("ds_key", "after")) == 1, journal  # one HMAC key burned
    assert journal.count(("key", "after")) == 1, journal  # one flash-encryption key
    _partition_holds_its_credentials(flash, files, last, tmp_path)


def _partition_holds_its_credentials(flash: bytes, files: Path, row: dict[str, Any],
                                     tmp_path: Path) -> None:
    """One HMAC key (BLOCK_KEY5) and one flash-encryption key (BLOCK_KEY0); the partition
    is ciphertext that the flash-encryption key turns into the certificate certs_out has
    and DS data that the HMAC key turns into that certificate's key."""
    efuses = EfuseArray(CHIP, files)
    assert efuses.blocks_with_purpose("HMAC_DOWN_DIGITAL_SIGNATURE") == [9]
    assert efuses.blocks_with_purpose("XTS_AES_128_KEY") == [4]
    stored = flash[AT:AT + SIZE]
    with pytest.raises(SecureCertFormatError):
        read_secure_cert(stored)  # ciphertext: no TLV magic in the clear
    tlvs = {t.name: t for t in read_secure_cert(decrypt_with_fuses(CHIP, files, stored, AT,
                                                                   tmp_path))}
    assert sorted(tlvs) == ["CA_CERT", "DEV_CERT", "DS_CONTEXT", "DS_DATA"]
    cert = (tmp_path / "certs_out" / row["thing_name"] / "certificate.pem.crt").read_text()
    assert tlvs["DEV_CERT"].text() == cert
    data = tlvs["DS_DATA"].data
    _, n = chip_decrypts(DsData(ciphertext=data[20:], iv=data[4:20], rsa_bits=2048,
                                key_id=5, hmac_fingerprint=""), efuses.block_bytes(9), CHIP)
    public = x509.load_pem_x509_certificate(cert.encode()).public_key()
    assert n == public.public_numbers().n  # type: ignore[union-attr]


def ds_device_board_killed_at(point: str, tmp_path: Path
                              ) -> tuple[SecureLine, PluggedBoard, bytes, Path]:
    """A DS line with key = "device" (local CA) whose station is SIGKILLed at `point`,
    then run again to its end (exit 0): the line, the board, its flash and eFuse file."""
    line = device_line(tmp_path, chips=(CHIP,), secure_cert=True)
    line.extra = DS_LOCAL_CA
    with line.rig() as rig:
        board = rig.plug(chip=CHIP)
        assert line.run(1, env={CRASH_ENV: point}).code == -9
        again = line.run(1)
        flash, files = rig.flash(board), efuse_file(rig, board)
    assert again.code == EXIT_OK, again
    return line, board, flash, files


def test_a_device_key_board_killed_after_the_hmac_burn_is_finished_by_its_first_boot(
        tmp_path: Path) -> None:
    """key = "device", SIGKILL right after the HMAC key's burn. Any wake with GPIO0 high
    (a finger on EN, a devkit whose EN is slower than the connect's reset) would run the
    first boot of a bootloader on the flash and encrypt the flash for good with the
    partition still blank: the station writes the bootloader last, after the partition.
    The board boots nothing, the station finishes it with its one HMAC key, and its
    first boot encrypts the partition, which decrypts with the key the chip made to the
    certificate and the DS data."""
    line, board, flash, files = ds_device_board_killed_at("ds_key:after", tmp_path)
    last = line.ledger()[-1]
    assert (last["result"], last["boot"]) == ("done", "ok"), last
    writing = ("plaintext", "before")  # killed, then restarted: written again
    assert line.journal(mac_of(board)) == [writing, ("ds_key", "before"), ("ds_key", "after"),
                                           writing, ("plaintext", "after"),
                                           ("first_boot", "before"), ("first_boot", "after")]
    _partition_holds_its_credentials(flash, files, last, tmp_path)


def test_a_device_key_board_killed_before_the_hmac_burn_is_finished_with_one_key(
        tmp_path: Path) -> None:
    """key = "device", SIGKILL right before the HMAC key's burn: the images but the
    bootloader are on the flash, nothing is burned. The restarted station clears the
    DS ciphertext whose key was never burned and asks for the board again; the next run
    burns one HMAC key and finishes the board: done, one HMAC key, one flash-encryption
    key (its first boot's), the partition holding its credentials."""
    line = device_line(tmp_path, chips=(CHIP,), secure_cert=True)
    line.extra = DS_LOCAL_CA
    with line.rig() as rig:
        board = rig.plug(chip=CHIP)
        assert line.run(1, env={CRASH_ENV: "ds_key:before"}).code == -9
        assert line.journal(mac_of(board))[-1] == ("ds_key", "before")
        again = line.run(1)
        assert again.code != EXIT_OK, again
        assert "plug the board again" in line.ledger()[-1]["error"]
        last_run = line.run(1)
        flash, files = rig.flash(board), efuse_file(rig, board)
    assert last_run.code == EXIT_OK, last_run
    rows = line.ledger()
    assert len(rows) == 3, rows
    assert rows[0]["result"] == "failed" and "station stopped during" in rows[0]["error"]
    last = rows[-1]
    assert (last["result"], last["boot"]) == ("done", "ok"), last
    journal = line.journal(mac_of(board))
    assert journal.count(("ds_key", "after")) == 1, journal  # one HMAC key burned
    _partition_holds_its_credentials(flash, files, last, tmp_path)
