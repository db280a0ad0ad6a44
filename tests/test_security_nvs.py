"""Credentials on a locked board (issue 20): with flash encryption on, the NVS credentials
are written with NVS encryption (ESP-IDF's flash-encryption-based scheme).

A real `station run` with the local CA over virtual boards of four chips, builds whose
tables have an nvs_keys partition. Afterwards, what a person checks on each board's
flash dump: the NVS partition is ciphertext (no PEM, nothing NVS-readable); `espsecure
decrypt-flash-data` with the key from the board's eFuse file turns its nvs_keys partition
into the XTS key pair (CRC as nvs_flash checks it); esp-idf-nvs-partition-gen's own
`decrypt` with those keys turns the NVS partition into the credentials certs_out holds:
the certificate, the right private key, the thing name.
"""

from __future__ import annotations

import argparse
import json
import struct
import zlib
from pathlib import Path

import pytest
from esp_idf_nvs_partition_gen import nvs_partition_gen as nvs_gen

from station.config import FirmwareSection
from station.daemon import EXIT_OK
from station.flash import load_firmware
from station.identity import read_nvs
from tests.dskit import security_steps
from tests.securekit import (
    CHIPS,
    MARKS,
    SecureLine,
    decrypt_with_fuses,
    efuse_file,
    mac_of,
    make_line,
)
from tests.test_secure_cert import same_key

pytestmark = MARKS


@pytest.fixture
def line(tmp_path: Path) -> SecureLine:
    line = make_line(tmp_path, nvs_keys=True)
    line.extra = {"identity": {"thing_name": "t-{mac}"},
                  "registrar": {"kind": "local-ca"}, "registrar.local_ca": {"dir": "ca"},
                  "credentials": {"out_dir": "certs_out"}}
    return line


def nvs_decrypt(image: bytes, keys: bytes, tmp: Path) -> bytes:
    """esp-idf-nvs-partition-gen's `decrypt` (what `nvs_partition_gen.py decrypt` runs)."""
    (tmp / "nvs-cipher.bin").write_bytes(image)
    (tmp / "nvs-keys.bin").write_bytes(keys)
    nvs_gen.decrypt(argparse.Namespace(input=str(tmp / "nvs-cipher.bin"),
                                       key=str(tmp / "nvs-keys.bin"),
                                       output="nvs-plain.bin", outdir=str(tmp)))
    return (tmp / "nvs-plain.bin").read_bytes()


def test_a_locked_boards_credentials_are_nvs_encrypted(line: SecureLine,
                                                       tmp_path: Path) -> None:
    result, boards, flashes, files = line.plug_and_run(CHIPS)
    assert result.code == EXIT_OK, result
    rows = line.rows()
    all_keys = set()
    for board in boards:
        row = rows[mac_of(board)]
        assert (row["result"], row["boot"], row["lockdown"]) == ("done", "ok", 1), row
        bundle = load_firmware(FirmwareSection(chip=board.chip,
                                               flasher_args=line.builds[board.chip],
                                               images=()))
        nvs, keys_part = bundle.partition("nvs"), bundle.partition("nvs_key")
        flash = flashes[board.mac]
        stored_nvs = flash[nvs.offset:nvs.end]
        stored_keys = flash[keys_part.offset:keys_part.end]

        # what `esptool read-flash` would give anyone: ciphertext only
        assert b"BEGIN" not in stored_nvs and read_nvs(stored_nvs) == {}, board.chip
        assert stored_keys[:64] != b"\xff" * 64

        # the fuses' key opens the nvs_keys partition: data key, tweak key, CRC32
        plain_keys = decrypt_with_fuses(board.chip, files[board.mac], stored_keys,
                                        keys_part.offset, tmp_path)
        xts = plain_keys[:64]
        assert struct.unpack_from("<I", plain_keys, 64)[0] == \
            zlib.crc32(xts, 0xFFFFFFFF) & 0xFFFFFFFF
        assert plain_keys[68:] == b"\xff" * (keys_part.size - 68)
        all_keys.add(xts)

        # and those keys open the credentials, which are what certs_out holds
        values = read_nvs(nvs_decrypt(stored_nvs, xts, tmp_path))["station"]
        folder = line.root / "certs_out" / row["thing_name"]
        cert = (folder / "certificate.pem.crt").read_text()
        private = (folder / "private.pem.key").read_text()
        assert values["thing_name"] == row["thing_name"] == f"t-{mac_of(board)}"
        assert values["cert"] == cert.encode() + b"\0"
        assert isinstance(values["priv_key"], bytes)
        assert same_key(values["priv_key"].rstrip(b"\0").decode(), private)
    assert len(all_keys) == len(boards)  # NVS keys per board
    log = (line.state / "station.log").read_text() + (line.state / "events.jsonl").read_text()
    for xts in all_keys:  # never in a log or an event
        assert xts.hex() not in log and xts[:32].hex() not in log


