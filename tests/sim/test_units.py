"""Unit tests of the building blocks: SLIP, checksum, flash semantics, faults, MACs."""

from __future__ import annotations

import os
import random

import pytest
from esptool.loader import ESPLoader

from station.sim import Faults, parse_fault_spec, parse_fault_specs, parse_size
from station.sim.chips import CHIP_NAMES, chip_spec, mac_crc8, probe
from station.sim.flash import BLOCK, SECTOR, Flash, FlashTiming, erase_plan
from station.sim.plugged import MacAllocator
from station.sim.protocol import checksum
from station.sim.slip import Decoder, encode

pytestmark = pytest.mark.timeout(30)


def test_slip_round_trip_matches_esptool_encoding() -> None:
    rng = random.Random(3)
    packets = [bytes(rng.choice(b"\xc0\xdb\xdc\xdd\x00A") for _ in range(n)) for n in (1, 7, 300)]
    # esptool's ESPLoader.write() framing, reproduced from loader.py
    wire = b"".join(
        b"\xc0" + p.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"
        for p in packets
    )
    assert wire == b"".join(encode(p) for p in packets)
    decoder = Decoder()
    got: list[bytes] = []
    for i in range(0, len(wire), 5):  # frames split across arbitrary chunk borders
        got += [frame for frame, _ in decoder.feed(wire[i : i + 5])]
    assert got == packets


def test_slip_decoder_reports_frame_end_offsets() -> None:
    chunk = encode(b"ab") + encode(b"c")
    assert Decoder().feed(chunk) == [(b"ab", 4), (b"c", 7)]


def test_checksum_matches_esptool() -> None:
    for n in (0, 1, 2, 3, 17, 1024, 16384, 5000):
        data = os.urandom(n)
        assert checksum(data) == ESPLoader.checksum(data)


def test_flash_program_only_clears_bits_and_erase_restores() -> None:
    flash = Flash(BLOCK * 2, FlashTiming(enabled=False))
    flash.program(0x10, b"\x0f\xf0")
    flash.program(0x10, b"\xf3\x3f")
    assert flash.read(0x10, 2) == b"\x03\x30"
    flash.erase(0x10, 1)
    assert flash.read(0, SECTOR) == b"\xff" * SECTOR


def test_erase_plan_uses_blocks_when_aligned() -> None:
    assert erase_plan(0x1000, 0x1F000) == [(0x1000 + i * SECTOR, SECTOR) for i in range(15)] + [
        (0x10000, BLOCK)
    ]


def test_flash_timing_model() -> None:
    timing = FlashTiming()
    assert timing.erase(sectors=2, blocks=1) == pytest.approx(0.045 * 2 + 0.150)
    assert timing.program(257) == pytest.approx(2 * 0.0007)
    assert FlashTiming(slow=4).program(256) == pytest.approx(4 * 0.0007)
    assert FlashTiming(enabled=False).erase(10, 10) == 0


def test_fault_specs() -> None:
    assert parse_fault_spec("3:unplug_after=200000") == (3, Faults(unplug_after=200000))
    assert parse_fault_spec("5:mute")[1].mute
    assert parse_fault_spec("9:not_esp")[1] == Faults(garbage=True)
    specs = parse_fault_specs(["7:corrupt=0.001", "7:slow_flash=4", "2:slow=2,garbage"])
    assert specs[7] == Faults(corrupt=0.001, slow_flash=4.0)
    assert specs[2] == Faults(slow_flash=2.0, garbage=True)
    assert specs[2].describe() == "slow=2,garbage"
    for bad in ("mute", "x:mute", "1:", "1:boom", "1:mute=1", "1:corrupt=2", "1:slow",
                "-1:mute", "1:unplug_after=-5"):
        with pytest.raises(ValueError):
            parse_fault_spec(bad)


def test_parse_size() -> None:
    assert parse_size("4MB") == 4 << 20
    assert parse_size("512KB") == 512 << 10
    assert parse_size("0x200000") == 2 << 20


def test_macs_are_deterministic_unique_and_espressif() -> None:
    first = [MacAllocator(seed=5).next() for _ in range(1)]
    a, b = MacAllocator(seed=5), MacAllocator(seed=5)
    macs = [a.next() for _ in range(500)]
    assert macs == [b.next() for _ in range(500)]
    assert macs[0] == first[0]
    assert len(set(macs)) == 500
    assert all(m[:3] == bytes.fromhex("240ac4") and m[5] % 4 == 0 for m in macs)
    assert MacAllocator(seed=6).next() != macs[0]


def test_esp32_mac_efuse_words_decode_like_esptool() -> None:
    mac = bytes.fromhex("240ac4123456")
    regs = chip_spec("esp32").registers(mac)
    word1, word2 = regs[0x3FF5A004], regs[0x3FF5A008]
    assert (word2 >> 16) & 0xFF == mac_crc8(mac)
    assert (word2.to_bytes(4, "big") + word1.to_bytes(4, "big"))[2:8] == mac


# What esptool prints for each chip (its own methods over the board's registers).
DESCRIPTIONS = {
    "esp32": "ESP32-D0WD-V3 (revision v3.0)", "esp32s2": "ESP32-S2 (revision v1.0)",
    "esp32s3": "ESP32-S3 (QFN56) (revision v0.2)", "esp32c3": "ESP32-C3 (QFN32) (revision v0.4)",
    "esp32c2": "ESP32-C2 (revision v1.0)", "esp32c6": "ESP32-C6 (QFN40) (revision v0.1)",
    "esp32c5": "ESP32-C5N (revision v1.0)", "esp32c61": "ESP32-C61N (revision v1.0)",
    "esp32h2": "ESP32-H2 (revision v0.1)", "esp32p4": "ESP32-P4 (revision v1.0)",
}


@pytest.mark.parametrize("chip", CHIP_NAMES)
def test_every_chip_reads_back_through_esptools_methods(chip: str) -> None:
    mac = bytes.fromhex("240ac4a1b2c4")
    spec = chip_spec(chip)
    esp = probe(spec.rom_class, spec.registers(mac))
    assert bytes(esp.read_mac()) == mac
    description = esp.get_chip_description()
    assert "Unknown" not in description
    if chip in DESCRIPTIONS:
        assert description == DESCRIPTIONS[chip]
    assert esp.get_chip_features()
    assert spec.chip_id == spec.rom_class.IMAGE_CHIP_ID
    assert spec.bootloader_offset == spec.rom_class.BOOTLOADER_FLASH_OFFSET
