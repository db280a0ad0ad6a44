"""kind = "aws-iot": register boards with AWS IoT Core, crash-safely and idempotently.

Per board (docs/registration.md has the why of each step):

    key-written     EC P-256 key + CSR made here; the key is on disk before AWS is asked
                    ([credentials] ds: an RSA-2048 key whose private half stays in memory
                    until the worker wraps it into the board's DS ciphertext; only the
                    public key reaches certs_out, the CSR is signed before the wrap)
    cert-created    CreateCertificateFromCsr(setAsActive=False): INACTIVE; id journaled
    policy-attached AttachPolicy(policy, certificate)
    thing-created   DescribeThing, else CreateThing (attributes mac, chip, station, firmware)
    cert-attached   AttachThingPrincipal
    group-added     AddThingToThingGroup (if a group is configured)
    cert-activated  UpdateCertificate(ACTIVE): the only step that makes it usable

Each step is journaled (the ledger has it) before the next call, so after a crash
`reconcile` knows every certificate the station made and how far it got: an ACTIVE
certificate always has its thing, its key on disk and its ledger rows; anything short
of "cert-activated" is revoked and deleted. Things are never deleted. That clean-up
(`reconcile`, `release`) is _aws_cleanup.py's, which `AwsIotRegistrar` inherits.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from station.config import AwsSection
from station.errors import RegistrationError
from station.identity.credentials import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    CredentialStore,
    RegistrationRecord,
)
from station.identity.ds import new_ds_key
from station.identity.registrar._aws_cleanup import Cleanup, cert_naming
from station.identity.registrar.aws_client import NOT_FOUND, AwsError, IotClient
from station.identity.registrar.base import BoardFacts, Journal, journaled
from station.identity.registrar.keys import (
    certificate_key_matches,
    csr_pem,
    key_pair_matches,
    new_key,
    private_key_pem,
    public_key_pem,
)
from station.identity.registrar.policy import load_policy, same_policy
from station.parts import DeviceCredentials

log = logging.getLogger("station.registrar.aws")

ATTRIBUTE_VALUE = re.compile(r"[^a-zA-Z0-9_.,@/:#=\[\]-]")
ATTRIBUTE_MAX = 800


PROBES: tuple[tuple[str, dict[str, str]], ...] = (
    ("DescribeThing", {"thingName": "station-permission-probe"}),
    ("ListThingPrincipals", {"thingName": "station-permission-probe"}),
    ("DescribeCertificate", {"certificateId": "0" * 64}),
)
"""The actions every board needs, checked at start on names that cannot exist."""


def attribute_value(value: str) -> str:
    """AWS thing attribute values allow [a-zA-Z0-9_.,@/:#=[]-], at most 800 characters."""
    return ATTRIBUTE_VALUE.sub("_", value)[:ATTRIBUTE_MAX]


async def _in_order(*calls: Awaitable[Any]) -> list[Any]:
    """Run `calls` together; their results, or the first failure in the order given (so
    a start with two problems always names the same one first)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _cert_id(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


class AwsIotRegistrar(Cleanup):
    """Registers boards as AWS IoT things with a certificate each."""

    kind = "aws-iot"

    def __init__(self, section: AwsSection, store: CredentialStore, *, station: str,
                 emit_throttled: Callable[[str], None] | None = None) -> None:
        self.section = section
        self.store = store
        self.station = station
        self.iot = IotClient(region=section.region, endpoint_url=section.endpoint_url,
                             profile=section.profile, retry_mode=section.retry_mode,
                             max_attempts=section.max_attempts, tps=section.tps,
                             on_throttled=emit_throttled)
        self.endpoint = ""
        self.policy_arn = ""

    # -- start ------------------------------------------------------------------------

    async def start(self) -> None:
        """Credentials, region and endpoint, permissions, policy, thing type and group.

        DescribeEndpoint goes first and alone: it is the one call that proves the
        credentials, so bad ones give one clear error. The read-only checks after it are
        independent and go out together (one round trip to AWS instead of five, which is
        most of a station's start on a real link); their errors are raised in the order
        below, so the first problem named is always the same one. Nothing is created
        unless every check passed, as before.
        """
        document = load_policy(self.section.policy_document)
        await self.iot.open()
        reply = await self.iot.call("DescribeEndpoint", endpointType="iot:Data-ATS")
        self.endpoint = str(reply["endpointAddress"])
        kinds = [("DescribeThingType", "CreateThingType", "thingTypeName",
                  self.section.thing_type),
                 ("DescribeThingGroup", "CreateThingGroup", "thingGroupName",
                  self.section.thing_group)]
        kinds = [k for k in kinds if k[3]]
        found = await _in_order(*(self._probe(api, **params) for api, params in PROBES),
                                self._existing("GetPolicy", "policyName",
                                               self.section.policy_name),
                                *(self._existing(d, key, name) for d, _, key, name in kinds))
        policy, there = found[len(PROBES)], found[len(PROBES) + 1:]
        await _in_order(self._ensure_policy(document, self.section.policy_document, policy),
                        *(self._create(c, key, name)
                          for (_, c, key, name), have in zip(kinds, there, strict=True)
                          if have is None))
        log.info("AWS IoT ready: endpoint %s, policy %s", self.endpoint,
                 self.section.policy_name)

    async def _probe(self, api: str, **params: Any) -> None:
        """A read-only call on a name that does not exist (PROBES): AccessDenied names a
        missing action. The creating calls cannot be probed without creating something;
        a missing one fails the first board with the action named."""
        try:
            await self.iot.call(api, **params)
        except AwsError as e:
            if e.code not in (NOT_FOUND, "InvalidRequestException"):
                raise

    async def _existing(self, describe: str, key: str, name: str) -> dict[str, Any] | None:
        """AWS's answer to `describe` for `name`, or None when there is no such thing."""
        try:
            return await self.iot.call(describe, **{key: name})
        except AwsError as e:
            if e.code != NOT_FOUND:
                raise
            return None

    async def _ensure_policy(self, document: dict[str, Any], path: Path,
                             reply: dict[str, Any] | None) -> None:
        """Create the policy from the document, or check AWS's copy (`reply`, GetPolicy's
        answer) says the same.

        An existing policy with another document is an error, not an update: changing it
        changes what every device of the fleet may do, which is a decision for a person.
        """
        name = self.section.policy_name
        if reply is not None:
            if not same_policy(str(reply.get("policyDocument", "")), document):
                raise RegistrationError(
                    f"AWS IoT policy {name!r} exists with a document different from {path}; "
                    f"update it deliberately (aws iot create-policy-version --policy-name "
                    f"{name} --set-as-default --policy-document file://{path}) or set "
                    "[registrar.aws] policy_name to a new name")
            self.policy_arn = str(reply.get("policyArn", ""))
            return
        import json

        try:
            reply = await self.iot.call("CreatePolicy", policyName=name,
                                        policyDocument=json.dumps(document))
        except AwsError as e:
            if e.code == "MalformedPolicyException":
                raise RegistrationError(f"AWS rejected the policy document {path}: "
                                        f"{e}") from None
            if e.code == "ResourceAlreadyExistsException":  # another station, just now
                return await self._ensure_policy(
                    document, path, await self._existing("GetPolicy", "policyName", name))
            raise
        self.policy_arn = str(reply.get("policyArn", ""))
        log.info("created AWS IoT policy %s from %s", name, path)

    async def _create(self, create: str, key: str, name: str) -> None:
        try:
            await self.iot.call(create, **{key: name})
        except AwsError as e:
            if e.code != "ResourceAlreadyExistsException":
                raise
        log.info("created %s %s", key.removesuffix("Name"), name)

    # -- one board --------------------------------------------------------------------

    async def register(self, board: BoardFacts, journal: Journal) -> DeviceCredentials:
        if not self.endpoint:
            raise RegistrationError("AWS IoT registrar used before start()")
        journal = journaled(journal)
        thing = board.thing_name
        record = await self.store.read_record(thing)
        thing_info = await self._describe_thing(thing)
        held: tuple[str, str] | None = None
        retired: set[str] = set()
        if thing_info is not None:
            attached = [p for p in await self._principals(thing) if ":cert/" in p]
            for arn in attached:
                cid = _cert_id(arn)
                if held is None and await self._holds(thing, record, cid, board.ds):
                    held = (cid, arn)
                elif self._station_made(record, thing_info, cid):
                    log.info("%s: replacing certificate %s (the station lacks its key)",
                             thing, cid[:12])
                    await self._retire(thing, cid, arn, journal)
                    retired.add(cid)
                elif self._fleet_made(thing_info):
                    await self._supersede(thing, thing_info, cid, arn, journal)
                else:
                    log.warning("%s: certificate %s was not made by this station; left "
                                "attached", thing, cid[:12])
        if record is not None and record.certificate_id and held is None \
                and record.status != "retired" and record.certificate_id not in retired:
            # made by an attempt that failed before attaching it (a retry after an error):
            # finish it if the key is here, else clean it before making another
            pending, pending_arn = record.certificate_id, record.certificate_arn
            if pending_arn and await self._holds(thing, record, pending, board.ds):
                held = (pending, pending_arn)
            else:
                await self._retire(thing, pending, pending_arn, journal)
        if held is not None:
            log.info("%s: reusing certificate %s", thing, held[0][:12])
            return await self._complete(board, held[0], held[1], journal, thing_info)
        in_memory = ""  # a DS board's private key: never on disk, handed to the worker
        if self.section.key_source == "aws":
            cid, arn = await self._keys_from_aws(board, record, journal)
        else:
            cid, arn, in_memory = await self._keys_from_csr(board, record, journal)
        return await self._complete(board, cid, arn, journal, thing_info, in_memory)

    async def _keys_from_csr(self, board: BoardFacts, record: RegistrationRecord | None,
                             journal: Journal) -> tuple[str, str, str]:
        """The key pair made here, the CSR signed with it. A DS board's RSA key stays in
        memory (returned): certs_out gets its public half, and loses any ciphertext of an
        older key, so a crash leaves nothing a later run could mistake for this key's."""
        thing = board.thing_name
        key = new_ds_key() if board.ds else new_key()
        in_memory = ""
        if board.ds:
            in_memory = private_key_pem(key)
            await self.store.write_public_key(thing, public_key_pem(key.public_key()))
            await self.store.remove_ds(thing)
        else:
            await self.store.write_key(thing, private_key_pem(key),
                                       public_key_pem(key.public_key()))
        await self._record(board, record, status="pending", certificate_id=None)
        await journal("key-written", None, None)
        reply = await self.iot.call("CreateCertificateFromCsr",
                                    certificateSigningRequest=csr_pem(key, thing),
                                    setAsActive=False)
        cid, arn = str(reply["certificateId"]), str(reply["certificateArn"])
        await journal("cert-created", cid, arn)
        await self.store.write_certificate(thing, str(reply["certificatePem"]))
        await self._record(board, record, status="pending", certificate_id=cid,
                           certificate_arn=arn)
        return cid, arn, in_memory

    async def _keys_from_aws(self, board: BoardFacts, record: RegistrationRecord | None,
                             journal: Journal) -> tuple[str, str]:
        """The seed's way: AWS makes the key pair (it crosses the network once, over TLS)."""
        thing = board.thing_name
        reply = await self.iot.call("CreateKeysAndCertificate", setAsActive=False)
        cid, arn = str(reply["certificateId"]), str(reply["certificateArn"])
        await journal("cert-created", cid, arn)
        pair = reply["keyPair"]
        await self.store.write_key(thing, str(pair["PrivateKey"]), str(pair["PublicKey"]))
        await self.store.write_certificate(thing, str(reply["certificatePem"]))
        await self._record(board, record, status="pending", certificate_id=cid,
                           certificate_arn=arn)
        await journal("key-written", cid, arn)
        return cid, arn

    async def _complete(self, board: BoardFacts, cid: str, arn: str, journal: Journal,
                        thing_info: dict[str, Any] | None,
                        in_memory: str = "") -> DeviceCredentials:
        """Policy, thing, attachment, group, then (and only then) ACTIVE. A DS board's
        credentials carry the key made for it now (`in_memory`), or none when its
        certificate is reused (the key is already the board's ciphertext)."""
        thing = board.thing_name
        await self.iot.call("AttachPolicy", policyName=self.section.policy_name, target=arn)
        await journal("policy-attached", cid, arn)
        await self._ensure_thing(board, thing_info)
        await journal("thing-created", cid, arn)
        await self.iot.call("AttachThingPrincipal", thingName=thing, principal=arn)
        await journal("cert-attached", cid, arn)
        if self.section.thing_group:
            await self.iot.call("AddThingToThingGroup", thingGroupName=self.section.thing_group,
                                thingName=thing)
            await journal("group-added", cid, arn)
        await self.iot.call("UpdateCertificate", certificateId=cid, newStatus="ACTIVE")
        await journal("cert-activated", cid, arn)
        try:
            record = await self.store.read_record(thing)
            await self._record(board, record, status="active", certificate_id=cid,
                               certificate_arn=arn)
            creds = await self.store.read_credentials(
                thing, private_key=in_memory if board.ds else None)
            if creds is None:
                raise RegistrationError(f"{thing}: the credentials in "
                                        f"{self.store.folder(thing)} vanished during "
                                        "registration")
        except BaseException:
            # Active, but it will never reach the board (a full disk, say): park it.
            await asyncio.shield(self.release(cert_naming(thing, cid, arn), journal))
            raise
        return creds

    async def _ensure_thing(self, board: BoardFacts, info: dict[str, Any] | None) -> None:
        attributes = {
            "mac": attribute_value(board.identity.mac),
            "chip": attribute_value(board.identity.chip),
            "station": attribute_value(self.station),
            "firmware": attribute_value(board.firmware_hash),
        }
        thing = board.thing_name
        if info is None:
            params: dict[str, Any] = {"thingName": thing,
                                      "attributePayload": {"attributes": attributes}}
            if self.section.thing_type:
                params["thingTypeName"] = self.section.thing_type
            try:
                await self.iot.call("CreateThing", **params)
                return
            except AwsError as e:
                if e.code != "ResourceAlreadyExistsException":
                    raise
                info = await self._describe_thing(thing) or {}
        if any(info.get("attributes", {}).get(k) != v for k, v in attributes.items()):
            await self.iot.call("UpdateThing", thingName=thing,
                                attributePayload={"attributes": attributes, "merge": True})

    async def _record(self, board: BoardFacts, record: RegistrationRecord | None, *,
                      status: str, certificate_id: str | None,
                      certificate_arn: str | None = None) -> None:
        history = list(record.history) if record else []
        if certificate_id and certificate_id not in history:
            history.append(certificate_id)
        await self.store.write_record(RegistrationRecord(
            thing_name=board.thing_name, registrar=self.kind, status=status,
            certificate_id=certificate_id, certificate_arn=certificate_arn,
            endpoint=self.endpoint, mac=board.identity.mac, chip=board.identity.chip,
            key_source=self.section.key_source,
            created_at=record.created_at if record else time.time(), history=history))

    # -- what is there ----------------------------------------------------------------

    async def _describe_thing(self, thing: str) -> dict[str, Any] | None:
        try:
            return await self.iot.call("DescribeThing", thingName=thing)
        except AwsError as e:
            if e.code == NOT_FOUND:
                return None
            raise

    async def _principals(self, thing: str) -> list[str]:
        principals: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"thingName": thing}
            if token:
                params["nextToken"] = token
            try:
                reply = await self.iot.call("ListThingPrincipals", **params)
            except AwsError as e:
                if e.code == NOT_FOUND:
                    return principals
                raise
            principals += [str(p) for p in reply.get("principals", [])]
            token = reply.get("nextToken")
            if not token:
                return principals

    async def _holds(self, thing: str, record: RegistrationRecord | None, cid: str,
                     ds: bool = False) -> bool:
        """Whether the station holds the key of certificate `cid` (so it can be reused).
        A DS board's key is held as its DS ciphertext (ds_data.json, saved before its
        HMAC key was burned): the public key and the certificate must be that key's."""
        if record is None or record.certificate_id != cid or record.private_key_dropped:
            return False
        public = await self.store.read_text(thing, PUBLIC_KEY_FILE)
        cert = await self.store.read_text(thing, CERTIFICATE_FILE)
        if ds:
            held = await self.store.read_ds(thing) is not None
        else:
            key = await self.store.read_text(thing, PRIVATE_KEY_FILE)
            held = key is not None and public is not None and key_pair_matches(key, public)
        if not held or public is None or cert is None:
            return False
        if certificate_key_matches(cert, public) is False:
            return False  # None: moto's CSR certificates carry a key of moto's own
        try:
            reply = await self.iot.call("DescribeCertificate", certificateId=cid)
        except AwsError as e:
            if e.code == NOT_FOUND:
                return False
            raise
        status = reply.get("certificateDescription", {}).get("status")
        return status in ("ACTIVE", "INACTIVE")

    def _station_made(self, record: RegistrationRecord | None, thing_info: dict[str, Any],
                      cid: str) -> bool:
        """Certificates the station's records name, or any on a thing this station made."""
        if record is not None and cid in record.history:
            return True
        made_by = thing_info.get("attributes", {}).get("station")
        return bool(made_by) and made_by == attribute_value(self.station)

    def _fleet_made(self, thing_info: dict[str, Any]) -> bool:
        """A thing another station of the fleet made (its `station` attribute): a board
        reworked here. Its certificate's key is on that station and the board's old
        flash, never here."""
        made_by = thing_info.get("attributes", {}).get("station")
        return bool(made_by) and made_by != attribute_value(self.station)

    async def _supersede(self, thing: str, thing_info: dict[str, Any], cid: str, arn: str,
                         journal: Journal) -> None:
        """Rework of another station's board: its certificate is deactivated and detached
        (not deleted: it is that station's record), then journaled as "cert-superseded";
        the board gets a new certificate whose key this station holds. Redone if a crash
        comes before the journal: both calls are idempotent."""
        made_by = thing_info.get("attributes", {}).get("station")
        log.info("%s: certificate %s of station %s deactivated and detached (board reworked "
                 "here)", thing, cid[:12], made_by)
        await self.iot.call("UpdateCertificate", certificateId=cid, newStatus="INACTIVE")
        await self._ignore_missing("DetachThingPrincipal", thingName=thing, principal=arn)
        await journal("cert-superseded", cid, arn)

    async def close(self) -> None:
        await self.iot.close()
