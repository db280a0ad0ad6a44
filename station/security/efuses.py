"""A board's eFuses through espefuse's library, on the loader the station already holds.

`espefuse.init_commands(esp=<connected loader>)` reads every eFuse block over the open
session (no second connection, no reset), and a batch (`use_batch_mode` ... `burn_all`)
programs each block once, the key blocks first and BLOCK0 last, with the fields that
end communication or protect others (WR_DIS, RD_DIS, the crypt counter, SECURE_BOOT_EN,
ENABLE_SECURITY_DOWNLOAD) in a second, postponed program of BLOCK0 (`postpone`, which
the library leaves off and the CLI turns on). Pitfalls from espefuse's code: without
`do_not_confirm=True` a burn waits on `input()`; burning ENABLE_SECURITY_DOWNLOAD from
the ROM ends in `sys.exit(0)` after a reconnect, which is why the station burns over the
stub (the ROM checks its eFuses after each of its own commands; the stub does not, so
the connection stays until the reset).

Everything here blocks: it runs on the board session's own thread.
"""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from esptool.util import FatalError, UnsupportedCommandError

from station.chips import normalise
from station.security.efuse_defs import parse_once_for
from station.security.efuse_link import EfuseLink
from station.security.plan import Burn, ChipPlan, Step

log = logging.getLogger("station.security")
XTS_PURPOSES = ("XTS_AES_128_KEY", "XTS_AES_256_KEY_1", "XTS_AES_256_KEY_2")
DIGEST_PURPOSES = ("SECURE_BOOT_DIGEST0", "SECURE_BOOT_DIGEST1", "SECURE_BOOT_DIGEST2")


def _commands(esp: Any, batch: bool) -> Any:
    """espefuse's commands on the session's loader, through an `EfuseLink` (the same
    register accesses in fewer round trips: efuse_link.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import espefuse  # type: ignore[import-untyped]
    parse_once_for(normalise(esp.CHIP_NAME))
    link = EfuseLink(esp)
    cmds = espefuse.init_commands(esp=link, do_not_confirm=True, batch_mode=batch)
    cmds.efuses.postpone = True  # protections and mode switches last, as the CLI does
    link.keep(cmds.efuses)
    return cmds


def _link(cmds: Any) -> EfuseLink:
    link: EfuseLink = cmds.esp
    return link


class Efuses:
    """espefuse's view of one board's eFuses, read once per loader and kept current.

    `init_commands` reads every block (about a hundred register round trips), and each
    `burn_all` ends by reading them all again; a board's survey, its key batch, the read
    after its images and its three later batches share one view instead of reading the
    chip six more times (benchmarks/security.py measured it). A new loader (a retry's
    new connection) or a failed batch starts a fresh one: the chip is the truth."""

    def __init__(self) -> None:
        self._esp: Any = None
        self._cmds: Any = None

    def __repr__(self) -> str:
        return f"Efuses({'read' if self._cmds is not None else 'unread'})"

    def commands(self, esp: Any, batch: bool) -> Any:
        if self._cmds is None or self._esp is not esp:
            self._cmds, self._esp = _commands(esp, batch=False), esp
        # one batch at a time on a board: armed afresh (a batch with nothing to burn
        # never calls burn_all, which would leave the count raised)
        self._cmds.efuses.batch_mode_cnt = 1 if batch else 0
        return self._cmds

    def forget(self) -> None:
        self._esp = self._cmds = None


@dataclass
class KeyBlock:
    """A key block as read: its name, purpose, whether software can still read it."""

    name: str  # BLOCK_KEY0 ... (ESP32: BLOCK1 / BLOCK2)
    purpose: str  # espefuse's purpose name ("USER" when unset; ESP32: the block's alias)
    readable: bool
    writeable: bool
    data: bytes  # as espefuse reads it (zeros when read-protected)

    @property
    def used(self) -> bool:
        return self.purpose not in ("USER", "") or any(self.data) or not self.readable


@dataclass
class ChipState:
    """What the board's eFuses say now: the truth the sequence resumes from."""

    chip: str
    revision: int
    values: dict[str, int] = field(default_factory=dict)
    write_protected: set[str] = field(default_factory=set)
    keys: list[KeyBlock] = field(default_factory=list)

    def key_blocks(self, purposes: tuple[str, ...]) -> list[KeyBlock]:
        return [k for k in self.keys if k.purpose in purposes]

    def fe_key(self) -> list[KeyBlock]:
        """Blocks holding a flash-encryption key (or the start of one)."""
        if self.chip == "esp32":
            return [k for k in self.keys if k.name == "BLOCK1" and (any(k.data)
                                                                    or not k.readable)]
        return self.key_blocks(XTS_PURPOSES)

    def half_burned(self) -> list[KeyBlock]:
        """Key blocks with bits but no purpose, still readable: a key whose BLOCK0 part
        (purpose, protection) never came (the sequence checks whose it is)."""
        return [k for k in self.keys if k.name.startswith("BLOCK_KEY") and k.purpose == "USER"
                and k.readable and any(k.data)]

    def digests(self) -> list[bytes]:
        if self.chip == "esp32":
            return [k.data for k in self.keys if k.name == "BLOCK2" and any(k.data)]
        return [k.data for k in self.key_blocks(DIGEST_PURPOSES)]

    def free_key_block(self, skip_last: bool = False) -> str | None:
        """The first unused key block (BLOCK_KEY5 cannot hold XTS keys: `skip_last`)."""
        blocks = [k for k in self.keys if k.name.startswith("BLOCK_KEY")]
        if skip_last:
            blocks = [k for k in blocks if k.name != "BLOCK_KEY5"]
        return next((k.name for k in blocks if not k.used), None)

    def missing(self, step: Step) -> list[Burn]:
        """The burns of `step` the chip does not show yet (keys and digests excluded:
        their blocks are judged by the sequence, which knows whose they are)."""
        out = []
        for burn in step.burns:
            short = burn.kind == "efuse" and \
                self.values.get(burn.name, 0) & burn.value != burn.value
            if short or burn.kind == "write_protect" and burn.name not in self.write_protected:
                out.append(burn)
        return out

    def foreign(self, plan: ChipPlan) -> list[str]:
        """eFuses of the plan burned to values the plan does not ask for (another
        line's work), by name."""
        out = []
        for step in plan.steps:
            for name, want in step.efuse_values().items():
                have = self.values.get(name, 0)
                if have & ~want:
                    out.append(f"{name} = {have:#x}")
        return out


