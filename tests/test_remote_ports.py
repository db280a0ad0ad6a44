"""Remote ports (issue 10): boards on hub hosts, reached over RFC 2217.

The real `station` command in a subprocess, real esptool, virtual boards. A hub host
that cannot be reached must show (dashboard line, `station ports`) and never hold up the
local ports.
"""

from __future__ import annotations

import socket

import pytest

from station.daemon import EXIT_OK
from station.sim import Rig
from tests.test_bad_inputs import Site, firmware, rig, site  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(180)


def closed_url() -> str:
    """An rfc2217:// URL on which nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"rfc2217://127.0.0.1:{port}"


def test_an_unreachable_hub_host_shows_and_local_ports_keep_flashing(site: Site,
                                                                       rig: Rig) -> None:
    dead = closed_url()
    site.set("ports", "remote", [dead])
    ports = site.cli("ports")
    assert ports.code == EXIT_OK, ports
    assert f"{dead}  (hub host unreachable: 127.0.0.1:" in ports.stdout, ports
    boards = [rig.plug(chip="esp32") for _ in range(2)]
    result = site.run(len(boards))
    assert result.code == EXIT_OK, result
    assert f"hub {dead}: down (127.0.0.1:" in result.stdout, result
    rows = site.rows_by_port()
    assert sorted(rows) == sorted(b.port for b in boards), rows
    assert {row["result"] for row in rows.values()} == {"done"}, rows
