"""How long the eFuse controller is busy with one program command.

No Espressif document states a burn's duration. What ESP-IDF does publish is the
controller's timing fields and the values it programs into them: ESP-IDF v5.5.1
``components/hal/esp32s2/efuse_hal.c`` ``efuse_hal_set_timing`` (the one chip whose HAL
sets every field, for an APB clock of 20, 40 or 80 MHz) and the field descriptions in
``components/soc/<chip>/register/soc/efuse_reg.h``. The cycle counts in that table
scale with the clock so that the times stay the same, which is what makes them the
cell's needs rather than a clock's:

* ``PWR_ON_NUM`` "power up time for VDDQ": 0x2880 / 0x5100 / 0xA200 cycles = 518.4 us;
* ``DAC_NUM`` x ``DAC_CLK_DIV`` "rising period of the programming voltage": 255 steps of
  0x28 / 0x50 / 0xA0 cycles = 510 us;
* ``TPGM`` "active programming time": 0xC8 / 0x190 / 0x320 cycles = 10 us per bit that
  is blown; ``TPGM_INACTIVE`` 1 / 2 / 4 cycles = 0.05 us per bit that is not;
  ``TSUP_A`` and ``THP_A`` (setup and hold per bit) about 0.05 us each;
* ``PWR_OFF_NUM`` "power outage time for VDDQ": 0x40 / 0x80 cycles = 3.2 us.

**Our reading**: the controller walks every bit of the block's write registers (its
check bytes included), pulsing the ones for TPGM, between one power-up and one
power-off; the same figures serve every chip (the ESP32's HAL only sets clock
dividers). A key block with its RS bytes (352 bits, about half of them ones) then
takes about 2.8 ms, a BLOCK0 burn of a few flags about 1.1 ms: small beside the
serial round trips around it (one READ_REG at 115200 Bd is about 2 ms), which is
why batch mode saves time and the burns themselves hardly matter.
"""

from __future__ import annotations

from typing import Any

POWER_UP_S = 518.4e-6  # PWR_ON_NUM
VOLTAGE_RAMP_S = 510e-6  # DAC_NUM x DAC_CLK_DIV
POWER_OFF_S = 3.2e-6  # PWR_OFF_NUM
BLOWN_BIT_S = 10e-6  # TPGM
SKIPPED_BIT_S = 0.05e-6  # TPGM_INACTIVE
BIT_SETUP_HOLD_S = 0.1e-6  # TSUP_A + THP_A


def program_seconds(ones: int, bits: int) -> float:
    """One program command over ``bits`` bits of which ``ones`` are blown."""
    return (POWER_UP_S + VOLTAGE_RAMP_S + POWER_OFF_S + ones * BLOWN_BIT_S
            + (bits - ones) * SKIPPED_BIT_S + bits * BIT_SETUP_HOLD_S)


def pending_bits(ctrl: Any, block_ids: list[int]) -> tuple[int, int]:
    """(ones, bits) in the write registers of ``block_ids``: what a program command
    is about to blow (``ctrl``: espefuse's emulator, before it copies them)."""
    ones = bits = 0
    for block_id in block_ids:
        data = ctrl.read_block(block_id, wr_regs=True)
        ones += int(data.count(1))
        bits += int(data.len)
    return ones, bits
