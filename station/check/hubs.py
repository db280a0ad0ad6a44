"""`station check`'s look at the hub hosts: is each `[ports] remote` URL served, now?

`run` copes with a dead hub host (it retries with backoff and the other ports go on), so
`check` is where a person setting up a line learns that a hub is off, firewalled or
serves something other than RFC 2217, before the shift rather than from a silent row.
That forced the design:

- Every wait is bounded: a TCP connect with a short timeout (a host that drops packets
  never answers at all), then an RFC 2217 negotiation with pyserial's own client, given
  the same kind of timeout through its URL option (`?timeout=`, its "network timeout";
  pyserial's connect has a fixed 5 s of its own, reached only if the host vanishes
  between our connect and its). The URLs are probed together on threads, so ten dead
  hub hosts cost one timeout, not ten.
- The negotiation must not reset a board: a relay whose client sets DTR then RTS, or
  drops them one at a time when it leaves (esp_rfc2217_server does `dtr = False;
  rts = False`), passes through "RTS alone", which on a devkit's auto-reset circuit
  pulls EN low. The probe sets both lines released before opening, so pyserial sends
  "DTR off, RTS off" and the relay's close finds nothing to change. (esptool's
  `esp_rfc2217_server` raises RTS then DTR on every client's connect, a reset nothing
  on the client side can prevent; it also answers no DTR/RTS change, so the probe does
  not wait for those answers.)
- A relay serves one client at a time: one that accepts the TCP connection but never
  negotiates (its client is elsewhere, e.g. a running station holds the port) or closes
  it at once is reported as such, with the likely cause, rather than as "unreachable".
- The OS error is the message (`connection refused`, `no route to host`, a name that
  does not resolve): it names what to fix on the network, not in the station.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import serial
from serial import rfc2217

from station.ports import PROBE_TIMEOUT, host_port

NEGOTIATE_TIMEOUT = 2.0
"""Seconds a hub that accepted TCP may take to agree on RFC 2217 (a LAN answers in ms)."""
FIRST_ATTEMPT = 0.5
"""Seconds for the first negotiation: a relay still busy with our TCP probe turns it away."""
CLOSE_GRACE = 10.0
"""pyserial's close joins its reader for up to 7 s and then pauses 0.3 s: our bound on it."""


@dataclass(frozen=True)
class HubProbe:
    """What one remote port's hub host answered: `problem` is None when it served RFC 2217."""

    url: str
    problem: str | None
    seconds: float

    def line(self) -> str:
        if self.problem is None:
            return f"{self.url}: ok (RFC 2217 in {self.seconds:.2f} s)"
        return f"{self.url}: {self.problem}"


def _os_reason(e: OSError) -> str:
    """`connection refused`, `no route to host`, `Name or service not known`..."""
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host ({e.strerror or e})"
    text = e.strerror or str(e) or type(e).__name__
    return text[:1].lower() + text[1:]


def _connect(url: str, timeout: float) -> str | None:
    host, port = host_port(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s (host off, or a firewall drops the packets)"
    except OSError as e:
        return _os_reason(e)


class _Client(rfc2217.Serial):
    """pyserial's RFC 2217 client, noting whether the far end closed the connection (its
    reader ends on EOF while the port is still open; `close` forgets the thread)."""

    far_end_closed = False

    def _telnet_read_loop(self) -> None:
        super()._telnet_read_loop()
        if self.is_open:
            self.far_end_closed = True


BUSY = ("accepts TCP but closes the connection at once (the relay serves one client: "
        "another one, e.g. a running station, holds this port?)")


def _negotiate(url: str, timeout: float) -> str | None:
    """Open the port with pyserial's RFC 2217 client, lines released, and close it.

    A relay still closing our TCP probe's connection turns the next one away at once
    (one client at a time), and pyserial then waits out its whole timeout: so the first
    attempt gets FIRST_ATTEMPT, the next ones what is left of `timeout`."""
    deadline = time.monotonic() + timeout
    attempt = min(FIRST_ATTEMPT, timeout)
    while True:
        port = _Client(None, timeout=0)  # not opened yet
        port.dtr = False  # both lines released before the open: see the module docstring
        port.rts = False
        # esp_rfc2217_server answers no DTR/RTS change (it runs resets itself): do not
        # wait for those answers, the telnet negotiation is the proof of RFC 2217
        port.port = f"{url}?timeout={attempt:.2f}&ign_set_control"
        attempt = max(0.1, deadline - time.monotonic() - attempt)
        try:
            port.open()
        except (BrokenPipeError, ConnectionResetError):  # turned away while we spoke
            with contextlib.suppress(Exception):
                port.close()
            port.far_end_closed = True
        except serial.SerialException as e:
            if "does not seem to support RFC2217" not in str(e):
                cause = e.__cause__ or e.__context__
                if isinstance(cause, OSError):
                    return _os_reason(cause)
                return f"RFC 2217 open failed: {' '.join(str(e).split())}"
        else:
            with contextlib.suppress(Exception):
                port.close()
            return None
        if time.monotonic() >= deadline:
            return BUSY if port.far_end_closed else (
                f"accepts TCP but no RFC 2217 answer within {timeout:g} s (not an RFC 2217 "
                "server, or busy with another client)")


def probe(url: str, connect_timeout: float = PROBE_TIMEOUT,
          negotiate_timeout: float | None = NEGOTIATE_TIMEOUT) -> HubProbe:
    """One URL: TCP, then (unless `negotiate_timeout` is None) RFC 2217."""
    start = time.monotonic()
    try:
        problem = _connect(url, connect_timeout)
        if problem is None and negotiate_timeout is not None:
            problem = _negotiate(url, negotiate_timeout)
    except OSError as e:  # any other socket error on the way: the network's answer
        problem = _os_reason(e)
    return HubProbe(url, problem, time.monotonic() - start)


def probe_hubs(urls: Sequence[str], connect_timeout: float = PROBE_TIMEOUT,
               negotiate_timeout: float | None = NEGOTIATE_TIMEOUT) -> list[HubProbe]:
    """Every URL at once, in config order; never longer than the sum of the timeouts
    and pyserial's close (a probe still running then is reported as not answering)."""
    if not urls:
        return []
    bound = connect_timeout + (negotiate_timeout or 0) + 5.0 + CLOSE_GRACE
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(urls)),
                                                 thread_name_prefix="hubcheck")
    try:
        futures = [pool.submit(probe, u, connect_timeout, negotiate_timeout) for u in urls]
        concurrent.futures.wait(futures, timeout=bound)
        return [f.result() if f.done() else
                HubProbe(u, f"no answer within {bound:g} s", bound)
                for u, f in zip(urls, futures, strict=True)]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
