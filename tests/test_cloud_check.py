"""[verify] cloud end to end: each board's own certificate and key on a real Mosquitto.

The broker is tests/mqttkit.py's (TLS with client certificates from the station's local
CA, the thing name as user, an ACL that lets a thing publish under things/<thing>/ only).
A subscriber of its own watches what arrives; the broker's log names every client id.
The failures are the broker's own verdicts: a revoked certificate (CRL), a certificate
from a CA it does not know, a publish its ACL denies; and a broker the station does not
trust. Under TLS 1.2 (what the check speaks, as the board does) the broker's alert
arrives in the handshake, so the reason asserted is always the broker's, never a race.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from station.config import CloudSection
from station.identity import BoardFacts, CloudCheck
from station.identity.registrar.keys import private_key_pem
from station.identity.registrar.local_ca import LocalCa
from station.parts import BoardIdentity, DeviceCredentials
from station.sim import PluggedBoard, Rig
from tests.mqttkit import Broker, mosquitto
from tests.test_bad_inputs import Site
from tests.test_registry_station import assert_no_secrets

pytestmark = pytest.mark.timeout(240)

ACL = "user subscriber\ntopic read things/#\n\npattern readwrite things/%u/#\n"
WAIT = 30.0


def thing(board: PluggedBoard) -> str:
    return board.mac.replace(":", "")


def use_broker(site: Site, broker: Broker, mode: str = "publish", **verify: Any) -> None:
    site.set("registrar.local_ca", "endpoint", broker.endpoint)
    site.set("verify", "cloud", mode)
    for key, value in verify.items():
        site.set("verify", key, value)


class Subscriber:
    """A client of the broker's own, on things/#, with a certificate of the same CA."""

    def __init__(self, broker: Broker, ca: LocalCa, folder: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = ca.sign("subscriber", key.public_key(), 1)
        (folder / "sub.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / "sub.key").write_text(private_key_pem(key))
        context = ssl.create_default_context(cafile=str(broker.folder / "ca.crt"))
        context.load_cert_chain(folder / "sub.crt", folder / "sub.key")
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="subscriber",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(context)
        self.client.on_connect = lambda c, *_: c.subscribe("things/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic, json.loads(m.payload)))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT), "the subscriber never subscribed"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ca(site: Site) -> LocalCa:
    """The station's local CA, made before the broker that trusts it."""
    return LocalCa.open(site.root / "ca")


@pytest.fixture
def broker(site: Site, ca: LocalCa) -> Iterator[Broker]:
    with mosquitto(site.root / "broker", ca, acl=ACL, verbose=True) as b:
        yield b


@pytest.mark.slow
def test_publish_sixteen_boards_sixteen_messages_from_sixteen_client_ids(
        site: Site, rig: Rig, ca: LocalCa, broker: Broker) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(16)]
    use_broker(site, broker)
    (site.root / "tmp").mkdir()
    site.env["TMPDIR"] = str(site.root / "tmp")  # where the check's key files come and go
    subscriber = Subscriber(broker, ca, site.root)
    try:
        result = site.run(len(boards))
        assert result.code == 0, str(result)
    finally:
        subscriber.close()
    things = sorted(thing(b) for b in boards)
    arrived = sorted(subscriber.messages)
    assert [topic for topic, _ in arrived] == [f"things/{t}/station-test" for t in things]
    assert [m["event"]["device_id"] for _, m in arrived] == things
    log = broker.log()
    published = {t for t in things if f"Received PUBLISH from {t} " in log}
    assert published == set(things), "the broker did not hear every thing as its own client"
    rows = site.ledger()
    assert {(r["result"], r["cloud"]) for r in rows} == {("done", "ok")}, rows
    assert all("cloud" in r["timings"] for r in rows)
    assert result.stdout.count(" cloud check publish ok as ") == 16
    report = site.cli("report", "--format", "md", "--out", "-")
    assert "| cloud check on the broker: ok / failed / skipped | 16 / 0 / 0 |" in \
        report.stdout, report.stdout[:2000]
    assert_no_secrets(site.root, result.stdout, result.stderr)  # no board's private key
    assert not list((site.root / "tmp").iterdir()), "a key file was left behind"


def revocation_list(ca: LocalCa, certificate_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(certificate_pem)
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(now - dt.timedelta(minutes=1)).next_update(now + dt.timedelta(days=1))
           .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                    .serial_number(cert.serial_number)
                                    .revocation_date(now - dt.timedelta(minutes=1)).build())
           .sign(ca.key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM)


def test_a_revoked_certificate_fails_the_board_with_the_brokers_reason(
        site: Site, rig: Rig, ca: LocalCa) -> None:
    board = rig.plug(chip="esp32")
    with mosquitto(site.root / "broker", ca, acl=ACL) as broker:
        use_broker(site, broker, "connect")
        first = site.run(1)
        assert first.code == 0, first
    # the operator revokes the board's certificate; the station hands out the same one
    certificate = (site.certs_out / thing(board) / "certificate.pem.crt").read_bytes()
    rig.unplug(board)
    board = rig.plug(chip=board.chip, mac=board.mac, index=board.index)
    with mosquitto(site.root / "broker2", ca, acl=ACL, crl=revocation_list(ca, certificate),
                   verbose=True) as broker:
        use_broker(site, broker, "connect")
        result = site.cli("run", "--headless", "--exit-after", "1", "--reflash")
        assert result.code == 3, str(result)
        assert "certificate verify failed" in broker.log()  # what Mosquitto itself says
    row = site.ledger()[-1]
    assert (row["result"], row["failed_stage"], row["cloud"]) == ("failed", "cloud", "failed")
    assert row["error"] == (f"cloud check (connect) as {thing(board)}: the broker at "
                            f"{broker.endpoint} refused the board's certificate: certificate "
                            "revoked"), row


def other_ca_file(root: Path) -> Path:
    other = LocalCa.open(root / "other-ca")
    path = root / "other-ca.crt"
    path.write_text(other.pem)
    return path


@pytest.mark.parametrize("case", ["board's CA unknown", "broker not trusted",
                                  "publish denied"])
def test_the_brokers_refusals_fail_the_board_naming_them(
        case: str, site: Site, rig: Rig, tmp_path: Path) -> None:
    board = rig.plug(chip="esp32")
    broker_ca = LocalCa.open(tmp_path / "broker-ca")
    verify: dict[str, Any] = {}
    if case == "board's CA unknown":  # the station's own CA signs; the broker trusts another
        (tmp_path / "broker-ca.crt").write_text(broker_ca.pem)
        verify["cloud_ca"] = tmp_path / "broker-ca.crt"
        expected = "refused the board's certificate: unknown ca"
    elif case == "broker not trusted":
        broker_ca = LocalCa.open(site.root / "ca")
        verify["cloud_ca"] = other_ca_file(tmp_path)
        expected = "is not the one expected: self-signed certificate in certificate chain " \
                   "(check [verify] cloud_ca and the endpoint)"  # OpenSSL's verify message
    else:
        broker_ca = LocalCa.open(site.root / "ca")
        verify["cloud_topic"] = "fleet/{thing}/hello"
        expected = f"refused the test message on fleet/{thing(board)}/hello: Not " \
                   "authorized (0x87)"
    with mosquitto(tmp_path / "broker", broker_ca, acl=ACL) as broker:
        use_broker(site, broker, **verify)
        result = site.run(1)
    assert result.code == 3, str(result)
    [row] = site.ledger()
    assert (row["failed_stage"], row["cloud"]) == ("cloud", "failed"), row
    assert expected in row["error"], row
    assert f"cloud check publish failed as {thing(board)} at {broker.endpoint}" in \
        result.stdout


def test_a_key_that_is_not_on_the_host_is_skipped_with_the_reason() -> None:
    check = CloudCheck(CloudSection(mode="connect"))
    board = BoardFacts(identity=BoardIdentity("esp32s3", "24a160000001"),
                       thing_name="t1", station="s", firmware_hash="")
    verdict = check.check_blocking(DeviceCredentials(
        thing_name="t1", certificate_pem="-", private_key_pem="", public_key_pem="-",
        endpoint="broker.example:8883"), board)
    assert (verdict.result, verdict.broker, verdict.client_id) == \
        ("skipped", "broker.example:8883", "t1")
    assert "not on the host" in verdict.detail and "boot check" in verdict.detail
