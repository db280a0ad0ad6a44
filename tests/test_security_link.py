"""The station's eFuse batches on the wire (station/security/efuse_link.py): the same
burns as espefuse alone, in fewer round trips, with espefuse's checks intact."""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from esptool.util import FatalError

from station.config import SecuritySection
from station.ports.serial import quiet_esptool
from station.security import chip_plan
from station.security import efuses as fuses
from station.security.efuse_link import EfuseLink
from station.sim import Faults, Rig
from tests.securekit import tool

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
READ_REG, WRITE_REG = 0x0A, 0x09
SECURITY = SecuritySection(flash_encryption="release", lockdown=True)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "hub", seed=7, throttle=False, flash_timing=False) as rig:
        yield rig


def _loader(port: str) -> Any:
    import esptool

    return esptool.detect_chip(port, connect_mode="no-reset", connect_attempts=1).run_stub()


def test_a_key_batch_takes_under_half_the_round_trips_and_burns_the_same(
        rig: Rig, tmp_path: Path) -> None:
    """ESP32-C3, the station's key batch (key block, purpose, protections): espefuse
    alone sent 799 commands (670 register reads, 129 writes); through the link under
    half, and the chip holds what espefuse's own CLI reads back."""
    plan = chip_plan("esp32c3", SECURITY)
    board = rig.plug(chip="esp32c3")
    esp = _loader(board.port)
    try:
        view = fuses.Efuses()
        state = fuses.read_state(esp, plan, view)
        before = rig.board(board).commands.copy()
        step = plan.steps[0]
        done = fuses.burn(esp, plan, step, state, key=os.urandom(32), view=view)
        sent = rig.board(board).commands - before
    finally:
        esp._port.close()
    assert done[0] == "BLOCK_KEY0 (XTS_AES_128_KEY)"
    assert sent[READ_REG] + sent[WRITE_REG] < 400, sent
    out = tmp_path / "summary.json"
    read = tool("espefuse", "--port", board.port, "summary", "--format", "json",
                "--file", str(out))
    assert read.returncode == 0, read.stdout
    summary = json.loads(out.read_text())
    assert summary["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
    assert summary["BLOCK_KEY0"]["readable"] is False


def test_a_weak_fuse_bit_still_fails_the_batch_with_espefuses_verdict(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """ESP32-S3, a 256-bit key: espefuse programs BLOCK_KEY1, then BLOCK_KEY0, whose
    bit that never blows shows in the error register only after BLOCK_KEY0's own
    program (a value kept from BLOCK_KEY1's would hide it): espefuse re-burns twice and
    gives up, as without the link."""
    quiet_esptool()  # espefuse's words in the station's log, as in a run
    caplog.set_level(logging.DEBUG, logger="station.flasher")
    plan = chip_plan("esp32s3", SecuritySection(flash_encryption="release", xts_aes=256))
    board = rig.plug(chip="esp32s3", faults=Faults(weak_efuse=4))
    esp = _loader(board.port)
    try:
        view = fuses.Efuses()
        state = fuses.read_state(esp, plan, view)
        with pytest.raises(FatalError, match="Error\\(s\\) were detected in eFuses"):
            fuses.burn(esp, plan, plan.steps[0], state, key=os.urandom(64), view=view)
        assert repr(view) == "Efuses(unread)"  # the next look reads the chip afresh
    finally:
        esp._port.close()
    assert "Error in BLOCK4, re-burn it again (#2) to fix. fail_bit=False, num_errors=1" \
        in caplog.text


class Loader:
    """What the link sends, command by command."""

    UART_DATE_REG_ADDR = 0x6000007C
    ESP_CMDS = {"WRITE_REG": WRITE_REG}

    def __init__(self, stub: bool = True) -> None:
        self.IS_STUB = stub
        self.sent: list[tuple[str, Any]] = []
        self.registers: dict[int, int] = {}

    def read_reg(self, addr: int, timeout: float = 3.0) -> int:
        self.sent.append(("read", addr))
        return self.registers.get(addr, 0)

    def check_command(self, what: str, op: int, data: bytes) -> None:
        entries = [struct.unpack_from("<IIII", data, i) for i in range(0, len(data), 16)]
        self.sent.append(("write", entries))

    def get_security_info(self) -> dict[str, int]:
        self.sent.append(("security", 0))
        return {"flags": 0}


class Efuses:
    class REGS:
        ERRORS = [0x100]

    class Block:
        rd_addr = 0x200

        def get_block_len(self) -> int:
            return 8

    blocks = [Block()]


def test_writes_go_together_in_order_before_anything_else() -> None:
    esp = Loader()
    link = EfuseLink(esp)
    link.write_reg(0x10, 1)
    link.write_reg(0x14, 2, delay_after_us=1000)
    assert esp.sent == []
    assert link.read_reg(0x18) == 0
    link.write_reg(0x1C, 3, mask=0xF)
    link.get_security_info()
    assert esp.sent == [
        ("write", [(0x10, 1, 0xFFFFFFFF, 0), (0x14, 2, 0xFFFFFFFF, 0),
                   (Loader.UART_DATE_REG_ADDR, 0, 0, 1000)]),
        ("read", 0x18),
        ("write", [(0x1C, 3, 0xF, 0)]), ("security", 0)]


def test_on_a_rom_loader_each_write_goes_alone_as_espefuse_sends_it() -> None:
    esp = Loader(stub=False)
    link = EfuseLink(esp)
    link.write_reg(0x10, 1)
    link.write_reg(0x14, 2, delay_after_us=1000)
    assert esp.sent == [
        ("write", [(0x10, 1, 0xFFFFFFFF, 0)]),
        ("write", [(0x14, 2, 0xFFFFFFFF, 0), (Loader.UART_DATE_REG_ADDR, 0, 0, 1000)])]


def test_status_registers_are_read_once_between_writes_and_others_every_time() -> None:
    esp = Loader()
    link = EfuseLink(esp)
    link.keep(Efuses)
    esp.registers = {0x100: 7, 0x204: 9, 0x300: 1}
    assert [link.read_reg(a) for a in (0x100, 0x100, 0x204, 0x204, 0x300, 0x300)] == \
        [7, 7, 9, 9, 1, 1]
    assert esp.sent == [("read", 0x100), ("read", 0x204), ("read", 0x300), ("read", 0x300)]
    esp.sent.clear()
    esp.registers[0x100] = 8  # the controller reloaded after the host's write
    link.write_reg(0x1D4, 1)
    assert link.read_reg(0x100) == 8
    assert esp.sent == [("write", [(0x1D4, 1, 0xFFFFFFFF, 0)]), ("read", 0x100)]


def test_update_reg_reads_modifies_and_writes_as_esptool_does() -> None:
    esp = Loader()
    esp.registers[0x40] = 0xFFFF_0F0F
    link = EfuseLink(esp)
    assert link.update_reg(0x40, 0xFF00, 0x28) == 0xFFFF_280F
    link.flush()
    assert esp.sent == [("read", 0x40), ("write", [(0x40, 0xFFFF_280F, 0xFFFFFFFF, 0)])]
