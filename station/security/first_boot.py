"""key = "device": what this station's journal says of a board's plaintext and first boot.

The bootloader makes the key and encrypts the flash on the board's first boot, and any
reset that wakes the chip from flash starts it: the restarted station's own connect does
(esptool's first reset attempt misses download mode on a devkit with a slow EN). So a
station stopped once the plaintext was on the flash finds, on its next connect, a chip
that encrypted itself. Whether that chip can be finished depends on one journal line:

- ("plaintext", "after"), durable right after the plaintext's verify, with its MD5s by
  offset: everything the first boot encrypts was whole. Such a board is not written again
  (it cannot be: plaintext no longer reads right) and is not rework: its boot check
  (release mode, the app's project/version/marker, on DS lines esp_secure_cert_mgr's
  lines) is the proof; it fails the board "needs rework" with the boot's reason.
- No such line (stopped before the verify, or while writing): the plaintext may be
  incomplete, so an encrypted chip "needs rework" (board.py `_decide_device`); the
  ("plaintext", "before") line, journaled before the first write, says it was ours.
- A chip still blank (no key, no counter) with that line: the stop came before any
  first boot, and the restart's connect did not start one (its resets enter download
  mode first and never cut a pass short: station/flash/first_boot_guard.py). If the
  flash still holds that plaintext (the line's MD5s, read back by the stub), nothing is
  written again: the station's own reset after it starts the first boot (`still_plaintext`).

A `first_boot` line is written after that verify too, so it counts as well (journals
from before the plaintext line existed).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from station.errors import SecurityError
from station.parts import Region
from station.security.images import SecuredFirmware

PLAINTEXT = ("plaintext", "after")
"""The journal line: the plaintext written for the first boot is verified on the flash."""
WRITING = ("plaintext", "before")
"""The journal line before the first plaintext write: from here on the board is this
station's. Once its bootloader is on the flash, any wake from flash runs its first boot
(a stop's port close is one on some circuits), so a board found encrypted after a stop
with this line and no PLAINTEXT line holds this station's unverified plaintext: it needs
rework, named so; without the line it was taken for "locked by another line"."""
Journal = Sequence[dict[str, Any]]


def md5s(written: Sequence[Region], nvs_keys_at: tuple[int, int] | None) -> str:
    """The detail of the plaintext line: {offset: [size, MD5]} of every region written but
    the nvs_keys partition (its plaintext is key material: not even its hash is kept)."""
    skip = nvs_keys_at[0] if nvs_keys_at else None
    return json.dumps({str(r.offset): [len(r.data), r.md5] for r in written
                       if r.offset != skip}, sort_keys=True)


def verified(past: Journal) -> bool:
    """This station verified the board's plaintext (a line after the verify)."""
    return any((e["step"], e["phase"]) == PLAINTEXT or e["step"] == "first_boot"
               for e in past)


def journaled(past: Journal) -> bool:
    """The first boot's "before" line is in the journal already."""
    return any((e["step"], e["phase"]) == ("first_boot", "before") for e in past)


def same_firmware(mac: str, past: Journal, firmware: SecuredFirmware) -> None:
    """The last verified plaintext is this line's firmware (its MD5s at the firmware's
    offsets; the board's own data differs per board); else the board is refused, as a
    locked board cannot be reflashed in plaintext."""
    lines = [e for e in past if (e["step"], e["phase"]) == PLAINTEXT]
    if not lines:
        return  # a journal from before the line: the boot check's version decides
    on_flash: dict[str, list[Any]] = json.loads(lines[-1]["detail"] or "{}")
    skip = firmware.nvs_keys_at[0] if firmware.nvs_keys_at else None
    for region in firmware.regions:
        if region.offset != skip and on_flash.get(str(region.offset)) != \
                [len(region.data), region.md5]:
            raise SecurityError(f"{mac}: its first boot encrypted other firmware than this "
                                f"line's ({region.name} at {region.offset:#x} differs); a "
                                "locked board cannot be reflashed in plaintext")


async def still_plaintext(past: Journal, firmware: SecuredFirmware,
                          md5_at: Callable[[int, int], Awaitable[str]]) -> bool:
    """The plaintext this station verified last, of this line's firmware, is on the flash
    as it was verified (the journal's MD5s by offset, board's own data included)."""
    lines = [e for e in past if (e["step"], e["phase"]) == PLAINTEXT]
    if not lines:
        return False
    try:
        same_firmware("", past, firmware)
    except SecurityError:
        return False  # the line changed firmware: a blank chip just takes the new one
    on_flash: dict[str, list[Any]] = json.loads(lines[-1]["detail"] or "{}")
    for offset, (size, md5) in on_flash.items():
        if await md5_at(int(offset), int(size)) != md5:
            return False
    return bool(on_flash)
