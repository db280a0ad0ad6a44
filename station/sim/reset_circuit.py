"""The classic devkit auto-reset circuit: EN and GPIO0 driven from RTS and DTR.

Espressif's devkits (ESP32-DevKitC, ESP32-S3-DevKitC-1 ... schematics, "Auto-program"
block) drive the chip from the USB-UART bridge through two NPN transistors, cross-wired
so that only *one* line asserted acts:

=====  =====  ==============  =========================================
DTR    RTS    EN              GPIO0
=====  =====  ==============  =========================================
off    off    released (1)    released (1)
on     on     released (1)    released (1)
off    on     pulled low: chip held in reset
on     off                    pulled low: download strap
=====  =====  ==============  =========================================

("on" = asserted, pyserial's ``True``; esp_pylib ``serial_reset``: ``set_rts(PIN_LOW)``
is ``EN=LOW``, ``set_dtr(PIN_LOW)`` is ``IO0=LOW``.)

EN is the chip-enable input with an RC delay: a 10 kOhm pull-up and the capacitor
Espressif asks for (1-10 uF; "ESP32 Hardware Design Guidelines", chip power-up and reset
timing). When the transistor releases EN, EN rises with tau = R*C and the chip leaves
reset when it crosses the input-high threshold (0.75 VDD: ``t = R*C*ln 4`` = 13.9 ms for
10 kOhm and 1 uF). The boot-mode straps (GPIO0) are latched at that moment. That delay
is what makes esptool's ClassicReset work at all: between ``set_dtr(True)`` and
``set_rts(False)`` both lines are asserted for one call (over RFC 2217: one network
round trip), EN is already released and GPIO0 is still high; the chip must not wake
before GPIO0 goes low. Pulling EN low again before the threshold discharges the
capacitor: the wait starts over.

**Over RFC 2217 the cap decides.** pyserial's client waits for the server's answer to
every SET_CONTROL by polling in 50 ms sleeps (``TelnetSubnegotiation.wait``; with
``?ign_set_control`` it sleeps 0.1 s instead), so ClassicReset's (on, on) step lasts at
least 50 ms. With 1 uF (13.9 ms) the chip wakes with GPIO0 still high and boots from
flash: esptool says "Wrong boot mode detected (0x13)". That is why esptool's
``esp_rfc2217_server`` runs the reset sequence on the hub host itself ("the RTS and DTR
signals cannot be retransmitted through RFC 2217 with proper timing",
``esp_port_manager.py``). A plain relay (ser2net, this face) needs the slow EN of a
10 uF cap (139 ms), the rig's default: ``en_cap_uf`` per board.

A board without the circuit (``kind="none"``) ignores DTR/RTS: only buttons
(:meth:`AutoReset.press_boot_en`: hold BOOT, tap EN, release BOOT) reset it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Literal

ResetCircuitKind = Literal["auto", "none"]
RESET_CIRCUITS: tuple[ResetCircuitKind, ...] = ("auto", "none")
EN_PULLUP_OHM = 10_000.0
EN_CAP_UF = 10.0  # the top of Espressif's 1-10 uF: see the module docstring
EN_THRESHOLD = 0.75  # of VDD
BUTTON_HOLD_S = 0.1  # how long a finger holds EN down


def en_delay(cap_uf: float = EN_CAP_UF, pullup_ohm: float = EN_PULLUP_OHM) -> float:
    """Seconds from EN released to the chip leaving reset (RC charge to the threshold)."""
    return pullup_ohm * cap_uf * 1e-6 * math.log(1 / (1 - EN_THRESHOLD))


def parse_reset_circuit(text: str) -> ResetCircuitKind:
    if text not in RESET_CIRCUITS:
        raise ValueError(f"reset circuit must be one of {', '.join(RESET_CIRCUITS)}, "
                         f"got {text!r}")
    return text


class AutoReset:
    """EN/GPIO0 levels from DTR/RTS; calls ``hold()`` on EN low, ``boot(download)`` on wake.

    ``boot`` gets the latched strap: True when GPIO0 was low (download mode).
    """

    def __init__(self, kind: ResetCircuitKind, hold: Callable[[], None],
                 boot: Callable[[bool], None], delay_s: float | None = None) -> None:
        self.kind = kind
        self.delay_s = en_delay() if delay_s is None else delay_s
        self._hold = hold
        self._boot = boot
        self._lines_en_low = False
        self._lines_io0_low = False
        self._button_en = False
        self._button_boot = False
        self._wake: asyncio.TimerHandle | None = None
        self.in_reset = False
        self.boots: list[bool] = []  # latched straps, one per wake (tests)

    @property
    def en_low(self) -> bool:
        return self._lines_en_low or self._button_en

    @property
    def io0_low(self) -> bool:
        return self._lines_io0_low or self._button_boot

    def set_lines(self, dtr: bool, rts: bool, at: float | None = None) -> None:
        """The host changed DTR and/or RTS (one RFC 2217 SET_CONTROL).

        ``at`` is when the host set them (the loop's clock, ``time.monotonic``); None:
        now. A chip that was due to wake before ``at`` woke with the straps it had then,
        however late this change is heard (the rig's loop is not the chip's clock).
        """
        if self.kind == "none":
            return
        if self._wake is not None and at is not None and self._wake.when() <= at:
            self.cancel()
            self._wake_up()
        self._lines_en_low = rts and not dtr
        self._lines_io0_low = dtr and not rts
        self._update(at)

    async def press_boot_en(self) -> None:
        """A person holds BOOT, taps EN, then lets BOOT go: download mode."""
        self._button_boot = True
        self._button_en = True
        self._update()
        await asyncio.sleep(BUTTON_HOLD_S)
        self._button_en = False
        self._update()
        await asyncio.sleep(self.delay_s + BUTTON_HOLD_S)
        self._button_boot = False
        self._update()

    async def press_en(self) -> None:
        """A person taps EN alone: the chip boots from flash."""
        self._button_en = True
        self._update()
        await asyncio.sleep(BUTTON_HOLD_S)
        self._button_en = False
        self._update()

    def cancel(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

    def _update(self, at: float | None = None) -> None:
        if self.en_low:
            self.cancel()  # the capacitor discharges: any pending wake is off
            if not self.in_reset:
                self.in_reset = True
                self._hold()
        elif self.in_reset and self._wake is None:
            loop = asyncio.get_running_loop()
            released = loop.time() if at is None else min(at, loop.time())
            self._wake = loop.call_at(released + self.delay_s, self._wake_up)

    def _wake_up(self) -> None:
        self._wake = None
        self.in_reset = False
        download = self.io0_low  # the strap latched as EN crosses the threshold
        self.boots.append(download)
        self._boot(download)
