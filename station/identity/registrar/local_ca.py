"""kind = "local-ca": a self-hosted CA signs device certificates, no cloud account needed.

For fleets on their own MQTT broker (Mosquitto, EMQX, HiveMQ): the broker trusts
`<dir>/ca.crt` and asks clients for a certificate; every board gets an EC P-256 key made
on the station and a certificate with CN = its thing name (Mosquitto's
`use_identity_as_username` then makes the thing name the MQTT user name).

The CA lives in `[registrar.local_ca] dir`: created on first use (folder 0700, ca.key
0600), or an existing `ca.crt` + `ca.key` placed there by the operator. Both or neither:
one without the other is an error, never silently replaced.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from station.config import LocalCaSection
from station.errors import RegistrationError
from station.events import RegistrationStep
from station.identity.credentials import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    CredentialStore,
    RegistrationRecord,
)
from station.identity.ds import new_ds_key
from station.identity.registrar.base import BoardFacts, Journal, journaled
from station.identity.registrar.keys import private_key_pem, public_key_pem, same_public_key
from station.parts import DeviceCredentials

log = logging.getLogger("station.registrar.local_ca")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class LocalCa:
    """The CA's key and certificate, loaded or made once; signs leaf certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    def __repr__(self) -> str:
        return f"LocalCa({self.cert.subject.rfc4514_string()!r})"

    @classmethod
    def open(cls, folder: Path, validity_days: int = 3650) -> LocalCa:
        """Load the CA in `folder`, or create it there if the folder holds neither file."""
        cert_path, key_path = folder / CA_CERT, folder / CA_KEY
        has_cert, has_key = cert_path.exists(), key_path.exists()
        if has_cert != has_key:
            present, missing = (cert_path, key_path) if has_cert else (key_path, cert_path)
            raise RegistrationError(f"local CA: {present} exists but {missing} does not; "
                                    "put both there, or move both away to create a new CA")
        if not has_cert:
            return cls._create(folder, validity_days)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise RegistrationError(f"local CA in {folder}: cannot load {CA_CERT}/{CA_KEY} "
                                    f"({e}); they must be PEM, the key unencrypted") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise RegistrationError(f"local CA: {key_path} must be an EC key")
        if not same_public_key(cert.public_key(), key.public_key()):
            raise RegistrationError(f"local CA: {key_path} is not the key of {cert_path}")
        if key_path.stat().st_mode & 0o077:
            log.warning("local CA key %s is readable by others; chmod 600 it", key_path)
        return cls(key, cert)

    @classmethod
    def _create(cls, folder: Path, validity_days: int) -> LocalCa:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
            key = ec.generate_private_key(ec.SECP256R1())
            now = dt.datetime.now(dt.UTC)
            name = _name(f"station local CA {secrets.token_hex(4)}")
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            cert = (
                x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=validity_days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    key_cert_sign=True, crl_sign=True, encipher_only=False,
                    decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256())
            )
            _write_exclusive(folder / CA_KEY, private_key_pem(key).encode(), 0o600)
            _write_exclusive(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM),
                             0o644)
        except OSError as e:
            raise RegistrationError(f"local CA: cannot create it in {folder}: "
                                    f"{e.strerror or e}") from None
        log.info("local CA created in %s", folder)
        return cls(key, cert)

    def sign(self, subject: str, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
             days: int, *,
             server_names: Sequence[str] = ()) -> x509.Certificate:
        """A leaf certificate: a client one (CN = thing name) or, with names, a server one."""
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else \
            ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject)).issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if server_names:
            alt: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed `cert` (and it is still valid now)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        now = dt.datetime.now(dt.UTC)
        return cert.not_valid_before_utc <= now < cert.not_valid_after_utc

    def server_certificate(self, names: Sequence[str], days: int = 825) -> tuple[str, str]:
        """(certificate PEM, key PEM) for a broker at `names`: the demo's and the tests'."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(names[0], key.public_key(), days, server_names=names)
        return cert.public_bytes(serialization.Encoding.PEM).decode(), private_key_pem(key)


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalCaRegistrar:
    """Signs each board's certificate with the station's own CA."""

    kind = "local-ca"

    def __init__(self, section: LocalCaSection, store: CredentialStore) -> None:
        self.section = section
        self.store = store
        self._ca: LocalCa | None = None

    @property
    def ca(self) -> LocalCa:
        if self._ca is None:
            raise RegistrationError("local CA: start() was not called")
        return self._ca

    async def start(self) -> None:
        if self._ca is None:
            self._ca = await asyncio.to_thread(LocalCa.open, self.section.dir,
                                               self.section.validity_days)

    async def register(self, board: BoardFacts, journal: Journal) -> DeviceCredentials:
        journal = journaled(journal)
        thing = board.thing_name
        held = await (self._held_ds(thing) if board.ds else self._held(thing))
        if held is not None:
            log.info("%s: reusing its certificate from the local CA", thing)
            return held
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = \
            new_ds_key() if board.ds else ec.generate_private_key(ec.SECP256R1())
        key_pem, pub_pem = private_key_pem(key), public_key_pem(key.public_key())
        if board.ds:  # the private half stays in memory until it is DS ciphertext
            await self.store.write_public_key(thing, pub_pem)
            await self.store.remove_ds(thing)  # an older key's ciphertext
        else:
            await self.store.write_key(thing, key_pem, pub_pem)
        await journal("key-written", None, None)
        cert = self.ca.sign(thing, key.public_key(), self.section.validity_days)
        cert_id = f"{cert.serial_number:x}"
        cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        await self.store.write_certificate(thing, cert_pem)
        previous = await self.store.read_record(thing)
        record = RegistrationRecord(
            thing_name=thing, registrar=self.kind, status="active", certificate_id=cert_id,
            endpoint=self.section.endpoint, mac=board.identity.mac, chip=board.identity.chip,
            key_source="csr", history=[*(previous.history if previous else []), cert_id])
        await self.store.write_record(record)
        await journal("cert-created", cert_id, None)
        await journal("cert-activated", cert_id, None)
        return DeviceCredentials(thing_name=thing, certificate_pem=cert_pem,
                                 private_key_pem=key_pem, public_key_pem=pub_pem,
                                 endpoint=self.section.endpoint, ca_pem=self.ca.pem,
                                 certificate_id=cert_id)

    async def _held_ds(self, thing: str) -> DeviceCredentials | None:
        """A DS board's stored certificate, if our CA issued it for the public key whose
        DS ciphertext certs_out keeps (the private key exists only on the board)."""
        cert_pem = await self.store.read_text(thing, CERTIFICATE_FILE)
        pub_pem = await self.store.read_text(thing, PUBLIC_KEY_FILE)
        record = await self.store.read_record(thing)
        if cert_pem is None or pub_pem is None or record is None or \
                await self.store.read_ds(thing) is None:
            return None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            public = serialization.load_pem_public_key(pub_pem.encode())
        except ValueError:
            return None
        if not (self.ca.issued(cert) and same_public_key(cert.public_key(), public)):
            return None
        return DeviceCredentials(thing_name=thing, certificate_pem=cert_pem, private_key_pem="",
                                 public_key_pem=pub_pem, endpoint=self.section.endpoint,
                                 ca_pem=self.ca.pem, certificate_id=record.certificate_id)

    async def _held(self, thing: str) -> DeviceCredentials | None:
        """This board's stored credentials, if our CA issued them and the key matches."""
        creds = await self.store.read_credentials(thing)
        if creds is None:
            return None
        try:
            cert = x509.load_pem_x509_certificate(creds.certificate_pem.encode())
            key = serialization.load_pem_private_key(creds.private_key_pem.encode(), None)
        except ValueError:
            log.warning("%s: unreadable %s or %s; issuing a new certificate", thing,
                        CERTIFICATE_FILE, PRIVATE_KEY_FILE)
            return None
        if not (self.ca.issued(cert) and same_public_key(cert.public_key(), key.public_key())):
            return None
        return DeviceCredentials(thing_name=thing, certificate_pem=creds.certificate_pem,
                                 private_key_pem=creds.private_key_pem,
                                 public_key_pem=creds.public_key_pem,
                                 endpoint=self.section.endpoint, ca_pem=self.ca.pem,
                                 certificate_id=creds.certificate_id)

    async def reconcile(self, steps: Sequence[RegistrationStep],
                        journal_for: Callable[[str, str], Journal]) -> list[str]:
        """Nothing to clean: a local certificate is usable only by who holds its key."""
        return []

    async def release(self, credentials: DeviceCredentials, journal: Journal) -> None:
        """Nothing to do: its key never left the station (the board reuses it on return)."""
        return None

    async def close(self) -> None:
        return None
