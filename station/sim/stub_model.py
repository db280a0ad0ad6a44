"""When the flasher stub erases and programs: the two stubs esptool 5.6 can upload.

esptool 5.6 uploads esp-flasher-stub v1.4.1 by default (``targets/stub_flasher/2``,
``StubFlasher.STUB_SUBDIRS = ["2", "1"]`` in loader.py); the legacy esptool stub
(``1/``) only with ``ESPTOOL_STUB_VERSION=1``. esptool sends both the same commands
(loader.py has no stub-version branch besides the JSON it reads); the stubs differ in
how they schedule the flash, which is what a timing model must get right:

* **flasher** (esp-flasher-stub ``src/command_handler.c``): FLASH_(DEFL_)BEGIN plans
  the sector-aligned region and starts the first erase *without waiting*. Each block
  is ACKed on receipt; while inflating it the stub starts the next erase
  opportunistically (only if the chip is idle: ``s_conditional_erase_next``), and
  before writing it waits until the region up to the end of the data is erased
  (``s_ensure_flash_erased_to``). Every erase step is conditional: until the first
  non-blank sector of this write it reads the sector and skips the erase when it is
  all 0xFF; from the first dirty sector on it erases unconditionally (64 KB blocks
  where aligned, else 4 KB sectors). A factory-blank chip pays no erases at all.
* **legacy** (esptool's own stub): before each block's write it erases, blocking,
  the sectors or 64 KB blocks the write reaches, blank or not.

Both model the stub's CPU as one resource ("done at" time) and, for the flasher
stub, the flash chip as a second one that erases in the background. Inflating costs
no time here (the host's zlib has done the hard part; a 240 MHz core inflates far
faster than any UART delivers).
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Literal, Protocol

from esptool.loader import StubFlasher

from .flash import BLOCK, SECTOR, Flash, erase_plan

StubModel = Literal["flasher", "legacy"]
STUB_MODELS: tuple[StubModel, ...] = ("flasher", "legacy")


class StubWriter(Protocol):
    """One write session of the stub: erases and programs, returning CPU-done times."""

    def begin(self, now: float) -> float: ...

    def write(self, now: float, addr: int, data: bytes, compressed: bool) -> float: ...


def _region(offset: int, size: int) -> tuple[int, int]:
    return offset - offset % SECTOR, -(-(offset + size) // SECTOR) * SECTOR


class LegacyWriter:
    """esptool's legacy stub: blocking erase-ahead of each block's write."""

    def __init__(self, flash: Flash, offset: int, size: int) -> None:
        self.flash = flash
        self.erased_until, self.end = _region(offset, size)

    def begin(self, now: float) -> float:
        return now

    def write(self, now: float, addr: int, data: bytes, compressed: bool) -> float:
        write_end = addr + len(data)
        seconds = 0.0
        region_end = max(self.end, -(-write_end // SECTOR) * SECTOR)
        for start, length in erase_plan(self.erased_until, region_end - self.erased_until):
            if start >= write_end:
                break
            seconds += self.flash.erase(start, length)
            self.erased_until = start + length
        return now + seconds + self.flash.program(addr, data)


class FlasherWriter:
    """esp-flasher-stub 1.4.1: background, conditional (skip-if-blank) erases."""

    def __init__(self, flash: Flash, offset: int, size: int) -> None:
        self.flash = flash
        self.next_erase, self.end = _region(offset, size)
        self.dirty_seen = False  # reset by every FLASH_BEGIN, as in the stub
        self.chip_busy_until = 0.0  # the flash chip erasing in the background
        self.erased_bytes = 0  # for tests and logs
        self.skipped_bytes = 0

    def begin(self, now: float) -> float:
        return self._conditional_erase_next(now)

    def write(self, now: float, addr: int, data: bytes, compressed: bool) -> float:
        t = self._conditional_erase_next(now) if compressed else now  # while inflating
        t = self._ensure_erased_to(t, addr + len(data))
        t = max(t, self.chip_busy_until) + self.flash.program(addr, data)
        self.chip_busy_until = t
        return t

    def _ensure_erased_to(self, t: float, target: int) -> float:
        while self.next_erase < min(target, self.end):
            t = max(t, self.chip_busy_until)  # the stub polls until the chip is idle
            t = self._conditional_erase_next(t)
        return t

    def _conditional_erase_next(self, t: float) -> float:
        """One step: skip a blank sector (after reading it) or start one erase."""
        if self.next_erase >= self.end or self.chip_busy_until > t:
            return t  # nothing left, or the chip is still busy: try again later
        if not self.dirty_seen:
            sector = self.flash.read(self.next_erase, SECTOR)
            t += self.flash.timing.read(SECTOR)
            if sector.count(0xFF) == len(sector):
                self.next_erase += SECTOR
                self.skipped_bytes += SECTOR
                return t
            self.dirty_seen = True  # from here on erase everything without reading
        remaining = self.end - self.next_erase
        length = BLOCK if remaining >= BLOCK and self.next_erase % BLOCK == 0 else SECTOR
        self.chip_busy_until = t + self.flash.erase(self.next_erase, length)
        self.next_erase += length
        self.erased_bytes += length
        return t


def stub_writer(model: StubModel, flash: Flash, offset: int, size: int) -> StubWriter:
    if model == "legacy":
        return LegacyWriter(flash, offset, size)
    return FlasherWriter(flash, offset, size)


def parse_stub_model(text: str) -> StubModel:
    for model in STUB_MODELS:
        if text == model:
            return model
    raise ValueError(f"unknown stub model {text!r}; choose one of {', '.join(STUB_MODELS)}")


# esptool's stub directories: "2" is esp-flasher-stub, "1" the legacy stub.
_STUB_DIRS: dict[str, StubModel] = {"2": "flasher", "1": "legacy"}


@cache
def _known_stubs() -> dict[tuple[int, bytes], StubModel]:
    """(text_start, text) of every stub JSON esptool ships, and which stub it is."""
    known: dict[tuple[int, bytes], StubModel] = {}
    for subdir, model in _STUB_DIRS.items():
        for path in sorted(Path(StubFlasher.STUB_DIR, subdir).glob("*.json")):
            stub = json.loads(path.read_text())
            known[(stub["text_start"], base64.b64decode(stub["text"]))] = model
    return known


def identify_stub(segments: dict[int, bytes]) -> StubModel | None:
    """Which of esptool's stubs was uploaded (RAM segments by address), if either."""
    known = _known_stubs()
    for start, data in segments.items():
        model = known.get((start, bytes(data)))
        if model is not None:
            return model
    return None
