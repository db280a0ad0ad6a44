"""Test helpers: a loopback proxy in front of a moto server (the server itself is the
soak's `moto_server`, re-exported here).

The proxy names each request's IoT operation (from botocore's own service model), counts
them, and can misbehave like AWS does: answer a share of calls with ThrottlingException,
deny chosen actions with AccessDeniedException (or any other error), and drop
`setAsActive` from CreateCertificateFromCsr so moto creates the certificate INACTIVE as
AWS does (MOTO-NOTES #2). With `from_csr`, CreateCertificateFromCsr is answered as AWS
answers it, with a certificate for the CSR's own key (moto's carries a key of its own,
MOTO-NOTES #1): the proxy signs one with a CA of its own and registers it in moto
(RegisterCertificateWithoutCA); `csrs` keeps every CSR it was sent.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import tempfile
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import botocore.session
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from benchmarks.soak_aws import free_port, moto_server
from station.identity.registrar.local_ca import LocalCa

__all__ = ["AwsProxy", "free_port", "moto_server", "reset_moto"]

def reset_moto(url: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    try:
        conn.request("POST", "/moto-api/reset")
        conn.getresponse().read()
    finally:
        conn.close()


class _Routes:
    """(method, path, query) -> IoT operation name, from botocore's model of the API."""

    def __init__(self) -> None:
        model = botocore.session.get_session().get_service_model("iot")
        self.routes: list[tuple[str, re.Pattern[str], set[str], int, str]] = []
        for name in model.operation_names:
            http_ = model.operation_model(name).http
            uri = http_["requestUri"]
            path, _, query = uri.partition("?")
            literal_query = {q.split("=")[0] for q in query.split("&") if q and "{" not in q}
            pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"
            pattern = pattern.replace(r"[^/]+\+", ".+")
            placeholders = path.count("{")
            self.routes.append((http_["method"], re.compile(pattern), literal_query,
                                placeholders, name))

    def name(self, method: str, path: str, query: dict[str, list[str]]) -> str:
        best: tuple[int, str] | None = None
        for m, pattern, needed, placeholders, name in self.routes:
            if m != method or not pattern.match(path) or not needed <= set(query):
                continue
            score = placeholders - 10 * len(needed)
            if best is None or score < best[0]:
                best = (score, name)
        return best[1] if best else f"{method} {path}"


ROUTES = _Routes()


class AwsProxy:
    """A loopback HTTP proxy to `target`; configure its faults, read `calls`."""

    def __init__(self, target: str, *, throttle_share: float = 0.0, seed: int = 4,
                 deny: dict[str, str] | None = None, drop_set_as_active: bool = True,
                 throttle_only: set[str] | None = None,
                 deny_if: Callable[[str, str], str | None] | None = None,
                 from_csr: bool = False) -> None:
        parsed = urllib.parse.urlsplit(target)
        self.host, self.port_to = str(parsed.hostname), int(parsed.port or 80)
        self.throttle_share = throttle_share
        self.throttle_only = throttle_only
        self.deny = dict(deny or {})  # operation -> error code
        self.deny_if = deny_if  # (operation, request path) -> error code or None
        self.drop_set_as_active = drop_set_as_active
        self.from_csr = from_csr
        self.csrs: list[str] = []
        self._ca: LocalCa | None = None
        self._ca_dir = tempfile.TemporaryDirectory(prefix="aws-proxy-ca-")
        self.calls: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()
        self.order: list[str] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> AwsProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._ca_dir.cleanup()

    def _issue(self, body: bytes, set_as_active: bool) -> tuple[str, bytes]:
        """CreateCertificateFromCsr as AWS answers it: a certificate for the CSR's key,
        registered in moto (RegisterCertificateWithoutCA); returns (path, body) of that
        call and keeps the certificate to put in the answer."""
        csr_pem = str(json.loads(body)["certificateSigningRequest"])
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid, "a CSR whose signature does not verify"
        with self._lock:
            self.csrs.append(csr_pem)
            if self._ca is None:
                self._ca = LocalCa.open(Path(self._ca_dir.name))
            ca = self._ca
        subject = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        cert = ca.sign(str(subject), csr.public_key(), 365)  # type: ignore[arg-type]
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        status = "ACTIVE" if set_as_active else "INACTIVE"
        return pem, json.dumps({"certificatePem": pem, "status": status}).encode()

    def _decide(self, op: str, path: str = "") -> str | None:
        with self._lock:
            self.calls[op] += 1
            self.order.append(op)
            if op in self.deny:
                return self.deny[op]
            if self.deny_if is not None:
                fault = self.deny_if(op, path)
                if fault is not None:
                    return fault
            eligible = self.throttle_only is None or op in self.throttle_only
            if eligible and self.throttle_share and self._random.random() < self.throttle_share:
                self.throttled[op] += 1
                return "ThrottlingException"
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The answer goes out as two writes (headers, then body): with Nagle's
            # algorithm on, the body waits for the client's delayed ACK, ~40-50 ms a call
            # that AWS does not cost (it was most of a station run's AWS time in tests).
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                return None

            def _any(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                op = ROUTES.name(self.command, urllib.parse.unquote(url.path), query)
                fault = proxy._decide(op, urllib.parse.unquote(url.path))
                if fault is not None:
                    status = 400 if fault != "AccessDeniedException" else 403
                    payload = json.dumps({"message": f"injected {fault} for {op}"}).encode()
                    self.send_response(status)
                    self.send_header("x-amzn-ErrorType", f"{fault}:")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                path = self.path
                if op == "CreateCertificateFromCsr" and proxy.drop_set_as_active:
                    query.pop("setAsActive", None)
                    path = url.path + ("?" + urllib.parse.urlencode(query, doseq=True)
                                       if query else "")
                issued = ""
                if op == "CreateCertificateFromCsr" and proxy.from_csr:
                    active = query.get("setAsActive", ["false"])[0] == "true"
                    issued, body = proxy._issue(body, active)
                    path = "/certificate/register-no-ca"
                    self.headers.replace_header("Content-Length", str(len(body)))
                conn = http.client.HTTPConnection(proxy.host, proxy.port_to, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "connection")}
                    conn.request(self.command, path, body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                    if issued and reply.status == 200:  # the answer AWS would give
                        data = json.dumps({**json.loads(data),
                                           "certificatePem": issued}).encode()
                    self.send_response(reply.status)
                    for k, v in reply.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection",
                                             "content-length", "server", "date"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

        return Handler
