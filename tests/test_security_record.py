"""Each board's security state on record everywhere a person looks (issue 20): a real
locking `station run` ships to a real PostgreSQL (central schema 6); `station board MAC`,
the night report (local and `--central`) and the central jobs show the mode, the key's
hash (never the key), the signing key's digest, the eFuse batches and the lock-down."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from station.daemon import EXIT_OK
from station.fleet import central
from tests.pgkit import PASSWORD, central_db, pg, pg_env  # noqa: F401  (fixtures)
from tests.securekit import burned_key_file, efuse_file, mac_of, make_line

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CHIP = "esp32c3"
MODE = "flash encryption release (host key), secure boot v2, lock-down"


def test_the_security_state_reaches_the_central_ledger_board_and_report(
        tmp_path: Path, central_db: str) -> None:  # noqa: F811
    line = make_line(tmp_path, chips=(CHIP,))
    line.extra["ledger"] = {"central": central_db}
    line.env = pg_env(base=line.env)  # keeps the pty lines' PYTHONPATH
    with line.rig() as rig:
        boards = [rig.plug(chip=CHIP) for _ in range(2)]
        result = line.run(len(boards))
        keys = [burned_key_file(CHIP, efuse_file(rig, b), tmp_path / f"{mac_of(b)}.key")
                for b in boards]
    assert result.code == EXIT_OK, str(result)
    local = {r["mac"]: r for r in line.ledger()}

    with psycopg.connect(central_db, password=PASSWORD) as conn:
        assert conn.execute("SELECT max(version) FROM station_schema").fetchone() == \
            (central.SCHEMA_VERSION,)
        shipped = {r[0]: r[1:] for r in conn.execute(
            "SELECT mac, security, key_fingerprint, signing_digest, efuses, lockdown "
            "FROM jobs WHERE station = 'line-1'")}
    for board in boards:
        row = local[mac_of(board)]
        assert shipped[mac_of(board)] == (MODE, row["key_fingerprint"], row["signing_digest"],
                                          row["efuses"], 1), shipped

    board = boards[0]
    shown = line.cli("board", board.mac, env={"COLUMNS": "400"})  # no folding
    assert shown.code == 0, shown
    text = " ".join(shown.stdout.split())
    fp = local[mac_of(board)]["key_fingerprint"]
    digest = local[mac_of(board)]["signing_digest"]
    assert f"{MODE}; LOCKED; eFuses: key, images, encrypt, secure_boot, lockdown; key {fp}; " \
           f"signing digest {digest[:16]}" in text, shown.stdout
    [job] = json.loads(line.cli("board", board.mac, "--format", "json").stdout)["jobs"]
    assert (job["security"], job["lockdown"], job["key_fingerprint"]) == (MODE, 1, fp), job

    for where in ((), ("--central",)):
        md = line.cli("report", *where, "--format", "md", "--out", "-")
        assert md.code == 0, md
        assert f"| locked boards ({MODE}): done / lock-down burned / failed | 2 / 2 / 0 |" \
            in md.stdout, md.stdout
    everything = shown.stdout + (line.state / "station.log").read_text() + \
        (line.state / "events.jsonl").read_text() + result.stdout + result.stderr
    for key in keys:  # the burned keys are in no table, log or event
        assert key.read_bytes().hex() not in everything
