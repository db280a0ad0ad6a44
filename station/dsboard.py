"""One board's Digital Signature step (`[credentials] ds = true`): its HMAC key burned,
its RSA key turned into DS ciphertext, its esp_secure_cert partition made from them.

It needs identity (the ciphertext, certs_out, the partition) and security (the eFuse
burn), which never import each other, so it sits beside the worker, which calls it once
the registrar has certified the key (the certificate is signed while the key is still
whole) and before the credentials are written. Why the order:

1. read the key block (the chip is the truth): free, this station's DS key (journal),
   or anything else (refused, untouched: `check` reads it before the worker writes or
   burns anything, so a block used for another purpose fails the board as it came);
2. a fresh HMAC key (os.urandom), the ciphertext made from it and the RSA key, and the
   ciphertext made durable in certs_out (`ds_data.json`) *before* the burn, so a board
   whose key was burned can always be finished without any key in the clear;
3. the burn, journaled before and after (`SecurityStep` "ds_key", HMAC key by
   fingerprint only) like the [security] batches; then both keys are dropped: certs_out
   keeps the certificate, the public key and the ciphertext.

A station killed after the burn: on the next plug the block holds a read-protected DS
key whose fingerprint this station journaled and certs_out holds its ciphertext and
certificate (the registrar hands back that certificate): the partition is written from
them. A board whose burned key has no saved ciphertext "needs rework"; a second,
different HMAC key is never burned. Killed before the burn: the block is free, the saved
ciphertext is void (its HMAC key died with the process) and is removed; the board is
plugged again and gets a new key and certificate.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from station.errors import CredentialsError, SecurityError
from station.identity import CredentialStore, DsData, crash_point, ds_partition, wrap_key
from station.parts import BoardIdentity, BoardSession, DeviceCredentials, Region, SecurityJournal
from station.security import DS_PURPOSE, DsBlock, burn_ds_key, read_ds_block

log = logging.getLogger("station.ds")
STEP = "ds_key"
History = Callable[[str], Awaitable[list[dict[str, Any]]]]


class DsStep:
    """The station's DS part: one per station, shared by every worker."""

    def __init__(self, store: CredentialStore, history: History) -> None:
        self.store = store
        self.history = history

    async def check(self, session: BoardSession, identity: BoardIdentity, block: str) -> None:
        state = await session.on_loader("read eFuses", lambda esp: read_ds_block(esp, block))
        _refuse_other_use(identity.mac, state)

    async def region(self, session: BoardSession, identity: BoardIdentity,
                     creds: DeviceCredentials, block: str, at: tuple[int, int],
                     journal: SecurityJournal) -> tuple[Region, DeviceCredentials]:
        """The board's esp_secure_cert partition, its HMAC key burned if it was not;
        returns it and the credentials without a private key."""
        mac, thing, key_id = identity.mac, creds.thing_name, int(block[-1])
        state = await session.on_loader("read eFuses", lambda esp: read_ds_block(esp, block))
        past = await self.history(mac)
        ours = [e["fingerprint"] for e in past if e["step"] == STEP and e["fingerprint"]]
        raw = await self.store.read_ds(thing)
        stored = DsData.from_json(raw) if raw else None
        if state.holds_ds_key:
            if stored is None or stored.hmac_fingerprint not in ours or \
                    stored.key_id != key_id or creds.private_key_pem:
                if ours:
                    raise SecurityError(f"{mac}: the HMAC key this station burned in {block} "
                                        f"(fingerprint {ours[-1]}) has no saved DS "
                                        f"ciphertext in {self.store.folder(thing)}; the "
                                        "board cannot get its key", rework=True)
                raise SecurityError(f"{mac}: {block} holds a {DS_PURPOSE} key this station "
                                    "did not burn: locked by another line; untouched")
            ds = stored
            log.info("%s: %s holds its DS key (fingerprint %s): partition from the saved "
                     "ciphertext", mac, block, ds.hmac_fingerprint)
        elif not state.free:
            _refuse_other_use(mac, state)
        elif not creds.private_key_pem:
            await self.store.remove_ds(thing)
            raise CredentialsError(f"{thing}: DS ciphertext from an interrupted run whose HMAC "
                                   "key was never burned: removed; plug the board again for "
                                   "a new key and certificate")
        else:
            ds = await self._burn(session, identity, creds, block, key_id, journal)
        image = await asyncio.to_thread(ds_partition, creds.certificate_pem, creds.ca_pem, ds,
                                        at[1])
        return Region.build("esp-secure-cert", at[0], image), replace(creds, private_key_pem="")

    async def _burn(self, session: BoardSession, identity: BoardIdentity,
                    creds: DeviceCredentials, block: str, key_id: int,
                    journal: SecurityJournal) -> DsData:
        hmac_key = os.urandom(32)
        ds = await asyncio.to_thread(wrap_key, creds.private_key_pem, hmac_key, identity.chip,
                                     key_id)
        await self.store.write_ds(creds.thing_name, ds.to_json())
        fp = ds.hmac_fingerprint
        await journal(STEP, "before", "ds", fp, None, f"{block} {DS_PURPOSE}")
        crash_point("ds_key:before")
        try:
            done = await session.on_loader("burn DS key",
                                           lambda esp: burn_ds_key(esp, block, hmac_key))
        except BaseException as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            await asyncio.shield(journal(STEP, "failed", "ds", fp, None, reason))
            raise
        await journal(STEP, "after", "ds", fp, None, ", ".join(done))
        crash_point("ds_key:after")
        log.info("%s: DS key burned: %s", identity.mac, ", ".join(done))
        return ds


def _refuse_other_use(mac: str, state: DsBlock) -> None:
    """A block that is neither free nor a DS key: another purpose, or bits set that a
    burn would collide with (espefuse refuses a key over a written block)."""
    if state.free or state.holds_ds_key:
        return
    protected = "" if state.readable else ", read-protected"
    used = f"purpose {state.purpose}{protected}" if state.purpose != "USER" or \
        not state.readable else "purpose USER, bits already written"
    raise SecurityError(f"{mac}: {state.name} is already used ({used}); set [credentials] "
                        "efuse_key_block to a free key block; untouched")
