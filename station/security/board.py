"""One board's security sequence: survey, key, images, counter, secure boot, lock-down.

The worker drives it through `parts.BoardSecurity` / `parts.BoardLock` and knows nothing
of eFuses. Why it looks like this:

- **The chip is the truth.** Every attempt starts by reading the eFuses (espefuse over
  the open session); the ledger's journal only says whose they are. A board whose
  eFuses show another line's work (a key, a digest, a counter this station never
  journaled for its MAC) fails at once, untouched: "locked by another line".
- **Journaled before and after.** Each batch is a `SecurityStep` event before it starts
  and after it ends (or fails), durable in the ledger before the burn begins.
- **The key's window is made harmless.** The host key lives only in this process, from
  its burn until the images written with it are verified (their ciphertext MD5s are
  journaled); only then is the crypt counter set. A board pulled in that window and
  plugged again while the station runs gets the same key back (by MAC); a board whose
  key block was burned but not yet protected is read back and matched by fingerprint; a
  board whose images were verified resumes from the journal's MD5s, checked on the
  flash. Anything else with this station's key burned "needs rework": a different key
  is never burned over a started sequence.
- Lock-down is last and one batch; secure download mode is in its postponed part.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from station import chips
from station.errors import SecurityError
from station.parts import BoardIdentity, BoardSession, Region, SecurityJournal
from station.security import efuses as fuses
from station.security import first_boot, nvskeys
from station.security.escrow import write_escrow
from station.security.images import SecuredFirmware, encrypted_region, key_fingerprint
from station.security.plan import SB_REVISION_ESP32, STEPS, ChipPlan, Step
from station.security.setup import StationSecurity

log = logging.getLogger("station.security")

History = Callable[[str], Awaitable[list[dict[str, Any]]]]
"""mac -> this station's journaled security steps for it, oldest first."""
CHIP_ENCRYPTS = True
"""Encrypted regions go as compressed plaintext with esptool's --encrypt (the chip
encrypts with its burned key) and are verified against the host's ciphertext MD5; see
docs/security.md for the measurement behind the choice."""


@dataclass
class Keys:
    """Host keys between their burn and the verify of the images written with them."""

    by_mac: dict[str, bytes] = field(default_factory=dict)
    nvs_by_mac: dict[str, bytes] = field(default_factory=dict)
    """NVS encryption keys (nvskeys.py), from the write of the board's nvs_keys partition
    until its boot check passed: a retry rewrites its credentials with the same keys."""

    def __repr__(self) -> str:  # never a key in a log or traceback
        return f"Keys({len(self.by_mac)} held, {len(self.nvs_by_mac)} NVS)"


FIRST_BOOT_DONE = "Flash encryption completed"
"""key = "device": the bootloader's line once it encrypted the flash (flash_encrypt.c);
it resets the chip, and the second boot runs the app."""
FIRST_BOOT_STARTED = "flash encryption key"  # "Generating new ..." / "Using pre-loaded ..."

CRASH_ENV = "STATION_TEST_CRASH_AFTER"
"""The registrar's test hook (identity's CRASH_ENV), for the security journal:
"security:<step>:<phase>" SIGKILLs the station right after that line is durable."""


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        log.critical("test hook: SIGKILL after %s", step)
        os.kill(os.getpid(), signal.SIGKILL)


def _md5(offset: int, size: int) -> Callable[[Any], str]:
    def md5(esp: Any) -> str:
        return str(esp.flash_md5sum(offset, size))
    return md5


