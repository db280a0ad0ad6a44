"""key = "device" (issue 20): the bootloader makes the key and encrypts the flash on the
board's first boot. A real `station run` on four virtual boards of four chips flashes
the plaintext built for it, follows the boot story through `Flash encryption completed`
and the second boot (release mode), and journals it; the flash is then ciphertext under
a key only the chip ever held."""

from __future__ import annotations

from pathlib import Path

import pytest

from station.daemon import EXIT_CONFIG, EXIT_OK
from station.demo import make_demo_firmware
from tests.securekit import (
    APP_SIZE,
    CHIPS,
    SecureLine,
    burned_key_file,
    decrypt,
    efuse_file,
    mac_of,
    virt_summary,
)

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
APP_AT = 0x10000


def device_line(root: Path, chips: tuple[str, ...] = CHIPS) -> SecureLine:
    builds = {chip: make_demo_firmware(root / "build" / chip, chip=chip, app_size=APP_SIZE,
                                       device_key=True) for chip in chips}
    line = SecureLine(root, builds, root / "unused.pem")
    line.security = {"flash_encryption": "release", "key": "device"}
    return line


def test_four_boards_encrypt_themselves_on_first_boot(tmp_path: Path) -> None:
    line = device_line(tmp_path)
    with line.rig() as rig:
        boards = [rig.plug(chip=chip) for chip in CHIPS]
        result = line.run(len(boards))
        flashes = {b.mac: rig.flash(b) for b in boards}
        files = {b.mac: efuse_file(rig, b) for b in boards}
    assert result.code == EXIT_OK, str(result)
    rows = {r["mac"]: r for r in line.ledger()}
    for board in boards:
        row = rows[mac_of(board)]
        assert (row["result"], row["boot"]) == ("done", "ok"), row
        assert row["security"] == "flash encryption release (device key)", row
        assert row["key_fingerprint"] is None  # the station never had the key
        assert line.journal(mac_of(board)) == [("first_boot", "before"),
                                               ("first_boot", "after")]
        chip = board.chip
        fuses = virt_summary(chip, files[board.mac], tmp_path / "s.json")
        if chip == "esp32":
            assert fuses["FLASH_CRYPT_CNT"]["value"] == 127
            assert fuses["BLOCK1"]["readable"] is False
        else:
            assert fuses["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
            assert fuses["BLOCK_KEY0"]["readable"] is False
            assert fuses["SPI_BOOT_CRYPT_CNT"]["value"] == "Enable"
            assert fuses["DIS_DOWNLOAD_MANUAL_ENCRYPT"]["value"] is True
        # the app on the flash is ciphertext under the chip's own key
        app = (line.builds[chip].parent / "app.bin").read_bytes()
        stored = flashes[board.mac][APP_AT:APP_AT + len(app) + (-len(app) % 16)]
        assert stored[:len(app)] != app
        key = burned_key_file(chip, files[board.mac], tmp_path / f"{mac_of(board)}.key")
        assert decrypt(chip, key, stored, APP_AT, tmp_path)[:len(app)] == app, chip
    log = (line.state / "station.log").read_text() + (line.state / "events.jsonl").read_text()
    for board in boards:
        assert (tmp_path / f"{mac_of(board)}.key").read_bytes().hex() not in log


def test_device_key_refusals(tmp_path: Path) -> None:
    """A development-mode line with a release build, a lock-down asked on top, a boot
    timeout too short for the first boot's encryption: refused at start."""
    line = device_line(tmp_path, chips=("esp32c3",))
    line.security["flash_encryption"] = "development"
    result = line.cli("check")
    assert result.code == EXIT_CONFIG and "is built for release mode" in result.complaint(), \
        result
    line.security = {"flash_encryption": "release", "key": "device", "lockdown": True}
    result = line.cli("check")
    assert result.code == EXIT_CONFIG and ": security.key: " in result.complaint(), result
    line.security = {"flash_encryption": "release", "key": "device"}
    line.extra["verify"] = {"boot": "app", "boot_timeout": 1.0}
    result = line.cli("check")
    assert result.code == EXIT_CONFIG and ": verify.boot_timeout: " in result.complaint(), \
        result