def read_state(esp: Any, plan: ChipPlan, view: Efuses | None = None) -> ChipState:
    """Read the board's eFuses (espefuse over the session's loader; `view`: as last read
    or burned on this loader)."""
    cmds = view.commands(esp, batch=False) if view is not None else _commands(esp, False)
    efuses = cmds.efuses
    # asked once per loader (the link keeps it): the silicon does not change
    state = ChipState(chip=plan.chip, revision=_link(cmds).get_chip_revision())
    names = {b.name for s in plan.steps for b in s.burns if b.kind in ("efuse",
                                                                        "write_protect")}
    names.update(("SECURE_BOOT_EN", "ABS_DONE_1", "ENABLE_SECURITY_DOWNLOAD",
                  "SPI_BOOT_CRYPT_CNT", "FLASH_CRYPT_CNT"))
    for name in names:
        try:
            efuse = efuses[name]
        except KeyError:
            continue
        value = efuse.get_raw()
        state.values[name] = int(value) if not isinstance(value, bytes) else 0
        if not efuse.is_writeable():
            state.write_protected.add(name)
    if plan.chip == "esp32":
        for name, alias in (("BLOCK1", "flash_encryption"), ("BLOCK2", "secure_boot_v2")):
            block = efuses[name]
            state.keys.append(KeyBlock(name, alias, block.is_readable(),
                                       block.is_writeable(), bytes(block.get_raw())))
    else:
        for i in range(6):
            try:
                block, purpose = efuses[f"BLOCK_KEY{i}"], efuses[f"KEY_PURPOSE_{i}"]
            except KeyError:
                break
            state.keys.append(KeyBlock(f"BLOCK_KEY{i}", str(purpose.get()),
                                       block.is_readable(), block.is_writeable(),
                                       bytes(block.get_raw())))
    return state


def key_file_bytes(block: KeyBlock, chip: str) -> bytes:
    """A readable key block as the key file espsecure takes: espefuse reverses XTS keys
    and the ESP32 flash-encryption key before burning, and reads them back in the
    block's order (espefuse `need_reverse`)."""
    return block.data[::-1] if chip == "esp32" else block.data


def burn(esp: Any, plan: ChipPlan, step: Step, state: ChipState, *, key: bytes | None = None,
         signing_key_pem: bytes | None = None, resume_key_blocks: Sequence[str] = (),
         view: Efuses | None = None) -> list[str]:
    """Burn what `step` still misses, in one batch; returns what was burned, by name.

    `resume_key_blocks`: key blocks already holding this station's key (a board pulled
    between the key block and BLOCK0): only their purpose and protections are burned.
    """
    cmds = _commands(esp, batch=True) if view is None else view.commands(esp, batch=True)
    try:
        done = _burn(esp, plan, step, state, cmds, key, signing_key_pem, resume_key_blocks)
    except BaseException:
        _link(cmds).flush_quietly()  # what espefuse wrote before it stopped goes out
        if view is not None:
            view.forget()  # half-queued or half-burned: read the chip afresh next time
        raise
    _link(cmds).flush()
    return done


