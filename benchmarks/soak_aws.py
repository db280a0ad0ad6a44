"""The soak's cloud: a moto server, and a loopback proxy in front of it that misbehaves.

The station talks to the proxy as if it were AWS IoT; the invariant checker talks to
moto directly. The proxy can:

* answer a share of calls with `ThrottlingException` (HTTP 400), as AWS does past a quota;
* answer a share with a 5xx: half of them *before* forwarding (AWS refused the call), half
  *after* (AWS did the work and the reply was lost), which is what makes retries of
  non-idempotent calls (CreateCertificateFromCsr, CreateThing) interesting;
* go away: the listening socket is closed, so new connections are refused, and kept-alive
  connections are dropped at their next request; `up()` listens again on the same port;
* add a fixed latency to every call (the registration benchmark's far-away cloud);
* drop `setAsActive` from CreateCertificateFromCsr, so moto creates the certificate
  INACTIVE as AWS does (MOTO-NOTES #2).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

START_TIMEOUT = 30.0
UPSTREAM_TIMEOUT = 60.0
REGION = "eu-west-1"
POLICY = Path(__file__).resolve().parents[1] / "config" / "aws-iot-policy.json"


def registrar_toml(endpoint: str, policy_name: str, more: str = "") -> str:
    """[registrar] for AWS IoT at ``endpoint`` (moto, or a proxy in front of it), the
    repository's device policy; ``more``: lines for [registrar.aws]. One text for the
    soak's station and the tests' lines."""
    return f"""[registrar]
kind = "aws-iot"
[registrar.aws]
region = "{REGION}"
endpoint_url = "{endpoint}"
policy_name = "{policy_name}"
policy_document = {json.dumps(str(POLICY))}
{more}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server(log_path: str | None = None) -> Iterator[str]:
    """`python -m moto.server` on a loopback port of its own choosing; yields its URL;
    always stopped. The server binds port 0 and we read the port from its "Running on"
    line: a port picked here and bound there could be taken in between (another server,
    or a client's ephemeral port, even this function's own readiness probe connecting to
    itself), leaving a test talking to nobody."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
    drain: threading.Thread | None = None
    try:
        try:
            port = _listening_port(proc, log)
        except BaseException:
            if log is not None:
                log.close()
            raise
        # keep reading its request log, or the server blocks on a full pipe
        drain = threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True)
        drain.start()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if drain is not None:
            drain.join(timeout=10)  # the pipe's end: the server has exited
        proc.stdout.close()


def _listening_port(proc: subprocess.Popen[bytes], log: Any) -> int:
    """The port in the server's "Running on http://127.0.0.1:PORT" line (read from the
    pipe's descriptor: a buffered readline could hold that line where select cannot see it)."""
    assert proc.stdout is not None
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise TimeoutError(f"moto server did not say where it listens in {START_TIMEOUT}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"moto server exited with {proc.wait(timeout=10)}")
        if log is not None:
            log.write(chunk)
        seen += chunk
        found = re.search(rb"Running on http://127\.0\.0\.1:(\d+)", seen)
        if found:
            return int(found.group(1))


def _drain(stream: Any, log: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            if log is not None:
                log.write(line)
                log.flush()
    if log is not None:
        log.close()


def operation(method: str, path: str) -> str:
    """A coarse name for a request (method and first path part), for the counters."""
    first = path.strip("/").split("/", 1)[0] or "/"
    return f"{method} /{first}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-reply (a SIGKILLed station) is not news."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FaultyProxy:
    """A loopback HTTP proxy to `target` with throttling, 5xx and outage faults."""

    def __init__(self, target: str, *, throttle_share: float = 0.0, error_share: float = 0.0,
                 seed: int = 0, drop_set_as_active: bool = True, latency: float = 0.0) -> None:
        parsed = urllib.parse.urlsplit(target)
        self.host, self.port_to = str(parsed.hostname), int(parsed.port or 80)
        self.throttle_share = throttle_share
        self.error_share = error_share
        self.drop_set_as_active = drop_set_as_active
        self.latency = latency  # seconds added to every call, as a far-away region would
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()  # throttled, 5xx_before, 5xx_after, dropped
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.port = 0  # the first up() takes a free port; later ones listen there again
        self._down = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> FaultyProxy:
        self.up()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop_listening()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_down(self) -> bool:
        return self._down

    def up(self) -> None:
        """Listen (again) on the proxy's port."""
        with self._lock:
            self._down = False
        if self._server is not None:
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                server = _Server(("127.0.0.1", self.port), self._handler())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the port is still being released: retry to a deadline
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="soak-aws-proxy",
                                        daemon=True)
        self._thread.start()

    def down(self) -> None:
        """AWS goes away: refuse new connections, drop kept-alive ones at their next call."""
        with self._lock:
            self._down = True
        self._stop_listening()

    def _stop_listening(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    # -- faults ---------------------------------------------------------------------

    def _decide(self, op: str) -> str | None:
        with self._lock:
            self.calls[op] += 1
            if self._down:
                self.injected["dropped"] += 1
                return "drop"
            draw = self._random.random()
            if draw < self.throttle_share:
                self.injected["throttled"] += 1
                return "throttle"
            if draw < self.throttle_share + self.error_share:
                kind = "5xx_after" if self._random.random() < 0.5 else "5xx_before"
                self.injected[kind] += 1
                return kind
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def _error(self, status: int, code: str, message: str) -> None:
                payload = json.dumps({"message": message}).encode()
                self.send_response(status)
                self.send_header("x-amzn-ErrorType", f"{code}:")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _forward(self, path: str, body: bytes) -> tuple[int, list[tuple[str, str]],
                                                                bytes]:
                conn = http.client.HTTPConnection(proxy.host, proxy.port_to,
                                                  timeout=UPSTREAM_TIMEOUT)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "connection")}
                    conn.request(self.command, path, body=body, headers=headers)
                    reply = conn.getresponse()
                    return reply.status, reply.getheaders(), reply.read()
                finally:
                    conn.close()

            def _any(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                op = operation(self.command, url.path)
                if proxy.latency:
                    time.sleep(proxy.latency)  # the modelled round trip, not a wait for state
                fault = proxy._decide(op)
                if fault == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "throttle":
                    self._error(400, "ThrottlingException", f"injected throttling of {op}")
                    return
                if fault == "5xx_before":
                    self._error(503, "ServiceUnavailableException", f"injected 503 for {op}")
                    return
                path = self.path
                if self.command == "POST" and url.path.rstrip("/") == "/certificates" \
                        and proxy.drop_set_as_active:
                    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                    query.pop("setAsActive", None)
                    path = url.path + ("?" + urllib.parse.urlencode(query, doseq=True)
                                       if query else "")
                status, headers, data = self._forward(path, body)
                if fault == "5xx_after":  # AWS did it; the reply is lost on the way back
                    self._error(500, "InternalFailureException", f"injected 500 for {op}")
                    return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                         "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

        return Handler
