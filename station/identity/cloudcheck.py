"""[verify] cloud: before a board leaves the line, its own new certificate and key open an
MQTT session on the broker it will use, as it will: client id = its thing name.

A certificate the registrar left INACTIVE, a policy that does not allow the connect or
the publish, a wrong endpoint or CA: found here, with the broker's reason, instead of in
the field. "connect" waits for the broker's CONNACK; "publish" also sends one test
message (bodh_cli's `sendevent`, on MQTT) at QoS 1 and waits for its PUBACK.

Why it looks like this:
- paho-mqtt, MQTT 5: a v5 broker says why in reason codes (CONNACK "Not authorized",
  PUBACK 0x87 for a publish the ACL or policy denies), where 3.1.1 drops a denied
  publish silently. paho runs in a worker thread (`asyncio.to_thread`), driven by its
  own `loop()` with a deadline: no background thread is left behind.
- TLS 1.2 at most, as the board speaks it (ESP-IDF's esp-tls on mbedTLS offers TLS 1.2
  unless TLS 1.3 is enabled in menuconfig). It also makes the broker's verdict on the
  certificate deterministic: in TLS 1.2 the broker checks the client's certificate
  before its Finished, so a revoked or unknown certificate fails the handshake with the
  broker's alert ("certificate revoked", "unknown ca"). Under TLS 1.3 the client's
  handshake is over before the broker has looked, and the same refusal arrives later as
  a bare end of stream, whichever side reads first.
- The key goes to the TLS library through a file (Python's ssl loads no key from
  memory): a 0600 file in a 0700 temporary folder, removed when the check ends. It is
  never logged; messages name the thing, the broker and the reason only.
- A board whose key is not on the host (it never left the chip) cannot be checked here:
  the check says so and is skipped; the boot check is the proof then.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from station.config import CloudSection
from station.identity.registrar.base import BoardFacts
from station.parts import DeviceCredentials

MQTT_TLS_PORT = 8883
KEY_ABSENT = ("the board's private key is not on the host (it never leaves the chip): its "
              "boot check proves these credentials")


@dataclass(frozen=True)
class CloudVerdict:
    result: str  # "ok", "failed", "skipped"
    broker: str  # host:port
    client_id: str
    detail: str = ""


def broker_of(endpoint: str) -> tuple[str, int]:
    """"host" or "host:port" (an IPv6 literal in brackets) -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if sep and port.isdigit() and (not host.count(":") or host.endswith("]")):
        return host.strip("[]"), int(port)
    return endpoint.strip("[]"), MQTT_TLS_PORT


def alert_of(error: ssl.SSLError) -> str:
    """The broker's alert as words: SSLV3_ALERT_CERTIFICATE_REVOKED -> certificate revoked."""
    reason = (error.reason or "").lower()
    for prefix in ("sslv3_alert_", "tlsv1_alert_", "tlsv13_alert_"):
        if reason.startswith(prefix):
            return reason.removeprefix(prefix).replace("_", " ")
    return ""


def test_message(board: BoardFacts) -> bytes:
    """bodh_cli's test event, as the board would send it."""
    return json.dumps({"event": {"device_id": board.thing_name, "data": {
        "station": board.station, "mac": board.identity.mac, "chip": board.identity.chip,
        "test": "station cloud check"}}}).encode()


