"""AWS IoT registration against a real moto server over HTTP (through a loopback proxy)."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from station.identity import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    RECORD_FILE,
    CredentialStore,
    key_pair_matches,
    nvs_region,
    read_nvs,
)
from station.identity.registrar.aws_iot import AwsIotRegistrar
from station.parts import DeviceCredentials
from tests.registrar.awsproxy import AwsProxy
from tests.registrar.conftest import (
    MemoryJournal,
    aws_section,
    board,
    certificates,
    thing_certificates,
    things,
)

BOARDS = 16


async def register_all(registrar: AwsIotRegistrar, journal: MemoryJournal,
                       boards: range = range(BOARDS)) -> list[DeviceCredentials]:
    await registrar.start()
    try:
        facts = [board(n) for n in boards]
        results = await asyncio.gather(*(registrar.register(f, journal.for_board(f))
                                         for f in facts))
        return list(results)
    finally:
        await registrar.close()


def check_fleet(iot: Any, out: Path, creds: list[DeviceCredentials], policy: str) -> None:
    names = {c.thing_name for c in creds}
    assert len(names) == len(creds)
    all_things = things(iot)
    assert set(all_things) == names
    certs = {c["certificateId"]: c for c in certificates(iot)}
    for c in creds:
        attached = thing_certificates(iot, c.thing_name)
        assert attached == [c.certificate_id], c.thing_name
        assert certs[c.certificate_id]["status"] == "ACTIVE"
        pols = iot.list_attached_policies(target=c.certificate_arn)["policies"]
        assert [p["policyName"] for p in pols] == [policy]
        attrs = all_things[c.thing_name]["attributes"]
        mac = c.thing_name.removeprefix("station-")
        assert attrs == {"mac": mac, "chip": "esp32", "station": "line-1",
                         "firmware": "ab" * 32}
        folder = out / c.thing_name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
        assert {p.name for p in folder.iterdir()} == {
            CERTIFICATE_FILE, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, RECORD_FILE}
        assert key_pair_matches((folder / PRIVATE_KEY_FILE).read_text(),
                                (folder / PUBLIC_KEY_FILE).read_text())
        assert (folder / CERTIFICATE_FILE).read_text() == c.certificate_pem
        assert c.endpoint.endswith(".amazonaws.com") and "-ats." in c.endpoint
    # every ACTIVE certificate on the server is one of ours, on its thing
    active = {cid for cid, cert in certs.items() if cert["status"] == "ACTIVE"}
    assert active == {c.certificate_id for c in creds}


def test_sixteen_boards_at_once(proxy: AwsProxy, iot: Any, tmp_path: Path) -> None:
    out = tmp_path / "certs_out"
    registrar = AwsIotRegistrar(aws_section(proxy.url), CredentialStore(out), station="line-1")
    journal = MemoryJournal()
    creds = asyncio.run(register_all(registrar, journal))
    check_fleet(iot, out, creds, "station-device")
    group = iot.list_things_in_thing_group(thingGroupName="lot-42")["things"]
    assert sorted(group) == sorted(c.thing_name for c in creds)
    # the key was made on the station: the CSR sent carried it (moto signs its own key,
    # MOTO-NOTES #1), so check the private key against its public key file instead
    for c in creds:
        private = serialization.load_pem_private_key(c.private_key_pem.encode(), None)
        assert private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode() == c.public_key_pem
        x509.load_pem_x509_certificate(c.certificate_pem.encode())
    # order of calls per certificate: created inactive, activated last
    per_cert: dict[str, list[str]] = {}
    for s in journal.steps:
        per_cert.setdefault(s.certificate_id or "-", []).append(s.step)
    for c in creds:
        assert per_cert[str(c.certificate_id)] == [
            "cert-created", "policy-attached", "thing-created", "cert-attached",
            "group-added", "cert-activated"]
    assert proxy.calls["CreateCertificateFromCsr"] == BOARDS
    assert proxy.calls["UpdateCertificate"] == BOARDS
    # each board's NVS image decodes to its own credentials
    for c in creds:
        region = nvs_region(c, 0x9000, 0x6000, "station")
        data = read_nvs(region.data)["station"]
        assert data["thing_name"] == c.thing_name
        assert data["cert"] == c.certificate_pem.encode() + b"\0"
        assert data["priv_key"] == c.private_key_pem.encode() + b"\0"
        assert data["endpoint"] == c.endpoint


def test_reregistering_makes_no_second_certificate(proxy: AwsProxy, iot: Any,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "certs_out"
    store = CredentialStore(out)
    first = asyncio.run(register_all(
        AwsIotRegistrar(aws_section(proxy.url), store, station="line-1"), MemoryJournal(),
        range(3)))
    created = proxy.calls["CreateCertificateFromCsr"]
    again = asyncio.run(register_all(
        AwsIotRegistrar(aws_section(proxy.url), store, station="line-1"), MemoryJournal(),
        range(3)))
    assert proxy.calls["CreateCertificateFromCsr"] == created
    assert [c.certificate_id for c in again] == [c.certificate_id for c in first]
    assert [c.private_key_pem for c in again] == [c.private_key_pem for c in first]
    assert len(certificates(iot)) == 3
    check_fleet(iot, out, again, "station-device")


def test_lost_key_replaces_the_certificate(proxy: AwsProxy, iot: Any, tmp_path: Path) -> None:
    out = tmp_path / "certs_out"
    store = CredentialStore(out)
    first = asyncio.run(register_all(
        AwsIotRegistrar(aws_section(proxy.url), store, station="line-1"), MemoryJournal(),
        range(2)))
    asyncio.run(store.forget_private_key(first[0].thing_name))  # keep_private_keys = false
    journal = MemoryJournal()
    again = asyncio.run(register_all(
        AwsIotRegistrar(aws_section(proxy.url), store, station="line-1"), journal, range(2)))
    assert again[0].certificate_id != first[0].certificate_id
    assert again[1].certificate_id == first[1].certificate_id
    ids = {c["certificateId"] for c in certificates(iot)}
    assert first[0].certificate_id not in ids  # revoked and deleted
    steps = [s.step for s in journal.steps if s.certificate_id == first[0].certificate_id]
    assert steps == ["cert-revoked", "cert-deleted"]
    check_fleet(iot, out, again, "station-device")


def test_key_source_aws_writes_the_seed_files(moto: str, iot: Any, tmp_path: Path) -> None:
    out = tmp_path / "certs_out"
    registrar = AwsIotRegistrar(aws_section(moto, key_source="aws", thing_group=""),
                                CredentialStore(out), station="line-1")
    creds = asyncio.run(register_all(registrar, MemoryJournal(), range(2)))
    for c in creds:
        folder = out / c.thing_name
        cert = x509.load_pem_x509_certificate((folder / CERTIFICATE_FILE).read_bytes())
        key = serialization.load_pem_private_key((folder / PRIVATE_KEY_FILE).read_bytes(), None)
        public = serialization.load_pem_public_key((folder / PUBLIC_KEY_FILE).read_bytes())
        der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        # AWS made this key pair: the certificate carries exactly it
        assert cert.public_key().public_bytes(*der) == key.public_key().public_bytes(*der) \
            == public.public_bytes(*der)
        assert thing_certificates(iot, c.thing_name) == [c.certificate_id]
        assert iot.describe_certificate(certificateId=c.certificate_id)[
            "certificateDescription"]["status"] == "ACTIVE"


def test_retry_after_a_failed_attempt_resumes_its_certificate(proxy: AwsProxy, iot: Any,
                                                              tmp_path: Path) -> None:
    """A transient failure mid-way (here AttachThingPrincipal) and the worker's retry."""
    store = CredentialStore(tmp_path)
    registrar = AwsIotRegistrar(aws_section(proxy.url, max_attempts=1), store,
                                station="line-1")
    facts = board(1)
    journal = MemoryJournal()

    async def go() -> tuple[DeviceCredentials, str]:
        await registrar.start()
        try:
            proxy.deny["AttachThingPrincipal"] = "ServiceUnavailableException"
            try:
                await registrar.register(facts, journal.for_board(facts))
            except Exception as e:  # the failure is what we provoke
                assert getattr(e, "transient", False), e
            first = next(s.certificate_id for s in journal.steps if s.step == "cert-created")
            del proxy.deny["AttachThingPrincipal"]
            return await registrar.register(facts, journal.for_board(facts)), str(first)
        finally:
            await registrar.close()

    creds, first = asyncio.run(go())
    assert creds.certificate_id == first  # resumed, not remade
    assert proxy.calls["CreateCertificateFromCsr"] == 1
    assert thing_certificates(iot, facts.thing_name) == [first]
    assert [c["status"] for c in certificates(iot)] == ["ACTIVE"]
