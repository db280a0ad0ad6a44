"""`station check` probes every `[ports] remote` hub (station/check/hubs.py).

The real CLI in a subprocess against the virtual boards' RFC 2217 faces, a closed TCP
port, a listener that accepts and never speaks, and a face whose one client slot is
taken: each is named with its URL and what the network said, no wait is unbounded, and
probing a live board does not reset it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from station.check.hubs import NEGOTIATE_TIMEOUT
from station.daemon import EXIT_OK
from station.ports import host_port
from station.sim import Rig
from tests.test_bad_inputs import Site
from tests.test_remote_ports import closed_url

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A TCP port the kernel accepts on (backlog) but nothing ever answers: a hub host
    whose relay hangs, or a port that is not RFC 2217 at all."""
    with socket.create_server(("127.0.0.1", 0), backlog=4) as server:
        yield f"rfc2217://127.0.0.1:{server.getsockname()[1]}"


def hold(url: str) -> socket.socket:
    """A client on `url` that the relay is serving: its telnet greeting has arrived."""
    client = socket.create_connection(host_port(url), timeout=10)
    assert client.recv(64).startswith(b"\xff"), url  # IAC: the relay's option requests
    return client


def hubs_of(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("hub ")]


def test_check_names_each_unreachable_hub_and_never_hangs(site: Site, silent_url: str) -> None:
    dead = closed_url()
    with Rig(site.hub, seed=41, throttle=False, flash_timing=False, rfc2217_base=0) as rig:
        live, held = rig.plug(chip="esp32"), rig.plug(chip="esp32")
        assert live.rfc2217 and held.rfc2217
        holder = hold(held.rfc2217)  # as a running station holds its board's port
        try:
            urls = [live.rfc2217, dead, silent_url, held.rfc2217]
            site.set("ports", "watch", [str(site.hub / "none-*")])
            site.set("ports", "remote", urls)
            start = time.monotonic()
            result = site.cli("check")
            took = time.monotonic() - start
            resets = rig.resets(live)
        finally:
            holder.close()
    print(f"station check with 4 hubs: {took:.2f} s", *hubs_of(result.stdout), sep="\n")
    assert result.code == EXIT_OK, str(result)
    hubs = hubs_of(result.stdout)
    assert len(hubs) == 4, (result, took)
    assert hubs[0].startswith(f"hub         {live.rfc2217}: ok (RFC 2217 in "), hubs
    assert hubs[1] == f"hub         problem: {dead}: connection refused", hubs
    assert hubs[2] == (f"hub         problem: {silent_url}: accepts TCP but no RFC 2217 "
                       f"answer within {NEGOTIATE_TIMEOUT:g} s (not an RFC 2217 server, or "
                       "busy with another client)"), hubs
    assert hubs[3].startswith(f"hub         problem: {held.rfc2217}: accepts TCP but closes "
                              "the connection at once"), hubs
    assert resets == [], resets  # the probe opened and closed the live board's port
    # the probes run together: one negotiation timeout, python's start and the rest
    assert took < NEGOTIATE_TIMEOUT + 8.0, took
