"""Boards leave the line locked (issue 20): real `station run` over virtual boards of four
chips, real espefuse/espsecure inside; afterwards, what a person checks: the ledger,
each board's eFuses through `espefuse --virt`, its flash through `espsecure
decrypt-flash-data` with the key from its eFuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from station.daemon import EXIT_OK
from tests.securekit import (
    CHIPS,
    MARKS,
    SecureLine,
    burned_key,
    decrypt_with_fuses,
    mac_of,
    make_line,
    virt_summary,
)

pytestmark = MARKS

BOOT_AT = {"esp32": 0x1000}


@pytest.fixture(scope="module")
def line_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secure")


@pytest.fixture
def line(tmp_path: Path) -> SecureLine:
    return make_line(tmp_path)


def _images(line: SecureLine, chip: str) -> dict[int, bytes]:
    """The build's images by offset, with the signed bootloader and app the station
    made at start (its state/signed cache) in place of the unsigned ones."""
    build = line.builds[chip].parent
    plain = {BOOT_AT.get(chip, 0): (build / "bootloader" / "bootloader.bin").read_bytes(),
             0x8000: (build / "partition_table" / "partition-table.bin").read_bytes(),
             0x10000: (build / "app.bin").read_bytes()}
    signed = [p.read_bytes() for p in (line.state / "signed").glob("*.bin")]
    out = {}
    for offset, data in plain.items():
        match = [s for s in signed if s.startswith(data)]
        out[offset] = match[0] if offset != 0x8000 else data
        assert offset == 0x8000 or len(match) == 1, (chip, offset)
    return out


@pytest.mark.long(cpu=True)
def test_sixteen_boards_of_four_chips_leave_locked(line: SecureLine, tmp_path: Path) -> None:
    result, boards, flashes, files = line.plug_and_run([c for c in CHIPS for _ in range(4)])
    assert result.code == EXIT_OK, str(result)
    rows = line.rows()
    fingerprints = set()
    for board in boards:
        row = rows[mac_of(board)]
        assert (row["result"], row["boot"], row["lockdown"]) == ("done", "ok", 1), row
        assert row["security"] == "flash encryption release (host key), secure boot v2, " \
                                  "lock-down", row
        assert row["efuses"].split(", ")[-1] == "lockdown", row
        fingerprints.add(row["key_fingerprint"])
        assert line.journal(mac_of(board))[-1] == ("lockdown", "after")

        # the flash is ciphertext; the key in the fuses turns it back into the firmware
        chip, flash = board.chip, flashes[board.mac]
        for offset, image in _images(line, chip).items():
            stored = flash[offset:offset + len(image)]
            assert stored != image, (chip, offset)
            assert decrypt_with_fuses(chip, files[board.mac], stored, offset, tmp_path) == \
                image, (chip, offset)

        # espefuse reads the planned fields burned and protected
        fuses = virt_summary(chip, files[board.mac], tmp_path / "summary.json")
        if chip == "esp32":
            assert fuses["FLASH_CRYPT_CNT"]["value"] == 127
            assert fuses["BLOCK1"]["readable"] is False
            assert fuses["ABS_DONE_1"]["value"] is True
            assert fuses["UART_DOWNLOAD_DIS"]["value"] is True
            assert fuses["JTAG_DISABLE"]["value"] is True
        else:
            assert fuses["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
            assert fuses["BLOCK_KEY0"]["readable"] is False
            assert fuses["KEY_PURPOSE_1"]["value"] == "SECURE_BOOT_DIGEST0"
            assert fuses["SPI_BOOT_CRYPT_CNT"]["value"] == "Enable"
            for name in ("SECURE_BOOT_EN", "SECURE_BOOT_KEY_REVOKE1", "SECURE_BOOT_KEY_REVOKE2",
                         "DIS_DOWNLOAD_MANUAL_ENCRYPT", "DIS_PAD_JTAG",
                         "ENABLE_SECURITY_DOWNLOAD"):
                assert fuses[name]["value"] is True, (chip, name)
            assert fuses["RD_DIS"]["writeable"] is False
    assert len(fingerprints) == len(boards)  # a key per board
    log = (line.state / "station.log").read_text() + (line.state / "events.jsonl").read_text()
    for board in boards:  # no key material anywhere: the fuses' key never in a log
        key = burned_key(board.chip, files[board.mac])
        assert key.hex() not in log and key[::-1].hex() not in log


def test_station_check_prints_the_plan(line: SecureLine) -> None:
    result = line.cli("check")
    assert result.code == EXIT_OK, str(result)
    assert "security    flash encryption release (host key), secure boot v2, lock-down" \
        in result.stdout
    for chip in CHIPS:
        assert f"{chip}: 4 eFuse batches, in this order (each one is IRREVERSIBLE):" \
            in result.stdout
    assert "4. lockdown: DIS_DOWNLOAD_ICACHE; DIS_DOWNLOAD_DCACHE;" in result.stdout
    assert "ENABLE_SECURITY_DOWNLOAD\n" in result.stdout
