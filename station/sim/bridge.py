"""USB-UART bridges: their USB ids and the highest baud each clocks correctly.

Typical limits (REAL-RIGS.md "Bridges and baud", from the vendors' data sheets, the
Linux drivers and esptool#435): CP2102/2103 921600 (higher rates are undefined in the
Linux cp210x driver), CP2102N 3 Mbaud, FT232R 3 Mbaud, CH343/CH9102 6 Mbaud, CH340
unreliable above 460800. Driven above its limit a bridge still passes bytes, but wrong
ones, in both directions; esptool's ``change_baud`` sends the command, waits 50 ms and
flushes without checking that the link still works (loader.py), so the failure shows on
the next command (sync, block write) as a timeout or an invalid packet head.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BRIDGE = "cp2102n"


@dataclass(frozen=True)
class Bridge:
    """A USB-UART bridge chip: its USB id and the highest baud it clocks correctly."""

    name: str
    vid: int
    pid: int
    max_baud: int


BRIDGES: dict[str, Bridge] = {
    b.name: b
    for b in (
        Bridge("cp2102", 0x10C4, 0xEA60, 921_600),
        Bridge("cp2102n", 0x10C4, 0xEA60, 3_000_000),
        Bridge("ch340", 0x1A86, 0x7523, 460_800),
        Bridge("ch343", 0x1A86, 0x55D3, 6_000_000),
        Bridge("ft232r", 0x0403, 0x6001, 3_000_000),
    )
}


def garble(data: bytes) -> bytes:
    """What comes out of a bridge clocked above its limit: nothing usable.

    Modelled deterministically as a sampling error at the wrong rate: every other byte
    is lost and the survivors have their bits shifted, so no SLIP frame survives.
    """
    return bytes(((b << 1) | (b >> 7)) & 0xFF ^ 0x5A for b in data[::2])
