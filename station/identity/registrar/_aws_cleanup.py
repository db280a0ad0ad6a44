"""kind = "aws-iot": the clean-up. What a crash or a board that ended without its
credentials leaves behind is made safe: no ACTIVE certificate without its board.

`reconcile` (at start, and `station reconcile`) reads the journal: every certificate
short of "cert-activated", or whose replacement began, is revoked and deleted; one
activated but never put on its board is parked INACTIVE. `release` parks the
credentials of a board that ended without them. Things are never deleted.
A piece of aws_iot.py's `AwsIotRegistrar`, which inherits it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from station.config import AwsSection
from station.errors import RegistrationError
from station.events import RegistrationStep
from station.identity.credentials import CredentialStore
from station.identity.registrar.aws_client import NOT_FOUND, AwsError, IotClient
from station.identity.registrar.base import Journal, journaled
from station.parts import DeviceCredentials

log = logging.getLogger("station.registrar.aws")

DELETE_CONFLICT_TIMEOUT = 30.0
"""AWS detaches a thing's principal asynchronously; DeleteCertificate may need a retry."""


class Cleanup:
    """The clean-up half of `AwsIotRegistrar` (its section, credential store and client)."""

    section: AwsSection
    store: CredentialStore
    iot: IotClient

    async def _retire(self, thing: str, cid: str, arn: str | None, journal: Journal) -> bool:
        """Revoke, detach and delete one certificate; False if it was already gone.

        Revoked first, so it is unusable before anything else happens to it."""
        try:
            await self.iot.call("UpdateCertificate", certificateId=cid, newStatus="REVOKED")
        except AwsError as e:
            if e.code != NOT_FOUND:
                raise
            await self._forget(thing, cid)
            return False
        await journal("cert-revoked", cid, arn)
        if arn is None:
            reply = await self.iot.call("DescribeCertificate", certificateId=cid)
            arn = str(reply["certificateDescription"]["certificateArn"])
        await self._ignore_missing("DetachThingPrincipal", thingName=thing, principal=arn)
        await self._ignore_missing("DetachPolicy", policyName=self.section.policy_name,
                                   target=arn)
        deadline = time.monotonic() + DELETE_CONFLICT_TIMEOUT
        delay = 0.2
        while True:
            try:
                await self.iot.call("DeleteCertificate", certificateId=cid, forceDelete=True)
                break
            except AwsError as e:
                if e.code == NOT_FOUND:
                    break
                if e.code != "DeleteConflictException" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)  # AWS detaches asynchronously: back off, retry
                delay = min(delay * 2, 5.0)
        await journal("cert-deleted", cid, arn)
        await self._forget(thing, cid)
        return True

    async def _ignore_missing(self, api: str, **params: Any) -> None:
        try:
            await self.iot.call(api, **params)
        except AwsError as e:
            if e.code not in (NOT_FOUND, "InvalidRequestException"):
                raise

    async def _forget(self, thing: str, cid: str) -> None:
        record = await self.store.read_record(thing)
        if record is not None and record.certificate_id == cid:
            await self.store.remove_certificate(thing)
            record.status = "retired"
            await self.store.write_record(record)

    async def reconcile(self, steps: Sequence[RegistrationStep],
                        journal_for: Callable[[str, str], Journal]) -> list[str]:
        """Every certificate the journal shows short of "cert-activated" (or whose
        replacement began) is revoked and deleted; its thing stays, and the board
        registers again when plugged. Returns one line per certificate it cleaned."""
        seen: dict[str, list[RegistrationStep]] = {}
        for step in steps:
            if step.certificate_id:
                seen.setdefault(step.certificate_id, []).append(step)
        done: list[str] = []
        for cid, cert_steps in seen.items():
            names = {s.step for s in cert_steps}
            if "cert-deleted" in names or names <= {"cert-superseded"}:
                continue  # gone, or another station's certificate this one put aside
            last = cert_steps[-1]
            arn = next((s.certificate_arn for s in cert_steps if s.certificate_arn), None)
            journal = journaled(journal_for(last.mac, last.thing_name))
            if "cert-activated" in names and "cert-revoked" not in names:
                # Complete, and nobody started to replace it. Still ACTIVE but never put
                # on its board (the station died between the two): park it INACTIVE.
                if _last_of(cert_steps, OWNERSHIP_STEPS) == "cert-activated":
                    await self.release(cert_naming(last.thing_name, cid, arn), journal)
                    done.append(f"{last.thing_name}: certificate {cid[:12]} was never put on "
                                "its board: inactive until the board comes back")
                continue
            try:
                gone = await self._retire(last.thing_name, cid, arn, journal)
            except AwsError as e:
                done.append(f"{last.thing_name}: certificate {cid[:12]} left as it is: {e}")
                continue
            if gone:
                done.append(f"{last.thing_name}: certificate {cid[:12]} was interrupted after "
                            f"{last.step}: revoked and deleted")
            else:
                await journal("cert-deleted", cid, arn)  # close its journal: nothing to do
        return done

    async def release(self, credentials: DeviceCredentials, journal: Journal) -> None:
        """No ACTIVE certificate without its board: a board that ended without its
        credentials leaves them INACTIVE (still attached; its key stays on the station, so
        the board reuses the certificate when it comes back)."""
        cid = credentials.certificate_id
        if cid is None:
            return
        try:
            await self.iot.call("UpdateCertificate", certificateId=cid, newStatus="INACTIVE")
        except (AwsError, RegistrationError) as e:
            log.warning("%s: certificate %s stays ACTIVE for now (%s); the next start "
                        "deactivates it", credentials.thing_name, cid[:12], e)
            return
        await journaled(journal)("cert-deactivated", cid, credentials.certificate_arn)


OWNERSHIP_STEPS = frozenset({"cert-activated", "on-board", "cert-deactivated"})
"""The steps that say who can use a certificate: AWS (activated), its board (on-board,
journaled by the worker once the credentials verify on the flash), nobody (deactivated)."""


def cert_naming(thing: str, cid: str, arn: str | None) -> DeviceCredentials:
    """Just enough of a board's credentials to name the certificate to release."""
    return DeviceCredentials(thing_name=thing, certificate_pem="", private_key_pem="",
                             public_key_pem="", endpoint="", certificate_id=cid,
                             certificate_arn=arn)


def _last_of(steps: Sequence[RegistrationStep], names: frozenset[str]) -> str | None:
    return next((s.step for s in reversed(steps) if s.step in names), None)