class LineSecurity:
    """The station's security part: one per station, shared by every worker."""

    def __init__(self, security: StationSecurity, history: History,
                 escrow_dir: Path | None = None) -> None:
        self.security = security
        self.history = history
        self.keys = Keys()
        self.escrow_dir = escrow_dir  # certs_out: each board's folder gets its escrow

    async def survey(self, session: BoardSession, identity: BoardIdentity,
                     journal: SecurityJournal, thing: str = "") -> BoardLock:
        plan = self.security.plans[identity.chip]
        firmware = self.security.firmware[identity.chip]
        view = fuses.Efuses()  # read once here, kept current by this board's batches
        state = await session.on_loader("read eFuses",
                                        lambda esp: fuses.read_state(esp, plan, view))
        past = await self.history(identity.mac)
        lock = BoardLock(self, plan, firmware, identity, journal, state, past, view)
        lock.thing = thing or identity.mac
        await lock.decide(session)
        return lock


class BoardLock:
    """One board's sequence, decided from its eFuses and this station's journal."""

    def __init__(self, line: LineSecurity, plan: ChipPlan, firmware: SecuredFirmware,
                 identity: BoardIdentity, journal: SecurityJournal,
                 state: fuses.ChipState, past: list[dict[str, Any]],
                 view: fuses.Efuses | None = None) -> None:
        self.line, self.plan, self.firmware = line, plan, firmware
        self.view = view or fuses.Efuses()
        self.identity, self.journal, self.state, self.past = identity, journal, state, past
        self.key: bytes | None = None
        self.fingerprint: str | None = None
        self.resume_blocks: list[str] = []  # key block burned, BLOCK0 part not
        self.key_burned = False
        self.images_done = False  # verified earlier with this key (journal + flash MD5s)
        self.chip_only = False  # our key is burned but lost: the chip encrypts, unverified
        self.on_flash = False
        """key = "device": the plaintext this station verified was encrypted since by the
        chip's own first boot (a restart's connect woke it): nothing is written, the boot
        check is the proof (first_boot.py)."""
        self.thing = identity.mac  # the board's certs_out folder (escrow_public_key)
        self._nvs_keys: bytes | None = None

    # -- deciding where the board stands ---------------------------------------------

    def _fingerprints(self) -> set[str]:
        return {e["fingerprint"] for e in self.past if e["step"] == "key" and e["fingerprint"]}

    def _elsewhere(self, what: str) -> SecurityError:
        return SecurityError(f"{self.identity.mac}: {what}: locked by another line; "
                             "untouched")

    async def decide(self, session: BoardSession) -> None:
        state, mac = self.state, self.identity.mac
        if self.plan.chip == "esp32" and self.plan.digest_purpose and \
                state.revision < SB_REVISION_ESP32:
            raise SecurityError(f"{mac}: ESP32 revision v{state.revision // 100}."
                                f"{state.revision % 100} has no secure boot v2 (needs v3.0)"
                                "; untouched")
        foreign = state.foreign(self.plan)
        if foreign:
            raise self._elsewhere(", ".join(foreign))
        digests = state.digests()
        if digests and self.firmware.digest and any(
                self.firmware.digest not in (d.hex(), d[::-1].hex()) for d in digests):
            raise self._elsewhere("a different secure boot digest is burned")
        ours = self._fingerprints()
        blocks = state.fe_key()
        if self.device:
            await self._decide_device(blocks, session)
            return
        if self.plan.step("key") is None:
            return
        for half in state.half_burned():  # pulled between its block and BLOCK0
            key = fuses.key_file_bytes(half, self.plan.chip)
            if key_fingerprint(key) in ours and not blocks:
                self._use(key)
                self.key_burned, self.resume_blocks = True, [half.name]
                return
        if not blocks:
            if state.values.get(self.plan.counter or "", 0) or digests \
                    or state.values.get("SECURE_BOOT_EN") or state.values.get("ABS_DONE_1"):
                raise self._elsewhere("security eFuses burned without a flash-encryption key")
            key = os.urandom(64 if self.plan.key_purpose == "XTS_AES_256_KEY" else 32)
            self._use(key)
            return
        self.key_burned = True
        if all(b.readable for b in blocks):  # burned, not yet protected: read it back
            key = b"".join(fuses.key_file_bytes(b, self.plan.chip) for b in blocks)
            if key_fingerprint(key) not in ours:
                raise self._elsewhere(f"an unprotected key in {blocks[0].name} that this "
                                      "station did not burn")
            self._use(key)
            self.resume_blocks = [b.name for b in blocks]
            return
        if not ours:
            raise self._elsewhere(f"a flash-encryption key is burned ({blocks[0].name} "
                                  f"{blocks[0].purpose})")
        held = self.line.keys.by_mac.get(mac)
        if held is not None and key_fingerprint(held) in ours:
            self._use(held)
            return
        self.fingerprint = next(e["fingerprint"] for e in reversed(self.past)
                                if e["step"] == "key" and e["fingerprint"])
        if await self._images_on_flash(session):
            self.images_done = True
            return
        if self._chip_can_encrypt():
            # the key died with the last run, but the chip can still encrypt with it
            # (esptool's --encrypt): the boot check is then the proof, not an MD5
            self.chip_only = True
            log.warning("%s: the station's key for this board was lost with the last stop; "
                        "the chip encrypts its images with its own key", mac)
            return
        raise SecurityError(f"{mac}: the flash-encryption key this station burned (fingerprint"
                            f" {sorted(ours)[-1]}) is read-protected and was lost with the "
                            "last stop before the images were written with it; the board "
                            "cannot be finished", rework=True)

    @property
    def device(self) -> bool:
        """key = "device": the bootloader makes the key and encrypts on first boot."""
        return self.plan.mode != "off" and self.plan.step("key") is None

    async def _decide_device(self, blocks: list[fuses.KeyBlock], session: BoardSession) -> None:
        """Only a blank chip can take plaintext for its own first boot: one with a key
        or a counter was encrypted by a first boot already. Ours, whose plaintext this
        station verified (journaled), encrypted it on a boot while or after the station
        stopped: nothing is written, the boot check is the proof. Ours without that line
        (a DS key burned, the plaintext perhaps incomplete) cannot take plaintext any
        more: needs rework. Else another line's."""
        counter = self.state.values.get(self.plan.counter or "", 0)
        if not blocks and not counter:  # blank: its verified plaintext may be there still
            self.on_flash = await first_boot.still_plaintext(
                self.past, self.firmware, lambda at, size: session.on_loader(
                    "read back the plaintext", _md5(at, size)))
            if self.on_flash:
                log.info("%s: the plaintext this station verified is on the flash still; "
                         "nothing is written, its first boot comes next", self.identity.mac)
            return
        what = f"a flash-encryption key in {blocks[0].name}" if blocks else \
            f"{self.plan.counter} = {counter:#x}"
        if first_boot.verified(self.past) and not any(b.readable for b in blocks):
            first_boot.same_firmware(self.identity.mac, self.past, self.firmware)
            self.on_flash = True
            log.warning("%s: %s: the chip encrypted the plaintext this station verified on "
                        "a boot after the station's last stop; nothing is written, its boot "
                        "check decides", self.identity.mac, what)
            return
        if self.past:
            raise SecurityError(f"{self.identity.mac}: {what}: its first boot encrypted (or "
                                "began encrypting) the flash before this station verified "
                                "the plaintext it wrote; plaintext can no longer be written "
                                "to it", rework=True)
        raise self._elsewhere(what)

    def _use(self, key: bytes) -> None:
        self.key = key
        self.fingerprint = key_fingerprint(key)
        self.line.keys.by_mac[self.identity.mac] = key

    async def _images_on_flash(self, session: BoardSession) -> bool:
        """The journal's verified ciphertext MD5s, checked against the flash."""
        verified = [e for e in self.past if e["step"] == "images" and e["phase"] == "after"]
        if not verified:
            return False
        md5s: dict[str, list[Any]] = json.loads(verified[-1]["detail"] or "{}")
        for offset, (size, md5) in md5s.items():
            if await session.on_loader("verify", _md5(int(offset), int(size))) != md5:
                return False
        return True

    # -- what the worker calls ---------------------------------------------------------

    def regions(self, regions: Sequence[Region], own: bool = False) -> list[Region]:
        """The plan's images as this board gets them: signed, encrypted with its key, and
        the board's nvs_keys partition; `own`: the board's own data partitions (its
        credentials), encrypted where flagged, nothing added. None on a board whose own
        first boot encrypted what it holds (`on_flash`)."""
        if self.on_flash:
            return []
        secured = {r.offset: r for r in self.firmware.regions}
        keys_at = self.firmware.nvs_keys_at
        out = []
        for region in regions:
            if keys_at is not None and region.offset == keys_at[0]:
                continue  # the board's own keys go there (below)
            r = secured.get(region.offset, region)
            if r.offset not in self.firmware.encrypted:
                out.append(r)
            elif self.key is not None or self.chip_only:
                plain = r.data + b"\xff" * (-len(r.data) % 16)
                cipher = None if self.key is None else self.firmware.encrypt_for(self.key, r)
                out.append(encrypted_region(r.name, r.offset, plain, cipher, CHIP_ENCRYPTS))
            elif not self.images_done:  # decide() never lets this happen
                raise SecurityError(f"{self.identity.mac}: no key for {r.name}", rework=True)
        if keys_at is not None and not own:
            out.extend(self._nvs_keys_region(*keys_at))
        return out

    @property
    def nvs_keys(self) -> bytes | None:
        return self._nvs_keys

    def _nvs_keys_region(self, offset: int, size: int) -> list[Region]:
        """The board's nvs_keys partition, flash-encrypted as the other encrypted
        partitions are (nvskeys.py); [] when it is on the flash already, verified."""
        mac = self.identity.mac
        held = self.line.keys.nvs_by_mac.get(mac)
        keys = held or nvskeys.fresh_keys()
        self._nvs_keys = self.line.keys.nvs_by_mac[mac] = keys
        plain = nvskeys.keys_region(keys, offset, size)
        if self.device:  # the bootloader encrypts it on the first boot (encrypt_partition)
            return [plain]
        if self.key is not None or self.chip_only:
            cipher = None if self.key is None else self.firmware.encrypt_for(self.key, plain)
            return [encrypted_region(plain.name, offset, plain.data, cipher, CHIP_ENCRYPTS)]
        if held is not None and self.images_done:
            return []  # written and verified with these keys (the journal's MD5)
        if self._manual_encrypt():  # the keys died with the last run: fresh ones
            log.warning("%s: the NVS keys written with the images were lost with the last "
                        "stop; the chip encrypts a fresh nvs_keys partition", mac)
            return [encrypted_region(plain.name, offset, plain.data, None, True)]
        raise SecurityError(f"{mac}: the NVS encryption keys on the board were lost with the "
                            "last stop and the chip no longer encrypts writes: its "
                            "credentials cannot be written readable", rework=True)

    def _manual_encrypt(self) -> bool:
        """esptool's --encrypt still works: DIS_DOWNLOAD_MANUAL_ENCRYPT (ESP32:
        DISABLE_DL_ENCRYPT) unburned, whatever the counter (esptool `write_flash`)."""
        values = self.state.values
        return not (values.get("DIS_DOWNLOAD_MANUAL_ENCRYPT") or
                    values.get("DISABLE_DL_ENCRYPT"))

    def _chip_can_encrypt(self) -> bool:
        """The chip may finish the images with its own key: manual encryption allowed
        and the counter unset (the boot check is then the proof of the key)."""
        return self._manual_encrypt() and not self.state.values.get(self.plan.counter or "", 0)

    def write_last(self, regions: Sequence[Region]) -> tuple[list[Region], list[Region]]:
        """key = "device": the bootloader goes last, after the board's own data. Once it
        is on the flash, any reset that wakes the chip with GPIO0 high boots it (esptool's
        first reset attempt does on a devkit with a slow EN: the station's next connect
        after a stop or a retry), and that first boot encrypts the flash for good, before
        the credentials are on it; a board stopped without its bootloader boots nothing
        and is finished on the next attempt."""
        if not self.device:
            return list(regions), []
        boot_at = chips.facts(self.plan.chip).bootloader_offset
        return ([r for r in regions if r.offset != boot_at],
                [r for r in regions if r.offset == boot_at])

    async def before_write(self, session: BoardSession) -> None:
        """Burn the key (or finish its protection) before anything is written with it;
        key = "device": journal the plaintext's start (first_boot.WRITING says why)."""
        if self.device and not self.on_flash:
            await self._journal(*first_boot.WRITING, "the plaintext its first boot encrypts")
            return
        step = self.plan.step("key")
        if step is None or (self.key_burned and not self.resume_blocks):
            return
        key, blocks, state = self.key, self.resume_blocks, self.state
        escrow = self.line.security.escrow_pem
        if escrow is not None and key is not None and not self.key_burned and \
                self.line.escrow_dir is not None:  # a fresh key: kept wrapped before its burn
            facts = {"mac": self.identity.mac, "chip": self.plan.chip,
                     "fingerprint": self.fingerprint, "purpose": self.plan.key_purpose}
            path = await asyncio.to_thread(write_escrow, self.line.escrow_dir, self.thing,
                                           facts, escrow, key)
            log.info("%s: the flash-encryption key is escrowed (wrapped) in %s",
                     self.identity.mac, path)

        def work(esp: Any) -> list[str]:
            return fuses.burn(esp, self.plan, step, state, key=key, resume_key_blocks=blocks,
                              view=self.view)
        await self._batch(session, step, work)
        self.key_burned = True

    async def verified(self, written: Sequence[Region]) -> None:
        """key = "device": the plaintext is on the flash and verified; from this line on,
        a board found encrypted by its own first boot is finished by its boot check."""
        if self.device and written:
            await self._journal(*first_boot.PLAINTEXT, first_boot.md5s(
                written, self.firmware.nvs_keys_at))

    async def after_verify(self, session: BoardSession, written: Sequence[Region]) -> None:
        """The images are verified: journal their MD5s, drop the key, burn the rest."""
        if self.plan.step("key") is not None and not self.images_done:
            md5s = {str(r.offset): [len(r.data), r.md5]
                    for r in written if r.offset in self.firmware.encrypted and r.md5}
            await self._journal("images", "after", json.dumps(md5s, sort_keys=True)
                                if not self.chip_only else "{}")
            self.images_done = True
        if self.device and not (self.on_flash and first_boot.journaled(self.past)):
            await self._journal("first_boot", "before", "plaintext verified; the bootloader "
                                "makes the key and encrypts on this boot")
        self.line.keys.by_mac.pop(self.identity.mac, None)
        self.key = None
        self.state = await session.on_loader(
            "read eFuses", lambda esp: fuses.read_state(esp, self.plan, self.view))
        pem = self.line.security.signing_key_pem
        for name in STEPS[1:]:
            step = self.plan.step(name)
            if step is None or not self._missing(step):
                continue
            await self._batch(session, step, self._burner(step, pem))

    def _burner(self, step: Step, pem: bytes | None) -> Callable[[Any], list[str]]:
        state = self.state

        def work(esp: Any) -> list[str]:
            return fuses.burn(esp, self.plan, step, state, signing_key_pem=pem, view=self.view)
        return work

    def _missing(self, step: Step) -> bool:
        if step.name == "secure_boot" and not self.state.digests():
            return True
        return bool(self.state.missing(step))

    def boot_complete(self, complete: Callable[[str], bool]) -> Callable[[str], bool]:
        """When the console read may stop. The app's own lines are not the end of this
        story: the app states its flash-encryption mode after them (ESP-IDF runs
        ``esp_flash_encryption_init_checks`` in its start-up, after the app description),
        so a read that stopped at the app's lines missed that line whenever the host was
        slower than the board (found under load in CI). Wait for what `boot_problem`
        wants, or for the board to start over; the boot timeout bounds the rest."""
        def told_all(text: str) -> bool:
            return complete(text) and (not self._unseen(text) or text.count("rst:0x") >= 2)

        def told(text: str) -> bool:
            if self.device and FIRST_BOOT_DONE in text:  # the second boot, as any boot
                return told_all(text.split(FIRST_BOOT_DONE, 1)[1])
            if self.device and FIRST_BOOT_STARTED in text:  # encrypting: wait, unless
                return text.count("rst:0x") >= 3  # it loops
            return told_all(text)
        return told

    def boot_story(self, text: str) -> str:
        return text.split(FIRST_BOOT_DONE, 1)[1] if self.device and \
            FIRST_BOOT_DONE in text else text

    async def after_boot(self, text: str) -> None:
        self.line.keys.nvs_by_mac.pop(self.identity.mac, None)  # done: the board has them
        self._nvs_keys = None
        if self.device:
            await self._journal("first_boot", "after", (
                "the plaintext verified before the station's last stop, encrypted by the "
                "chip's first boot; this boot: " if self.on_flash else "the chip made its "
                "key and encrypted its flash; the second boot: ") + self.plan.mode)

    def boot_failure(self, detail: str) -> Exception | None:
        """A failed boot check of a board found encrypted by its own first boot: its
        plaintext can no longer be written, so it needs rework, not another attempt."""
        if not self.on_flash:
            return None
        return SecurityError(f"{self.identity.mac}: boot check: {detail}; its flash, "
                             "verified before the station's last stop, was given to its own "
                             "first boot and plaintext can no longer be written to it",
                             rework=True)

    def boot_problem(self, text: str) -> str | None:
        """What the boot story must show of the board's new state."""
        if self.device and FIRST_BOOT_DONE not in text and not self.on_flash:
            return f"expected the first boot to encrypt the flash (\"{FIRST_BOOT_DONE}\") " \
                "and the board to boot again"
        missing = self._unseen(self.boot_story(text))
        return f"expected \"{missing[0]}\" in the boot story" if missing else None

    def _unseen(self, text: str) -> list[str]:
        """The lines of the board's new state its boot story has not shown yet."""
        wants = []
        if self.plan.mode == "release":
            wants.append("Flash encryption mode is RELEASE")
        elif self.plan.mode == "development":
            wants.append("Flash encryption mode is DEVELOPMENT")
        if self.plan.digest_purpose:
            wants.append("secure boot v2 is already enabled")
        return [w for w in wants if w not in text]

    def summary(self) -> Mapping[str, Any]:
        return {"mode": self.line.security.mode, "fingerprint": self.fingerprint,
                "digest": self.firmware.digest}

    # -- batches -------------------------------------------------------------------------

    async def _journal(self, step: str, phase: str, detail: str = "") -> None:
        await self.journal(step, phase, self.line.security.mode,
                           self.fingerprint if step in ("key", "images")
                           else None, self.firmware.digest if step == "secure_boot" else None,
                           detail)
        crash_point(f"security:{step}:{phase}")

    async def _batch(self, session: BoardSession, step: Step,
                     work: Callable[[Any], list[str]]) -> None:
        await self._journal(step.name, "before", "; ".join(b.describe() for b in step.burns))
        try:
            done = await session.on_loader(f"burn {step.name}", work)
        except BaseException as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            with contextlib.suppress(Exception):  # the burn's own error is the one to raise
                await asyncio.shield(self._journal(step.name, "failed", reason))
            raise
        await self._journal(step.name, "after", ", ".join(done))
        log.info("%s: %s burned: %s", self.identity.mac, step.name, ", ".join(done))
