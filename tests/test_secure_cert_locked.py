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
"""

from __future__ import annotations

from pathlib import Path

import pytest

from station.daemon import EXIT_OK
from station.demo import make_demo_firmware
from station.identity import SecureCertFormatError, read_secure_cert
from station.sim.efuse import EfuseArray
from tests.securekit import (
    APP_SIZE,
    SecureLine,
    burned_key_file,
    decrypt,
    efuse_file,
    mac_of,
    signing_key,
)

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CHIPS = ("esp32c3", "esp32s3")
AT, SIZE = 0xD000, 0x2000


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
    line.extra = {"registrar": {"kind": "local-ca"}, "registrar.local_ca": {"dir": "ca"},
                  "credentials": {"out_dir": "certs_out", "format": "esp_secure_cert",
                                  "ds": True}}
    with line.rig() as rig:
        boards = [rig.plug(chip=chip) for chip in chips]
        result = line.run(len(boards))
        flashes = {b.mac: rig.flash(b) for b in boards}
        files = {b.mac: efuse_file(rig, b) for b in boards}
    assert result.code == EXIT_OK, result
    rows = {r["mac"]: r for r in line.ledger()}
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
        key = burned_key_file(board.chip, files[board.mac], tmp_path / f"{board.mac}.key")
        tlvs = {t.name: t for t in read_secure_cert(decrypt(board.chip, key, stored, AT,
                                                            tmp_path))}
        assert sorted(tlvs) == ["CA_CERT", "DEV_CERT", "DS_CONTEXT", "DS_DATA"]
        cert = (tmp_path / "certs_out" / row["thing_name"] / "certificate.pem.crt").read_text()
        assert tlvs["DEV_CERT"].text() == cert
        efuses = EfuseArray(board.chip, files[board.mac])
        assert efuses.blocks_with_purpose("HMAC_DOWN_DIGITAL_SIGNATURE") == [9]
        assert efuses.blocks_with_purpose("XTS_AES_128_KEY") == [4]  # BLOCK_KEY0
