"""The Digital Signature peripheral's HMAC key in a board's eFuses (`[credentials] ds`).

One key block, espefuse's way (`burn_key BLOCK_KEYn key HMAC_DOWN_DIGITAL_SIGNATURE`:
the purpose needs read protection, which espefuse adds; the block is write-protected
too), over the open session's loader like the other burns here (efuses.py). Reading the
block first is what makes it safe to run again: a block already holding this purpose is
judged by the caller against its journal; a block used for anything else is refused,
named, untouched. esp-secure-cert-tool's own burner (`efuse_helper.configure_efuse_key_block`)
shells out to `espefuse.py -p PORT`, which cannot share the port the station holds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from station.security.efuses import _burn_all, _commands

DS_PURPOSE = "HMAC_DOWN_DIGITAL_SIGNATURE"


@dataclass(frozen=True)
class DsBlock:
    """One key block as read: name, purpose (espefuse's name), readable, any bit set."""

    name: str
    purpose: str
    readable: bool
    blank: bool

    @property
    def free(self) -> bool:
        return self.purpose == "USER" and self.readable and self.blank

    @property
    def holds_ds_key(self) -> bool:
        return self.purpose == DS_PURPOSE and not self.readable


def read_ds_block(esp: Any, block: str) -> DsBlock:
    """The key block as espefuse reads it now (the chip is the truth)."""
    efuses = _commands(esp, batch=False).efuses
    n = block.removeprefix("BLOCK_KEY")
    data = efuses[block]
    return DsBlock(name=block, purpose=str(efuses[f"KEY_PURPOSE_{n}"].get()),
                   readable=bool(data.is_readable()), blank=not any(bytes(data.get_raw())))


def burn_ds_key(esp: Any, block: str, key: bytes) -> list[str]:
    """Burn `key` into `block` with the DS purpose, read- and write-protected, in one
    batch; returns what was burned."""
    if len(key) != 32:
        raise ValueError("an HMAC key is 32 bytes")
    cmds = _commands(esp, batch=True)
    cmds.burn_key([block], [io.BytesIO(key)], [DS_PURPOSE])
    done = [f"{block} ({DS_PURPOSE}, read-protected)"]
    _burn_all(cmds, esp, done)
    return done
