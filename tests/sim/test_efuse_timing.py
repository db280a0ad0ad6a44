"""What an eFuse burn costs: the controller's programming time (station/sim/efuse_timing.py)
and the serial round trips around it, where batch mode saves."""

from __future__ import annotations

from pathlib import Path

import pytest

from station.sim import Rig
from station.sim import efuse as efuse_module
from station.sim.efuse import EfuseArray
from station.sim.efuse_timing import program_seconds

from .efusekit import espefuse

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Clock:
    """time.monotonic for the eFuse model, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_command_register_stays_set_while_the_bits_are_blown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """espefuse's efuse_program: write registers, PGM_CMD, poll the command register
    until it reads 0 (wait_efuse_idle). The chip keeps it set while programming."""
    clock = Clock()
    monkeypatch.setattr(efuse_module.time, "monotonic", clock)
    efuses = EfuseArray("esp32c3")
    regs = efuses.ctrl.REGS
    block0 = efuses.ctrl.Blocks.get(efuses.ctrl.Blocks.BLOCKS[0])
    efuses.write(block0.wr_addr + 4, 0b1011 << 8)  # three flags in BLOCK0's word 1
    efuses.write(regs.EFUSE_CONF_REG, regs.EFUSE_WRITE_OP_CODE)
    command = regs.EFUSE_PGM_CMD | 0 << 2
    efuses.write(regs.EFUSE_CMD_REG, command)
    [(blocks, seconds)] = efuses.program_times
    bits = efuses.ctrl.read_block(0, wr_regs=True).len
    assert blocks == (0,) and seconds == pytest.approx(program_seconds(3, bits))
    assert 1.0e-3 < seconds < 1.2e-3  # power-up and voltage ramp, 3 x 10 us pulses
    assert efuses.read(regs.EFUSE_CMD_REG) == command
    clock.now += seconds * 0.99
    assert efuses.read(regs.EFUSE_CMD_REG) == command
    clock.now += seconds * 0.02
    assert efuses.read(regs.EFUSE_CMD_REG) == 0
    assert efuses.read(block0.rd_addr + 4) >> 8 & 0b1111 == 0b1011


@pytest.mark.parametrize("chip", ["esp32c3", "esp32"])
def test_a_key_burn_over_the_port_takes_the_controllers_time(fast_rig: Rig, tmp_path: Path,
                                                             chip: str) -> None:
    """The real espefuse waits for each program command: a key block (with its RS
    check bytes on the C3) takes about 3 ms, BLOCK0 about 1 ms."""
    board = fast_rig.plug(chip=chip)
    key = tmp_path / "key.bin"
    key.write_bytes(b"\x5a\xa5" * 16)  # 128 of 256 bits set
    if chip == "esp32":
        burn = espefuse(board.port, "burn-key", "flash_encryption", str(key))
    else:
        burn = espefuse(board.port, "burn-key", "BLOCK_KEY0", str(key), "XTS_AES_128_KEY")
    assert burn.returncode == 0, burn.output
    times = fast_rig.board(board).efuses.program_times
    if chip == "esp32":  # EFUSE_CMD_WRITE programs every block; espefuse fills one
        key_time, block0_time = (s for _, s in times)  # BLOCK1, then the protections
    else:
        key_time, block0_time = dict(times)[(4,)], dict(times)[(0,)]
    assert 2.0e-3 < key_time < 4.0e-3  # 256 key bits (+ 96 RS bits), about half blown
    assert 1.0e-3 < block0_time < 1.3e-3  # purpose, WR_DIS and RD_DIS bits


def test_batch_mode_costs_a_fraction_of_separate_burns_on_the_wire(fast_rig: Rig) -> None:
    """esptool#456: 14 separate burns took > 30 s per unit. Each espefuse run connects
    and reads every eFuse block again; one chained run does that once."""
    fuses = ["DIS_USB_JTAG", "DIS_PAD_JTAG", "DIS_DOWNLOAD_ICACHE", "DIS_DOWNLOAD_DCACHE",
             "DIS_FORCE_DOWNLOAD"]
    alone, batched = fast_rig.plug(chip="esp32s3"), fast_rig.plug(chip="esp32s3")
    for name in fuses:
        assert espefuse(alone.port, "burn-efuse", name, "1").returncode == 0
    pairs = [part for name in fuses for part in (name, "1")]
    assert espefuse(batched.port, "burn-efuse", *pairs).returncode == 0
    separate = fast_rig.board(alone).bytes_received
    batch = fast_rig.board(batched).bytes_received
    assert batch * 3 < separate, (batch, separate)
