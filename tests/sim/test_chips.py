"""Every ESP32-family chip esptool 5.6 knows: identity, flash id and a stub write.

One board per chip, no throttle: the real esptool CLI detects it, reads its MAC back
from that chip's eFuse layout, runs RDID through that chip's SPI registers, uploads the
stub JSON esptool picks for it (to the load addresses in that JSON) and writes and
verifies a small image.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest
from esptool.loader import StubFlasher

from station.sim import Rig
from station.sim.chips import CHIP_NAMES, chip_spec, probe

from .conftest import esptool

pytestmark = pytest.mark.timeout(120)


def expected_stub_loads(chip: str, mac: bytes) -> list[tuple[int, int]] | None:
    """(address, size) of the segments esptool uploads for this chip, from its JSON."""
    spec = chip_spec(chip)
    stub_class = spec.rom_class.STUB_CLASS
    if stub_class is None:
        return None
    name = stub_class.stub_json_name(probe(spec.rom_class, spec.registers(mac)))
    for subdir in StubFlasher.STUB_SUBDIRS:
        path = Path(StubFlasher.STUB_DIR) / subdir / name
        if path.exists():
            stub = json.loads(path.read_text())
            loads = [(stub["text_start"], len(base64.b64decode(stub["text"])))]
            if "data" in stub:
                loads.append((stub["data_start"], len(base64.b64decode(stub["data"]))))
            return loads
    return None


@pytest.mark.parametrize("chip", CHIP_NAMES)
def test_chip_identity_flash_id_and_stub_write(tmp_path: Path, fast_rig: Rig, chip: str) -> None:
    spec = chip_spec(chip)
    board = fast_rig.plug(chip=chip, flash_size="2MB")
    mac = bytes.fromhex(board.mac.replace(":", ""))

    read_mac = esptool(board.port, "read-mac")
    assert read_mac.returncode == 0, read_mac.output
    assert f"Detecting chip type... {spec.esptool_name}\n" in read_mac.output
    assert "Unknown ESP" not in read_mac.output
    assert "WARNING: Detected crystal" not in read_mac.output
    expected = probe(spec.rom_class, spec.registers(mac))
    assert f"Chip type:          {expected.get_chip_description()}" in read_mac.output
    assert f"Crystal frequency:  {spec.xtal_hz // 1_000_000}MHz" in read_mac.output
    mac_line = "BASE MAC:           " if spec.mac_ext else "MAC:                "
    assert mac_line + board.mac in read_mac.output

    loads = expected_stub_loads(chip, mac)
    live = fast_rig.board(board)
    if loads is None:  # no stub for this chip in esptool 5.6: the ROM does everything
        assert "Stub flasher running." not in read_mac.output
    else:
        assert "Stub flasher running." in read_mac.output
        assert live.ram_loads == loads
        assert live.stub_uploaded == "flasher"  # esp-flasher-stub, esptool 5.6's default

    flash_id = esptool(board.port, "flash-id")
    assert flash_id.returncode == 0, flash_id.output
    assert "Manufacturer: c8" in flash_id.output and "Device: 4015" in flash_id.output
    assert "Detected flash size: 2MB" in flash_id.output

    rng = random.Random(chip)
    image = bytes(rng.choice(b"\x00\x01\xe9\xff") for _ in range(20 * 1024)) + rng.randbytes(8192)
    path = tmp_path / "app.bin"
    path.write_bytes(image)
    offset = 0x10000  # not the bootloader's: esptool would parse a bootloader header
    write = esptool(board.port, "write-flash", hex(offset), str(path))
    assert write.returncode == 0, write.output
    assert "Hash of data verified." in write.output
    flash = fast_rig.flash(board)
    assert flash[offset : offset + len(image)] == image
    assert flash[:offset] == b"\xff" * offset
    assert spec.bootloader_offset == spec.rom_class.BOOTLOADER_FLASH_OFFSET


def test_board_knows_which_stub_esptool_uploaded(fast_rig: Rig) -> None:
    board = fast_rig.plug(chip="esp32s3")
    legacy = esptool(board.port, "read-mac", env={"ESPTOOL_STUB_VERSION": "1"})
    assert legacy.returncode == 0, legacy.output
    assert "deprecated legacy stub" in legacy.output
    assert fast_rig.board(board).stub_uploaded == "legacy"