def test_station_check_names_the_nvs_keys_partition(line: SecureLine) -> None:
    result = line.cli("check")
    assert result.code == EXIT_OK, result
    for chip in CHIPS:
        assert f"{chip}: NVS credentials encrypted, keys in nvs_keys at 0x" in result.stdout


def _credentials_readable(line: SecureLine, board_chip: str, flash: bytes, efuses: Path,
                          thing: str, tmp_path: Path) -> None:
    """The board's nvs_keys open its NVS credentials, which are certs_out's."""
    bundle = load_firmware(FirmwareSection(chip=board_chip, flasher_args=line.builds[board_chip],
                                           images=()))
    nvs, keys_part = bundle.partition("nvs"), bundle.partition("nvs_key")
    xts = decrypt_with_fuses(board_chip, efuses, flash[keys_part.offset:keys_part.end],
                             keys_part.offset, tmp_path)[:64]
    values = read_nvs(nvs_decrypt(flash[nvs.offset:nvs.end], xts, tmp_path))["station"]
    cert = (line.root / "certs_out" / thing / "certificate.pem.crt").read_text()
    assert values["cert"] == cert.encode() + b"\0"


@pytest.mark.parametrize("point", ["images:after", "encrypt:after", "secure_boot:after"])
def test_a_station_killed_after_the_images_never_leaves_unreadable_credentials(
        tmp_path: Path, point: str) -> None:
    """The NVS keys live in memory only. Killed after the images (and credentials) were
    verified: until the lock-down burns DIS_DOWNLOAD_MANUAL_ENCRYPT the chip still
    encrypts what esptool sends with --encrypt, so a fresh nvs_keys partition and the
    credentials under it finish the board (one flash-encryption key, never a second)."""
    line = make_line(tmp_path, chips=("esp32c3",), nvs_keys=True)
    line.extra = {"identity": {"thing_name": "t-{mac}"},
                  "registrar": {"kind": "local-ca"}, "registrar.local_ca": {"dir": "ca"}}
    with line.rig() as rig:
        board = rig.plug(chip="esp32c3")
        killed = line.run(1, env={"STATION_TEST_CRASH_AFTER": f"security:{point}"})
        assert killed.code == -9, killed
        again = line.run(1)
        flash, efuses = rig.flash(board), efuse_file(rig, board)
    last = line.ledger()[-1]
    assert again.code == EXIT_OK, again
    assert (last["result"], last["boot"], last["lockdown"]) == ("done", "ok", 1), last
    assert [e for e in line.journal(mac_of(board)) if e == ("key", "after")] == \
        [("key", "after")]
    _credentials_readable(line, "esp32c3", flash, efuses, f"t-{mac_of(board)}", tmp_path)


def test_with_a_key_the_chip_makes_its_first_boot_encrypts_the_nvs_keys(
        tmp_path: Path) -> None:
    """key = "device": the station writes the nvs_keys partition in plaintext, as the
    build's other images, and the first boot encrypts it with the key only the chip
    holds (ESP-IDF `encrypt_partition`: nvs_keys unconditionally)."""
    from station.demo import make_demo_firmware

    chip = "esp32c3"
    build = make_demo_firmware(tmp_path / "build", chip=chip, app_size=0x8000,
                               device_key=True, nvs_keys=True)
    line = SecureLine(tmp_path, {chip: build}, tmp_path / "unused.pem")
    line.security = {"flash_encryption": "release", "key": "device"}
    line.extra = {"identity": {"thing_name": "t-{mac}"},
                  "registrar": {"kind": "local-ca"}, "registrar.local_ca": {"dir": "ca"}}
    with line.rig() as rig:
        board = rig.plug(chip=chip)
        result = line.run(1)
        flash, efuses = rig.flash(board), efuse_file(rig, board)
    assert result.code == EXIT_OK, result
    row = line.ledger()[-1]
    assert (row["result"], row["boot"]) == ("done", "ok"), row
    keys_part = load_firmware(FirmwareSection(chip=chip, flasher_args=build, images=())
                              ).partition("nvs_key")
    plain = flash[keys_part.offset:keys_part.offset + 68]
    assert zlib.crc32(plain[:64], 0xFFFFFFFF) & 0xFFFFFFFF != \
        struct.unpack_from("<I", plain, 64)[0]  # not the plaintext layout: encrypted
    verified = [s for s in security_steps(line.state, mac_of(board))
                if (s["step"], s["phase"]) == ("plaintext", "after")]  # its MD5s, not the keys'
    assert len(verified) == 1 and str(0x10000) in json.loads(verified[0]["detail"])
    assert str(keys_part.offset) not in json.loads(verified[0]["detail"])
    _credentials_readable(line, chip, flash, efuses, f"t-{mac_of(board)}", tmp_path)
