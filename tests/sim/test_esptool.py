"""The real esptool against virtual boards: identity commands and flash round trips."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from esptool.cmds import detect_chip

from station.sim import Rig
from station.sim.board import Mode

from .conftest import esptool, make_images

pytestmark = pytest.mark.timeout(300)

CHIPS = ["esp32", "esp32s3", "esp32c3"]
NAMES = {"esp32": "ESP32", "esp32s3": "ESP32-S3", "esp32c3": "ESP32-C3"}


@pytest.mark.parametrize("chip", CHIPS)
def test_identity_commands(fast_rig: Rig, chip: str) -> None:
    board = fast_rig.plug(chip=chip)
    mac = esptool(board.port, "read-mac")
    assert mac.returncode == 0, mac.output
    assert f"Detecting chip type... {NAMES[chip]}" in mac.output
    assert f"MAC:                {board.mac}" in mac.output
    assert "Stub flasher running." in mac.output

    chip_id = esptool(board.port, "chip-id")
    assert chip_id.returncode == 0, chip_id.output
    assert board.mac in chip_id.output  # these chips have no chip ID: esptool shows the MAC

    flash_id = esptool(board.port, "flash-id")
    assert flash_id.returncode == 0, flash_id.output
    assert "Manufacturer: c8" in flash_id.output
    assert "Device: 4016" in flash_id.output
    assert "Detected flash size: 4MB" in flash_id.output
    assert "XMC" not in flash_id.output and "Failed to communicate" not in flash_id.output

    rom = esptool(board.port, "read-mac", pre=("--no-stub",))
    assert rom.returncode == 0, rom.output
    assert board.mac in rom.output and "Uploading stub" not in rom.output


@pytest.mark.parametrize("chip", CHIPS)
def test_python_api_reads_mac(fast_rig: Rig, chip: str) -> None:
    board = fast_rig.plug(chip=chip)
    with detect_chip(board.port, connect_attempts=2) as esp:
        assert NAMES[chip] == esp.CHIP_NAME
        assert ":".join(f"{b:02x}" for b in esp.read_mac()) == board.mac
        esp = esp.run_stub()
        assert esp.IS_STUB
        assert esp.flash_id() & 0xFF == 0xC8
        assert fast_rig.board(board).mode is Mode.STUB
    # closing the port is the reset: back to the ROM (polled, the close is asynchronous)
    deadline = time.monotonic() + 5
    while fast_rig.board(board).mode is not Mode.ROM and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fast_rig.board(board).mode is Mode.ROM


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize(
    ("mode", "pre", "extra"),
    [("stub-compressed", (), ()), ("stub-no-compress", (), ("--no-compress",)),
     ("rom", ("--no-stub",), ())],
)
def test_write_verify_read(tmp_path: Path, fast_rig: Rig, chip: str, mode: str,
                           pre: tuple[str, ...], extra: tuple[str, ...]) -> None:
    images = make_images(tmp_path, chip)
    board = fast_rig.plug(chip=chip)
    write = esptool(board.port, "write-flash", *extra, *images.args(), pre=pre)
    assert write.returncode == 0, write.output
    assert write.output.count("Hash of data verified.") == 3
    if mode == "stub-compressed":
        assert "Compressed " in write.output  # bootloader/table took the deflate path
        assert "will flash uncompressed" in write.output  # the random app did not

    verify = esptool(board.port, "verify-flash", *images.args(), pre=pre)
    assert verify.returncode == 0, verify.output
    assert "Verification successful" in verify.output or "verified" in verify.output

    flash = fast_rig.flash(board)
    for offset, data in images.parts.items():
        assert flash[offset : offset + len(data)] == data, f"mismatch at {offset:#x}"

    out = tmp_path / "readback.bin"
    # The ROM reads 64 bytes per command: read a small region there, the whole app via stub.
    length = 4096 if pre else len(images.parts[0x10000])
    read = esptool(board.port, "read-flash", "0x10000", hex(length), str(out), pre=pre)
    assert read.returncode == 0, read.output
    assert out.read_bytes() == images.parts[0x10000][:length]

    fast_rig.unplug(board)
    dump = board.dump_path.read_bytes()
    assert len(dump) == 4 << 20
    for offset, data in images.parts.items():
        assert dump[offset : offset + len(data)] == data


def test_compressed_app_spans_many_deflate_blocks(tmp_path: Path, fast_rig: Rig) -> None:
    images = make_images(tmp_path, "esp32", compressible_app=True)
    board = fast_rig.plug(chip="esp32")
    write = esptool(board.port, "write-flash", *images.args())
    assert write.returncode == 0, write.output
    assert "will flash uncompressed" not in write.output
    app = images.parts[0x10000]
    assert hashlib.md5(fast_rig.flash(board)[0x10000 : 0x10000 + len(app)]).digest() == \
        hashlib.md5(app).digest()


def test_erase_region_and_erase_flash(tmp_path: Path, fast_rig: Rig) -> None:
    images = make_images(tmp_path, "esp32c3", app_size=64 * 1024)
    board = fast_rig.plug(chip="esp32c3")
    assert esptool(board.port, "write-flash", *images.args()).returncode == 0
    erase = esptool(board.port, "erase-region", "0x10000", "0x4000")
    assert erase.returncode == 0, erase.output
    flash = fast_rig.flash(board)
    assert flash[0x10000:0x14000] == b"\xff" * 0x4000
    assert flash[0x14000:0x20000] == images.parts[0x10000][0x4000:]
    erase_all = esptool(board.port, "erase-flash")
    assert erase_all.returncode == 0, erase_all.output
    assert fast_rig.flash(board) == b"\xff" * (4 << 20)


@pytest.mark.parametrize("pre", [(), ("--no-stub",)])
def test_change_baud_rate_is_exact(fast_rig: Rig, pre: tuple[str, ...]) -> None:
    board = fast_rig.plug(chip="esp32")
    result = esptool(board.port, "--baud", "921600", "read-mac", pre=pre)
    assert result.returncode == 0, result.output
    assert "Changing baud rate to 921600" in result.output
    # the rate the board received equals the host's: esptool's CK8M correction came out exact
    assert fast_rig.board(board).baud_changes == [921600]