class CloudCheck:
    """One MQTT session per board with the board's own credentials."""

    def __init__(self, section: CloudSection) -> None:
        self.section = section
        self.mode = section.mode

    async def check(self, credentials: DeviceCredentials, board: BoardFacts) -> CloudVerdict:
        return await asyncio.to_thread(self.check_blocking, credentials, board)

    def topic(self, board: BoardFacts) -> str:
        return self.section.topic.format(thing=board.thing_name, mac=board.identity.mac,
                                         chip=board.identity.chip, station=board.station)

    def check_blocking(self, credentials: DeviceCredentials, board: BoardFacts) -> CloudVerdict:
        endpoint = self.section.endpoint or credentials.endpoint
        host, port = broker_of(endpoint)
        broker = f"{host}:{port}"
        client_id = board.thing_name
        if not credentials.private_key_pem.strip():
            return CloudVerdict("skipped", broker, client_id, KEY_ABSENT)
        with tempfile.TemporaryDirectory(prefix="station-cloud-") as folder:
            try:
                context = self._context(credentials, Path(folder))
            except (ssl.SSLError, ValueError, OSError) as e:
                return CloudVerdict("failed", broker, client_id,
                                    f"the certificate or key cannot be used for TLS ({e})")
            detail = self._session(context, host, port, client_id, board)
        return CloudVerdict("ok" if detail is None else "failed", broker, client_id,
                            detail or "")

    def _context(self, credentials: DeviceCredentials, folder: Path) -> ssl.SSLContext:
        if self.section.ca_file is not None:
            context = ssl.create_default_context(cafile=str(self.section.ca_file))
        elif credentials.ca_pem:  # the local CA signed the broker's certificate too
            context = ssl.create_default_context(cadata=credentials.ca_pem)
        else:  # AWS IoT's ATS endpoints chain to Amazon Root CA 1, in the system's store
            context = ssl.create_default_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # as the board; see the docstring
        cert, key = folder / "certificate.pem", folder / "private.key"
        cert.write_text(credentials.certificate_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(credentials.private_key_pem)
        context.load_cert_chain(str(cert), str(key))
        return context

    def _session(self, context: ssl.SSLContext, host: str, port: int, client_id: str,
                 board: BoardFacts) -> str | None:
        """None when the broker accepted all; else why not, in the broker's words."""
        timeout = self.section.timeout
        seen: dict[str, ReasonCode | str] = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        client.tls_set_context(context)
        client.connect_timeout = timeout
        def note(key: str) -> Callable[..., None]:
            def callback(*args: Any) -> None:  # (client, userdata, flags|mid, rc, props)
                seen.setdefault(key, args[3])
            return callback

        client.on_connect = note("connack")
        client.on_disconnect = note("gone")
        client.on_publish = note("puback")
        where = f"{host}:{port}"
        try:
            client.connect(host, port, keepalive=max(5, round(timeout * 2)))
        except ssl.SSLCertVerificationError as e:
            return (f"the broker at {where} is not the one expected: {e.verify_message} "
                    "(check [verify] cloud_ca and the endpoint)")
        except ssl.SSLError as e:
            alert = alert_of(e)
            if alert:
                return f"the broker at {where} refused the board's certificate: {alert}"
            return f"TLS with the broker at {where} failed: {e.reason or e}"
        except OSError as e:
            return f"cannot reach the broker at {where}: {e.strerror or e}"
        try:
            if not self._until(client, seen, "connack", timeout):
                return self._silent(seen, where, "CONNACK", timeout)
            connack = seen["connack"]
            if isinstance(connack, ReasonCode) and connack.is_failure:
                return f"the broker at {where} refused the MQTT connect of {client_id}: " \
                       f"{connack} (0x{connack.value:02x})"
            if self.mode != "publish":
                return None
            topic = self.topic(board)
            client.publish(topic, test_message(board), qos=1)
            if not self._until(client, seen, "puback", timeout):
                return self._silent(seen, where, f"PUBACK for {topic}", timeout)
            puback = seen["puback"]
            if isinstance(puback, ReasonCode) and puback.is_failure:
                return f"the broker at {where} refused the test message on {topic}: " \
                       f"{puback} (0x{puback.value:02x})"
            return None
        finally:
            if "gone" not in seen:
                client.disconnect()
                self._until(client, seen, "gone", 1.0)

    @staticmethod
    def _until(client: mqtt.Client, seen: dict[str, ReasonCode | str], what: str,
               timeout: float) -> bool:
        """Run paho's loop until `what` is seen (or the broker hung up); True if seen."""
        deadline = time.monotonic() + timeout
        while what not in seen and "gone" not in seen and time.monotonic() < deadline:
            if client.loop(timeout=0.05) not in (mqtt.MQTT_ERR_SUCCESS,):
                seen.setdefault("gone", "the connection was lost")
        return what in seen

    @staticmethod
    def _silent(seen: dict[str, ReasonCode | str], where: str, what: str,
                timeout: float) -> str:
        if "gone" in seen:
            return (f"the broker at {where} closed the connection before its {what} "
                    f"({seen['gone']}); AWS IoT does this when the policy does not allow "
                    "the client id or topic, or the certificate is not ACTIVE")
        return f"no {what} from the broker at {where} within {timeout:g} s"


def make_cloud_check(section: CloudSection) -> CloudCheck | None:
    return None if section.mode == "off" else CloudCheck(section)
