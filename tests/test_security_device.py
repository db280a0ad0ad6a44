"""key = "device" (issue 20): the bootloader makes the key and encrypts the flash on the
board's first boot. A real `station run` on four virtual boards of four chips flashes
the plaintext built for it, follows the boot story through `Flash encryption completed`
and the second boot (release mode), and journals it; the flash is then ciphertext under
a key only the chip ever held."""

from __future__ import annotations

from pathlib import Path

from station.daemon import EXIT_CONFIG, EXIT_OK
from tests.securekit import (
    CHIPS,
    MARKS,
    burned_key,
    decrypt_with_fuses,
    device_line,
    mac_of,
    virt_summary,
)

pytestmark = MARKS
APP_AT = 0x10000


def test_four_boards_encrypt_themselves_on_first_boot(tmp_path: Path) -> None:
    line = device_line(tmp_path)
    result, boards, flashes, files = line.plug_and_run(CHIPS)
    assert result.code == EXIT_OK, str(result)
    rows = line.rows()
    for board in boards:
        row = rows[mac_of(board)]
        assert (row["result"], row["boot"]) == ("done", "ok"), row
        assert row["security"] == "flash encryption release (device key)", row
        assert row["key_fingerprint"] is None  # the station never had the key
        assert line.journal(mac_of(board)) == [("plaintext", "before"),
                                               ("plaintext", "after"),
                                               ("first_boot", "before"),
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
        assert decrypt_with_fuses(chip, files[board.mac], stored, APP_AT,
                                  tmp_path)[:len(app)] == app, chip
    log = (line.state / "station.log").read_text() + (line.state / "events.jsonl").read_text()
    for board in boards:
        assert burned_key(board.chip, files[board.mac]).hex() not in log


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
