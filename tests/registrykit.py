"""A real device registry for the tests: Bodh's API as bodh_cli uses it, over HTTP or HTTPS.

`BodhServer` answers `POST /api/devices` with body `{"device": {"id": ...}}` and header
`x-api-key` (github IoTReady/bodh_cli, bodh.py `register`): 201 and the device for a new
id, 422 `{"errors": {"id": ["has already been taken"]}}` for a known one (Bodh is a
Phoenix app; this is Ecto's unique-constraint answer, our reading: its server is not
public), 401 for a wrong key. Faults are scripted per request: 429 with Retry-After,
500, a slow answer, a connection dropped before the request is read, or after the
device was created but before the answer (the worst case for a client). It counts
what a registry would: devices created per id (never more than one), requests per id.

`DroppingProxy` is a TCP proxy in front of it that drops every other connection, at
once or after forwarding the request and losing the answer.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from station.identity.registrar.local_ca import LocalCa

WAIT = 60.0  # the longest a test thread waits on the server (a gate, a stop)

Fault = str | None
"""None (answer), "429", "500", "slow", "drop" (close before reading), "lose" (create,
then close without answering)."""


@dataclass
class BodhServer:
    """Bodh's device registry on 127.0.0.1; `url` is its base (https if `ca` is given)."""

    api_key: str
    ca: LocalCa | None = None
    faults: list[Fault] = field(default_factory=list)  # the next requests' faults, in order
    retry_after: str = "1"
    slow: float = 0.0  # seconds a "slow" answer takes
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: Counter[str] = field(default_factory=Counter)
    posts: Counter[str] = field(default_factory=Counter)
    answers: Counter[int] = field(default_factory=Counter)
    keys_seen: list[str] = field(default_factory=list)
    bodies: dict[str, Any] = field(default_factory=dict)  # the last body per device id
    hold: str | None = None  # a device id whose request waits for `release`
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> BodhServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=WAIT)

    def next_fault(self) -> Fault:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        context = None
        if self.ca is not None:
            cert, key = self.ca.server_certificate(["127.0.0.1", "localhost"])
            folder = Path(__import__("tempfile").mkdtemp(prefix="bodh-"))
            (folder / "server.crt").write_text(cert)
            (folder / "server.key").write_text(key)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(folder / "server.crt", folder / "server.key")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server: httpx pools

            def setup(self) -> None:
                if context is not None:  # the handshake in this thread, not the acceptor's
                    self.request.settimeout(WAIT)
                    self.request = context.wrap_socket(self.request, server_side=True)
                super().setup()

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()
                if context is not None:  # the server closes only the socket it accepted
                    self.request.close()

            def log_message(self, *_: Any) -> None:
                pass

            def handle_one_request(self) -> None:
                with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError):
                    super().handle_one_request()

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                server.handle(self)

        return Handler

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        fault = self.next_fault()
        if fault == "drop":  # gone before reading: the client sees no answer
            h.close_connection = True
            return
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        self.keys_seen.append(h.headers.get("x-api-key") or "")
        if h.path != "/api/devices":
            return self._answer(h, 404, {"errors": {"detail": "Not Found"}})
        if h.headers.get("x-api-key") != self.api_key:
            return self._answer(h, 401, {"errors": {"detail": "Unauthorized"}})
        try:
            device_id = json.loads(raw)["device"]["id"]
            assert isinstance(device_id, str) and device_id
        except (ValueError, KeyError, TypeError, AssertionError):
            return self._answer(h, 422, {"errors": {"device": ["is invalid"]}})
        with self._lock:
            self.posts[device_id] += 1
            self.bodies[device_id] = json.loads(raw)
        if self.hold == device_id and not self.held.is_set():
            self.held.set()
            self.release.wait(timeout=WAIT)
        if fault == "429":
            return self._answer(h, 429, {"errors": {"detail": "Too Many Requests"}},
                                {"Retry-After": self.retry_after})
        if fault == "500":
            return self._answer(h, 500, {"errors": {"detail": "Internal Server Error"}})
        if fault == "slow":
            time.sleep(self.slow)
        with self._lock:
            if device_id in self.devices:
                status, body = 422, {"errors": {"id": ["has already been taken"]}}
            else:
                self.devices[device_id] = {"id": device_id, "uuid": str(uuid.uuid4())}
                self.created[device_id] += 1
                status, body = 201, {"data": self.devices[device_id]}
        if fault == "lose":  # created, but the answer never leaves
            h.close_connection = True
            return
        self._answer(h, status, body)

    def _answer(self, h: BaseHTTPRequestHandler, status: int, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        with self._lock:
            self.answers[status] += 1
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


class DroppingProxy:
    """127.0.0.1:port -> target: every other connection is dropped, alternately at once
    ("refused") or after the request went through and before its answer ("lost")."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.counts: Counter[str] = Counter()
        self._n = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DroppingProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # wakes the blocked accept (close alone does not)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=WAIT)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self._n += 1
            fate = "passed" if self._n % 2 else ("refused" if self._n % 4 == 2 else "lost")
            self.counts[fate] += 1
            if fate == "refused":
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client, fate), daemon=True).start()

    def _serve(self, client: socket.socket, fate: str) -> None:
        with contextlib.suppress(OSError), client, socket.create_connection(
                ("127.0.0.1", self.target_port), timeout=WAIT) as upstream:
            client.settimeout(WAIT)
            up = threading.Thread(target=_pump, args=(client, upstream), daemon=True)
            up.start()
            if fate == "lost":
                upstream.recv(1)  # the server answered: the request went through
                client.shutdown(socket.SHUT_RDWR)
                return
            _pump(upstream, client)
            up.join(timeout=WAIT)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def bodh(api_key: str, ca: LocalCa | None = None, **kwargs: Any) -> Iterator[BodhServer]:
    with BodhServer(api_key=api_key, ca=ca, **kwargs) as server:
        yield server


def wait_until(what: str, ready: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll (the pause is the event's own wait) until `ready()`; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:g}s")
        pause.wait(0.05)
