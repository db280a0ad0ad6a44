"""Issue 12's bad inputs: what a person can get wrong about the central ledger.

A refusal (malformed URL, a password in station.toml, wrong credentials, a schema newer
than the station) is one clear line at start, and `station check` says the same line.
PostgreSQL merely unreachable at start is not a refusal: the station runs, buffers in
its local ledger and says so (log line, dashboard footer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from station.demo import make_demo_firmware
from station.fleet import ReplicationStatus, central
from station.screen import StationView, render
from station.sim import Rig
from tests.centralkit import CentralLine
from tests.pgkit import Cluster, central_db, free_port, pg, pg_env  # noqa: F401

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=20_000)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "rig", seed=9, throttle=False, flash_timing=False) as r:
        yield r


def line_for(tmp_path: Path, firmware: Path, rig: Rig, central: str) -> CentralLine:
    return CentralLine(root=tmp_path / "line", name="line-x", firmware=firmware,
                       central=central, rig=rig)


def one_line(line: CentralLine, *args: str, env: dict[str, str] | None = None,
             code: int = 2) -> str:
    """`station run` and `station check` both fail with this one stderr line."""
    run = line.command("run", "--headless", "--exit-after", "1", *args, env=env)
    check = line.command("check", env=env)
    for result in (run, check):
        assert result.returncode == code, (result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
    assert run.stderr == check.stderr
    return run.stderr.strip()


@pytest.mark.parametrize(("central", "says"), [
    ("http://db.example/factory", "ledger.central: http:// is not PostgreSQL"),
    ("postgresql://station@[::1/factory", "ledger.central: not a PostgreSQL URL or conninfo"),
    ("postgresql://station@db.example:54x/factory", "ledger.central: port '54x' is not a TCP"),
    ("postgresql://station:s3cret@db.example/factory", "ledger.central: passwords never go "
     "in station.toml: set PGPASSWORD"),
    ("postgresql://station@db.example/factory?password=s3cret", "ledger.central: passwords"),
])
def test_a_malformed_url_or_a_password_in_the_config_is_one_line(
        tmp_path: Path, firmware: Path, rig: Rig, central: str, says: str) -> None:
    line = line_for(tmp_path, firmware, rig, central)
    text = one_line(line)
    assert text.startswith(f"station: config error: {line.config}: {says}"), text
    assert "s3cret" not in text


def test_wrong_credentials_are_one_line(tmp_path: Path, firmware: Path, rig: Rig,
                                        central_db: str) -> None:  # noqa: F811
    line = line_for(tmp_path, firmware, rig, central_db)
    text = one_line(line, env={"PGPASSWORD": "wrong-password"})
    assert text.startswith("station: central ledger: [ledger] central 127.0.0.1:"), text
    assert 'password authentication failed for user "station"' in text
    assert "check PGPASSWORD, ~/.pgpass or the service file" in text
    assert "wrong-password" not in text
    nopw = one_line(line, env={"PGPASSWORD": ""})
    assert "password" in nopw and "PGPASSWORD" in nopw


def test_a_schema_newer_than_the_station_is_one_line(tmp_path: Path, firmware: Path, rig: Rig,
                                                     pg: Cluster, central_db: str,  # noqa: F811
                                                     ) -> None:
    line = line_for(tmp_path, firmware, rig, central_db)
    ok = line.command("check")
    assert ok.returncode == 0, ok.stderr
    assert f"ready (created, version {central.SCHEMA_VERSION})" in ok.stdout
    newer = central.SCHEMA_VERSION + 1
    pg.sql(f"INSERT INTO station_schema (version, applied_by) VALUES ({newer}, "
           "'line-from-2027')", database=central_db.rsplit("/", 1)[-1])
    text = one_line(line)
    assert text.startswith("station: central ledger: [ledger] central 127.0.0.1:"), text
    assert (f"its schema is version {newer}, newer than this station's "
            f"{central.SCHEMA_VERSION}; upgrade this station") in text


def test_postgresql_unreachable_at_start_the_station_runs_and_buffers(
        tmp_path: Path, firmware: Path, rig: Rig) -> None:
    nowhere = f"postgresql://station@127.0.0.1:{free_port()}/factory"
    line = line_for(tmp_path, firmware, rig, nowhere)
    check = line.command("check")
    assert check.returncode == 0, check.stderr
    assert "central     WARNING: [ledger] central 127.0.0.1:" in check.stdout
    assert "cannot reach PostgreSQL" in check.stdout
    line.start("--exit-after", "2")
    rig.plug(index=0)
    rig.plug(index=1)
    assert line.wait() == 0, line.output()[-2000:]
    out = line.output()
    assert "station: WARNING: [ledger] central 127.0.0.1:" in out
    assert "the station runs and buffers in its local ledger" in out
    # named failure case of on_known_board: not asked, the board is treated as new
    assert "central ledger not reachable; [identity] on_known_board not applied" in out
    assert [j["result"] for j in line.local_jobs()] == ["done", "done"]
    assert not (line.state / "central.json").exists()  # nothing was shipped


def test_the_dashboard_footer_shows_the_lag_and_warns_when_postgresql_is_away() -> None:
    now = time.time()
    view = StationView(station="line-1")
    status = ReplicationStatus(where="db:5432/factory", state="up", pending=0)
    view.central = lambda t: (status.line(t), status.healthy)
    assert "central db:5432/factory: up to date" in _text(view, now)
    status = ReplicationStatus(where="db:5432/factory", state="up", pending=12, lag_s=3.2)
    assert "central db:5432/factory: 12 event(s) waiting, lag 3s" in _text(view, now)
    status = ReplicationStatus(where="db:5432/factory", state="unreachable", pending=340,
                               lag_s=125, reason="Connection refused", since=now - 130)
    assert ("central db:5432/factory UNREACHABLE for 2:10, buffering locally: 340 event(s) "
            "waiting, lag 2:05 (Connection refused)") in _text(view, now)


def _text(view: StationView, now: float) -> str:
    console = Console(width=200, color_system=None, force_terminal=True, record=True)
    console.print(render(view.snapshot(), now))
    return " ".join(console.export_text().split())


def test_a_role_that_may_not_create_the_schema_is_one_line(
        tmp_path: Path, firmware: Path, rig: Rig, pg: Cluster) -> None:  # noqa: F811
    pg.sql("CREATE DATABASE not_ours")  # owned by the admin: the station may only connect
    line = line_for(tmp_path, firmware, rig, pg.url("not_ours"))
    text = one_line(line)
    assert text.startswith("station: central ledger: [ledger] central 127.0.0.1:"), text
    assert "permission denied for schema public (SQLSTATE 42501)" in text
    assert "the station's role needs CREATE" in text


def test_the_live_dashboard_warns_when_postgresql_is_unreachable(
        tmp_path: Path, firmware: Path, rig: Rig) -> None:
    """The real `station run` on a terminal (a pty): its footer says PostgreSQL is away."""
    import fcntl
    import os
    import pty
    import re
    import select
    import struct
    import subprocess
    import sys
    import termios

    line = line_for(tmp_path, firmware, rig, f"postgresql://station@127.0.0.1:{free_port()}/f")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "station", "run", "--config",
                             str(line.config), "--exit-after", "1"], stdin=slave, stdout=slave,
                            stderr=slave, env={**line.env, "TERM": "xterm", "COLUMNS": "200"},
                            cwd=line.root)
    os.close(slave)
    rig.plug(index=0)
    screen = b""
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the station exited and closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, screen[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    assert "central 127.0.0.1:" in text and "UNREACHABLE for" in text, text[-3000:]
    assert "buffering locally" in text