def _burn(esp: Any, plan: ChipPlan, step: Step, state: ChipState, cmds: Any,
          key: bytes | None, signing_key_pem: bytes | None,
          resume_key_blocks: Sequence[str]) -> list[str]:
    done: list[str] = []
    for item in step.burns:
        if item.kind == "key" and resume_key_blocks:
            _protect_key(cmds, plan, resume_key_blocks)
            done.append(f"{'+'.join(resume_key_blocks)} protected as {item.name}")
        elif item.kind == "key":
            assert key is not None
            if plan.chip == "esp32":
                cmds.burn_key(["flash_encryption"], [io.BytesIO(key)])
                done.append(f"BLOCK1 ({item.name})")
            else:
                block = state.free_key_block(skip_last=True)
                if block is None:
                    raise FatalError("no free key block for the flash-encryption key")
                cmds.burn_key([block], [io.BytesIO(key)], [item.name])
                done.append(f"{block} ({item.name})")
        elif item.kind == "digest":
            assert signing_key_pem is not None
            if state.digests():
                continue  # ours: the sequence checked it before calling
            if plan.chip == "esp32":
                cmds.burn_key_digest(io.BytesIO(signing_key_pem))
                done.append("BLOCK2 (secure_boot_v2 digest)")
            else:
                block = state.free_key_block()
                if block is None:
                    raise FatalError("no free key block for the secure boot digest")
                cmds.burn_key_digest([block], [io.BytesIO(signing_key_pem)], [item.name])
                done.append(f"{block} ({item.name})")
    values = {b.name: b.value for b in state.missing(step) if b.kind == "efuse"}
    if values:
        cmds.burn_efuse({k: str(v) for k, v in values.items()})
        done += list(values)
    protect = [b.name for b in state.missing(step) if b.kind == "write_protect"]
    if protect:
        cmds.write_protect_efuse(protect)
        done += [f"write-protect {n}" for n in protect]
    if done:
        _burn_all(cmds, esp, done)
    return done


class _Latched(FatalError):
    """The ROM refused a read after the last program: secure download mode is on."""


def _burn_all(cmds: Any, esp: Any, done: list[str]) -> None:
    """burn_all, without espefuse's way out of secure download mode: on the ROM (a chip
    whose stub esptool disables, e.g. the C3 with secure boot) the READ command after
    the postponed BLOCK0 program latches the mode, the next register read is refused,
    and espefuse would reconnect on the port by its name and `sys.exit(0)`. Here the
    refusal ends the batch, and GET_SECURITY_INFO (which the mode allows) proves it."""
    def no_reconnect(_esp: Any) -> Any:
        refused = sys.exc_info()[1]  # what the ROM answered the read after the burn
        if isinstance(refused, UnsupportedCommandError):  # "not supported in SDM"
            raise _Latched(str(refused))
        raise FatalError(f"the chip stopped answering after the burn ({refused})")

    cmds.efuses.reconnect_chip = no_reconnect
    try:
        cmds.burn_all(check_batch_mode=True)
    except _Latched:
        done.append("(secure download mode on: the ROM gives no eFuses any more)")
    except SystemExit as e:  # espefuse's other exits must never end the station
        raise FatalError(f"espefuse stopped ({e.code})") from None


def _protect_key(cmds: Any, plan: ChipPlan, blocks: Sequence[str]) -> None:
    """Finish a key whose block is burned but whose BLOCK0 part is not."""
    if plan.chip == "esp32":
        cmds.read_protect_efuse(["flash_encryption"])
        cmds.write_protect_efuse(["flash_encryption"])
        return
    assert plan.key_purpose is not None
    purposes = ["XTS_AES_256_KEY_1", "XTS_AES_256_KEY_2"] \
        if plan.key_purpose == "XTS_AES_256_KEY" else [plan.key_purpose]
    numbers = {row[0]: row[1] for row in cmds.efuses["KEY_PURPOSE_0"].KEY_PURPOSES}
    pairs = {f"KEY_PURPOSE_{b[-1]}": str(numbers[p])
             for b, p in zip(blocks, purposes, strict=False)}
    cmds.burn_efuse(pairs)
    # espefuse read-protects a key block only once its purpose reads as one that
    # needs it (`need_rd_protect` of the *burned* purpose): the purpose goes first
    cmds.burn_all(check_batch_mode=True)
    cmds.use_batch_mode()
    cmds.read_protect_efuse(list(blocks))
    cmds.write_protect_efuse([*blocks, *pairs])


def security_flags(esp: Any) -> int:
    """GET_SECURITY_INFO's flags (0 on the ESP32, whose ROM lacks the command)."""
    try:
        return int(esp.get_security_info()["flags"])
    except FatalError:
        return 0
