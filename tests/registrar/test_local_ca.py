"""The local CA: files and modes, reuse, and real TLS client auth against Mosquitto."""

from __future__ import annotations

import asyncio
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from station.config import (
    Config,
    CredentialsSection,
    FirmwareSection,
    IdentitySection,
    LocalCaSection,
    PortsSection,
    RegistrarSection,
    StationSection,
    WorkerSection,
)
from station.errors import RegistrationError
from station.identity import PRIVATE_KEY_FILE, CredentialStore, make_registrar
from station.identity.registrar.local_ca import LocalCaRegistrar
from station.parts import DeviceCredentials
from tests.mqttkit import mosquitto
from tests.registrar.conftest import MemoryJournal, board

TIMEOUT = 10.0


def register(ca_dir: Path, out: Path, n: int = 1) -> tuple[LocalCaRegistrar, DeviceCredentials]:
    registrar = LocalCaRegistrar(LocalCaSection(dir=ca_dir, endpoint="127.0.0.1:8883"),
                                 CredentialStore(out))

    async def go() -> DeviceCredentials:
        await registrar.start()
        facts = board(n)
        return await registrar.register(facts, MemoryJournal().for_board(facts))

    return registrar, asyncio.run(go())


def test_ca_is_created_private_and_reused(tmp_path: Path) -> None:
    ca_dir = tmp_path / "state" / "ca"
    registrar, creds = register(ca_dir, tmp_path / "out")
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(creds.certificate_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == creds.thing_name
    assert creds.ca_pem == (ca_dir / "ca.crt").read_text()
    assert creds.endpoint == "127.0.0.1:8883"
    # the same CA next time, and the same certificate for the same board
    again_registrar, again = register(ca_dir, tmp_path / "out")
    assert again.certificate_pem == creds.certificate_pem
    assert again_registrar.ca.pem == registrar.ca.pem
    # a lost key means a new certificate
    (tmp_path / "out" / creds.thing_name / PRIVATE_KEY_FILE).unlink()
    _, third = register(ca_dir, tmp_path / "out")
    assert third.certificate_pem != creds.certificate_pem


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.crt").write_text("x")
    with pytest.raises(RegistrationError, match="ca.key does not"):
        register(tmp_path / "ca", tmp_path / "out")


def config(tmp_path: Path, kind: str) -> Config:
    return Config(path=tmp_path / "station.toml", station=StationSection(),
                  ports=PortsSection(), firmware=FirmwareSection("esp32", None, ()),
                  identity=IdentitySection(), worker=WorkerSection(),
                  registrar=RegistrarSection(kind=kind,  # type: ignore[arg-type]
                                             local_ca=LocalCaSection(dir=tmp_path / "ca")),
                  credentials=CredentialsSection(out_dir=tmp_path / "out"))


def test_make_registrar_kinds(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "out")
    none = make_registrar(config(tmp_path, "none"), store)
    assert none.kind == "none"
    assert asyncio.run(none.register(board(1), MemoryJournal().for_board(board(1)))) is None
    assert make_registrar(config(tmp_path, "local-ca"), store).kind == "local-ca"
    assert make_registrar(config(tmp_path, "aws-iot"), store).kind == "aws-iot"


# -- Mosquitto -----------------------------------------------------------------------------


def mqtt_connect(port: str | int, ca_file: Path, cert: Path, key: Path, client_id: str) -> int:
    """TLS with client auth, MQTT 3.1.1 CONNECT; returns CONNACK's return code."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"
    payload = len(cid).to_bytes(2, "big") + cid
    body = variable + payload
    packet = b"\x10" + bytes([len(body)]) + body
    with socket.create_connection(("127.0.0.1", int(port)), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(packet)
        reply = b""
        while len(reply) < 4:
            chunk = tls.recv(4 - len(reply))
            if not chunk:
                raise ConnectionError(f"broker closed the connection after {reply!r}")
            reply += chunk
    assert reply[0] == 0x20, reply
    return reply[3]


def test_mosquitto_accepts_our_certificate_and_refuses_another_ca(tmp_path: Path) -> None:
    registrar, creds = register(tmp_path / "ca", tmp_path / "out")
    folder = tmp_path / "out" / creds.thing_name
    with mosquitto(tmp_path, registrar.ca) as broker:
        port = broker.port
        assert mqtt_connect(port, tmp_path / "ca.crt", folder / "certificate.pem.crt",
                            folder / PRIVATE_KEY_FILE, creds.thing_name) == 0
        # a certificate from another CA for the same name is refused in the handshake
        _, foreign = register(tmp_path / "other-ca", tmp_path / "other-out")
        other = tmp_path / "other-out" / foreign.thing_name
        with pytest.raises((ssl.SSLError, ConnectionError)):  # "unknown ca"
            mqtt_connect(port, tmp_path / "ca.crt", other / "certificate.pem.crt",
                         other / PRIVATE_KEY_FILE, foreign.thing_name)
