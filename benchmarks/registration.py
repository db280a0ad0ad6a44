"""Registration hidden behind flashing: 16 boards with `kind = "aws-iot"` against a
moto server behind a loopback proxy that adds 150 ms to every call, against the same
16 boards with `kind = "none"`.

The worker registers while the common images are written, so the per-board time should
grow only by the credentials partition's line time and whatever registration is left
when the flash ends (`register` in the timings). Run alone:
`python benchmarks/registration.py`.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import statistics
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import common

BOARDS = 16
LATENCY_S = 0.150
ADDED_LIMIT_S = 0.5
MOTO_START_TIMEOUT = 60.0
FORWARD_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server(procs: common.Processes) -> Iterator[str]:
    """`python -m moto.server` on a free loopback port; yields its URL."""
    port = free_port()
    proc = procs.start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                        str(port)])
    deadline = time.monotonic() + MOTO_START_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"moto server did not listen within {MOTO_START_TIMEOUT:.0f}s")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        common.stop(proc, timeout=10)


class LatencyProxy:
    """A loopback HTTP proxy that holds every request `latency` seconds, then forwards."""

    def __init__(self, target: str, latency: float) -> None:
        parsed = urllib.parse.urlsplit(target)
        self.host, self.port_to = str(parsed.hostname), int(parsed.port or 80)
        self.latency = latency
        self.calls = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.calls += 1
                time.sleep(proxy.latency)
                conn = http.client.HTTPConnection(proxy.host, proxy.port_to,
                                                  timeout=FORWARD_TIMEOUT)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "connection")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
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


def aws_env(root: Any) -> dict[str, str]:
    """Dummy credentials; the host's ~/.aws is never read."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_CONFIG_FILE=str(root / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(root / "no-aws-credentials"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


def run(ctx: common.Context) -> dict[str, Any]:
    baseline = ctx.station(BOARDS)
    with common.Processes() as procs, moto_server(procs) as moto, \
            LatencyProxy(moto, LATENCY_S) as proxy:
        aws = {"region": "eu-west-1", "endpoint_url": proxy.url,
               "policy_document": str(common.ROOT / "config" / "aws-iot-policy.json"),
               "retry_mode": "standard", "max_attempts": 10}
        registered = ctx.station(BOARDS, "aws-iot", aws=aws, env=aws_env(ctx.root))
        calls = proxy.calls
    base = statistics.fmean(baseline.per_board())
    with_reg = statistics.fmean(registered.per_board())
    nvs = common.nvs_compressed_bytes(ctx.firmware)
    cloud = [j["timings"].get("register_cloud", 0.0) for j in registered.jobs]
    waited = [j["timings"].get("register", 0.0) for j in registered.jobs]
    added = with_reg - base
    return {
        "boards": BOARDS, "latency_per_call_s": LATENCY_S, "proxy_calls": calls,
        "calls_per_board": round(calls / BOARDS, 1),
        "per_board_s_none": round(base, 3), "per_board_s_aws": round(with_reg, 3),
        "added_per_board_s": round(added, 3),
        "register_cloud_s_mean": round(statistics.fmean(cloud), 3),
        "register_cloud_s_max": round(max(cloud), 3),
        "register_wait_after_flash_s_mean": round(statistics.fmean(waited), 4),
        "nvs_line_s": round(common.line_seconds(nvs), 3),
        "wall_s_none": round(baseline.wall_s, 2), "wall_s_aws": round(registered.wall_s, 2),
        "run_aws": registered.summary(),
        "targets": [common.target("registration adds s/board (150 ms/call)", added,
                                  ADDED_LIMIT_S, "<=", "s",
                                  note=f"cloud {statistics.fmean(cloud):.2f}s/board, "
                                       "overlapped with the flash"),
                    common.target("station peak RSS MB (16 boards, aws-iot)",
                                  registered.usage.max_rss_mb, 250.0, "<=", " MB",
                                  note="boto3 included")],
    }


if __name__ == "__main__":
    sys.exit(common.standalone("registration", run))
