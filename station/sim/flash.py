"""NOR flash model: contents with erase/program semantics, and how long things take.

Programming can only clear bits (``new = old & data``), erasing sets whole 4 KB sectors
(or 64 KB blocks) back to 0xFF, exactly like the SPI NOR chips on ESP32 modules. A write
to a region nobody erased therefore corrupts data, as it would on hardware.

Timing (published typical figures for 4 MB NOR chips, scaled by ``slow`` for faults):
sector erase 45 ms, 64 KB block erase 150 ms, page (256 B) program 0.7 ms, reads (and
the MD5 the loader computes over them) 10 MB/s. ``FlashTiming(enabled=False)`` turns
every duration into zero for fast functional tests.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

SECTOR = 0x1000
BLOCK = 0x10000
PAGE = 0x100


@dataclass(frozen=True)
class FlashTiming:
    """Durations of flash operations in seconds."""

    enabled: bool = True
    sector_erase_s: float = 0.045
    block_erase_s: float = 0.150
    page_program_s: float = 0.0007
    read_bytes_per_s: float = 10e6
    slow: float = 1.0  # fault injection: multiply everything

    def _scale(self, seconds: float) -> float:
        return seconds * self.slow if self.enabled else 0.0

    def erase(self, sectors: int, blocks: int) -> float:
        return self._scale(sectors * self.sector_erase_s + blocks * self.block_erase_s)

    def program(self, nbytes: int) -> float:
        return self._scale(-(-nbytes // PAGE) * self.page_program_s)

    def read(self, nbytes: int) -> float:
        return self._scale(nbytes / self.read_bytes_per_s)


def erase_plan(offset: int, size: int) -> list[tuple[int, int]]:
    """Split ``[offset, offset+size)`` (sector-rounded) into (address, length) erases.

    Uses 64 KB block erases where a whole aligned block is covered, sector erases
    elsewhere: what both the ROM's and the stub's erase routines do.
    """
    start = offset - offset % SECTOR
    end = -(-(offset + size) // SECTOR) * SECTOR
    plan: list[tuple[int, int]] = []
    addr = start
    while addr < end:
        if addr % BLOCK == 0 and end - addr >= BLOCK:
            plan.append((addr, BLOCK))
            addr += BLOCK
        else:
            plan.append((addr, SECTOR))
            addr += SECTOR
    return plan


class Flash:
    """The flash chip's contents, erased (all 0xFF) when the board is made."""

    def __init__(self, size: int, timing: FlashTiming) -> None:
        if size <= 0 or size % BLOCK:
            raise ValueError(f"flash size must be a positive multiple of 64 KB, got {size}")
        self.size = size
        self.timing = timing
        self.data = bytearray(b"\xff") * size

    def check_range(self, offset: int, length: int) -> bool:
        return offset >= 0 and length >= 0 and offset + length <= self.size

    def erase(self, offset: int, size: int) -> float:
        """Erase the sectors covering the range; return how long the chip takes."""
        sectors = blocks = 0
        for addr, length in erase_plan(offset, size):
            end = min(addr + length, self.size)
            self.data[addr:end] = b"\xff" * (end - addr)
            if length == BLOCK:
                blocks += 1
            else:
                sectors += 1
        return self.timing.erase(sectors, blocks)

    def erase_all(self) -> float:
        self.data[:] = b"\xff" * self.size
        return self.timing.erase(0, self.size // BLOCK)

    def program(self, offset: int, data: bytes) -> float:
        """Program bytes: bits can only go from 1 to 0. Returns the program time."""
        end = offset + len(data)
        old = self.data[offset:end]
        if old.count(0xFF) == len(old):
            self.data[offset:end] = data
        else:
            merged = int.from_bytes(old, "little") & int.from_bytes(data, "little")
            self.data[offset:end] = merged.to_bytes(len(data), "little")
        return self.timing.program(len(data))

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def md5(self, offset: int, length: int) -> bytes:
        return hashlib.md5(memoryview(self.data)[offset : offset + length]).digest()

    def dump(self, path: Path) -> None:
        """Write the whole image atomically, so a reader never sees half a dump."""
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(self.data)
        os.replace(tmp, path)
