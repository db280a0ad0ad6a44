"""Secure download mode and disabled download mode, as esptool and espefuse meet them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from esptool.targets import CHIP_DEFS
from esptool.util import UnsupportedCommandError

from station.sim import Rig

from .conftest import esptool
from .efusekit import espefuse, one_connect_attempt

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _lock(port: str, efuse: str = "ENABLE_SECURITY_DOWNLOAD",
          env: dict[str, str] | None = None) -> str:
    burn = espefuse(port, "burn-efuse", efuse, "1", env=env)
    assert burn.returncode == 0, burn.output
    return burn.output


def test_secure_download_mode_limits_the_rom(fast_rig: Rig, tmp_path: Path) -> None:
    board = fast_rig.plug(chip="esp32s3")
    out = _lock(board.port)
    # espefuse burns it, reconnects, sees the mode and stops (espefuse efuse_read)
    assert "Secure download mode is enabled." in out
    assert "ENABLE_SECURITY_DOWNLOAD is enabled." in out and "Successful." in out

    read = esptool(board.port, "read-flash", "0", "0x1000", str(tmp_path / "r.bin"))
    assert read.returncode == 2
    assert "Chip type:          ESP32-S3 in Secure Download Mode" in read.output
    assert "The 'read-flash' command is not available in Secure Download Mode." in read.output

    info = esptool(board.port, "get-security-info")
    assert info.returncode == 0 and "Flags: 0x00000004" in info.output, info.output
    assert "Stub flasher is not supported in Secure Download Mode" in info.output

    summary = espefuse(board.port, "summary")
    assert summary.returncode == 2
    assert "Secure Download Mode is enabled. The tool can not read eFuses." in summary.output

    # the ROM itself refuses what is not on its list, as esptool#895 shows on a C2
    esp = CHIP_DEFS["esp32s3"](board.port)
    try:
        esp.connect("no_reset")
        assert esp.secure_download_mode
        with pytest.raises(UnsupportedCommandError,
                           match=r"This command \(0xa\) is not supported in Secure Download"):
            esp.read_reg(0x60007044)
        with pytest.raises(UnsupportedCommandError):
            esp.mem_begin(64, 1, 64, 0x3FC90000)  # no stub upload
    finally:
        esp._port.close()

    # plaintext writes still work (no compression, no verify)
    app = tmp_path / "app.bin"
    app.write_bytes(os.urandom(0x4000))
    write = esptool(board.port, "write-flash", "0x10000", str(app))
    assert write.returncode == 0, write.output
    assert "Cannot verify written data if encrypted or in secure download mode." in write.output
    assert fast_rig.flash(board)[0x10000:0x14000] == app.read_bytes()


def test_esp32s2_in_secure_download_mode_is_recognised(fast_rig: Rig) -> None:
    """The S2's security info has no chip id; its magic-register read is refused, and
    that refusal is how esptool knows it (cmds.detect_chip, serial-protocol docs)."""
    board = fast_rig.plug(chip="esp32s2")
    _lock(board.port)
    out = esptool(board.port, "get-security-info").output
    assert "Detecting chip type... ESP32-S2" in out
    assert "Chip type:          ESP32-S2 in Secure Download Mode" in out


def test_disabled_download_mode_leaves_nothing_to_talk_to(fast_rig: Rig,
                                                         tmp_path: Path) -> None:
    board = fast_rig.plug(chip="esp32c3")
    # espefuse tries to reconnect after the burn (esptool's 7 attempts by default)
    out = _lock(board.port, "DIS_DOWNLOAD_MODE", env=one_connect_attempt(tmp_path))
    assert "Can not re-connect to the chip." in out
    assert "DIS_DOWNLOAD_MODE is enabled." in out and "Successful." in out
    gone = esptool(board.port, "chip-id", pre=("--connect-attempts", "1"))
    assert gone.returncode == 2
    assert "No serial data received" in gone.output


def test_esp32_uart_download_dis_takes_effect_at_the_next_reset(fast_rig: Rig) -> None:
    board = fast_rig.plug(chip="esp32")
    out = _lock(board.port, "UART_DOWNLOAD_DIS")
    assert "Successful." in out
    gone = esptool(board.port, "chip-id", pre=("--connect-attempts", "1"))
    assert gone.returncode == 2 and "No serial data received" in gone.output
