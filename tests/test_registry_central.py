"""The device registry's id reaches the central ledger: `station board MAC` shows it.

A real `station run` (local CA, a Bodh registry of tests/registrykit.py) ships to a real
PostgreSQL (central schema 5); `station board MAC` reads it back as a supervisor would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from station.demo import make_demo_firmware
from station.sim import Rig
from tests.centralkit import CentralLine, mac_hex
from tests.pgkit import central_db, pg  # noqa: F401  (fixtures)
from tests.registrykit import bodh
from tests.test_registry_station import KEY

pytestmark = pytest.mark.timeout(240)

REGISTRAR = '[registrar]\nkind = "local-ca"\n[registrar.local_ca]\ndir = "ca"\n'


def test_station_board_shows_the_registrys_id(tmp_path: Path, central_db: str) -> None:  # noqa: F811
    firmware = make_demo_firmware(tmp_path / "fw", chip="esp32", app_size=20_000)
    with Rig(tmp_path / "rig", seed=23, throttle=False, flash_timing=False) as rig, \
            bodh(KEY) as registry:
        board = rig.plug(chip="esp32")
        line = CentralLine(root=tmp_path / "line", name="line-7", firmware=firmware,
                           central=central_db, rig=rig, registrar=REGISTRAR,
                           extra=f'[registry]\nkind = "bodh"\nurl = "{registry.url}"\n')
        line.env["BODH_API_KEY"] = KEY
        try:
            line.start("--exit-after", "1")
            assert line.wait() == 0, line.output()[-3000:]
        finally:
            line.kill()
        thing = f"line-7-{mac_hex(board)}"
        assert registry.created == {thing: 1}
        shown = line.command("board", board.mac, env={"COLUMNS": "200"})  # no folding
        assert shown.returncode == 0, shown.stderr
        assert "registry" in shown.stdout and f"registered {thing}" in \
            " ".join(shown.stdout.split()), shown.stdout
        as_json = json.loads(line.command("board", board.mac, "--format", "json").stdout)
        [job] = as_json["jobs"]
        assert (job["registry"], job["registry_id"], job["result"]) == \
            ("registered", thing, "done"), job
