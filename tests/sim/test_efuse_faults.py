"""eFuse faults a line must recover from: a pull between burns, a weak fuse bit, a board
another line has already locked. Driven with the real espefuse and esptool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from station.sim import Faults, Rig
from station.sim.faults import parse_fault_spec

from .conftest import esptool
from .efusekit import espefuse, summary

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _key(tmp_path: Path) -> Path:
    key = tmp_path / "key.bin"
    key.write_bytes(os.urandom(32))
    return key


def test_a_board_pulled_between_two_burns_keeps_the_first(fast_rig: Rig, tmp_path: Path) -> None:
    """espefuse burns the key block first, BLOCK0 (purpose, protection) last: pulled in
    between, the key is burned but neither assigned nor read-protected."""
    board = fast_rig.plug(chip="esp32s3", faults=Faults(pull_after_burns=1))
    key = _key(tmp_path)
    burn = espefuse(board.port, "burn-key", "BLOCK_KEY0", str(key), "XTS_AES_128_KEY",
                    "burn-efuse", "SPI_BOOT_CRYPT_CNT", "1")
    assert burn.returncode != 0
    assert "BURN BLOCK4  - OK" not in burn.output  # gone before reading it back
    board = fast_rig.replug(board)
    efuses = summary(board.port, tmp_path / "after.json")
    assert efuses["KEY_PURPOSE_0"]["value"] == "USER"
    assert efuses["BLOCK_KEY0"]["readable"] is True
    assert efuses["SPI_BOOT_CRYPT_CNT"]["value"] == "Disable"
    assert bytes.fromhex(efuses["BLOCK_KEY0"]["value"].replace(" ", "")) == \
        key.read_bytes()[::-1]  # in the clear (reversed by espefuse): for recovery


def test_a_weak_fuse_bit_fails_the_rs_check(fast_rig: Rig, tmp_path: Path) -> None:
    board = fast_rig.plug(chip="esp32c3", faults=Faults(weak_efuse=4))
    burn = espefuse(board.port, "burn-key", "BLOCK_KEY0", str(_key(tmp_path)),
                    "XTS_AES_128_KEY")
    assert burn.returncode == 2
    # espefuse's own retries (base_fields burn_words), then its verdict
    assert "Error in BLOCK4, re-burn it again (#2) to fix. fail_bit=False, num_errors=1" \
        in burn.output
    assert "Error(s) were detected in eFuses" in burn.output
    again = espefuse(board.port, "summary")
    assert "Error(s) in BLOCK4 [ERRORS:1 FAIL:False]" in again.output


@pytest.mark.parametrize(("chip", "lock"), [("esp32s3", "key"), ("esp32c6", "sdm"),
                                            ("esp32", "encrypted"), ("esp32c3", "secure_boot")])
def test_a_board_locked_by_another_line(fast_rig: Rig, tmp_path: Path, chip: str,
                                        lock: str) -> None:
    index, faults = parse_fault_spec(f"0:locked={lock}")
    board = fast_rig.plug(chip=chip, faults=faults)
    if lock == "sdm":
        out = esptool(board.port, "get-security-info").output
        assert "in Secure Download Mode" in out and "Flags: 0x00000004" in out
        return
    efuses = summary(board.port, tmp_path / "s.json")
    if lock == "secure_boot":
        assert efuses["SECURE_BOOT_EN"]["value"] is True
        assert efuses["KEY_PURPOSE_0"]["value"] == "SECURE_BOOT_DIGEST0"
        return
    if chip == "esp32":
        assert efuses["BLOCK1"]["readable"] is False
        assert efuses["FLASH_CRYPT_CNT"]["value"] == 1
    else:
        assert efuses["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
        refused = espefuse(board.port, "burn-key", "BLOCK_KEY0", str(_key(tmp_path)),
                           "XTS_AES_128_KEY")
        assert refused.returncode == 2 and "BLOCK_KEY0 is read-protected" in refused.output


def test_fault_specs_for_efuses() -> None:
    _, faults = parse_fault_spec("2:locked=encrypted,weak_efuse=4,pull_after_burns=3")
    assert faults == Faults(locked="encrypted", weak_efuse=4, pull_after_burns=3)
    assert faults.describe() == "pull_after_burns=3,weak_efuse=4,locked=encrypted"
    with pytest.raises(ValueError, match="locked must be one of sdm, key"):
        parse_fault_spec("0:locked=glue")
    with pytest.raises(ValueError, match="bad value"):
        parse_fault_spec("0:pull_after_burns=0")
