"""`make demo`'s command, run as a new user would: from the repo, with its defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(240)
def test_demo_flashes_its_virtual_boards_from_a_relative_folder(tmp_path: Path) -> None:
    # The default --dir is relative (state/demo): run from a folder as `make demo` does.
    run = subprocess.run(
        [sys.executable, "-m", "station", "demo", "--boards", "3", "--headless",
         "--no-throttle"],
        cwd=tmp_path, capture_output=True, text=True, timeout=200,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count(" done in ") == 3
    ledger = subprocess.run(
        [sys.executable, "-m", "station", "ledger", "--config",
         str(tmp_path / "state" / "demo" / "station.toml"), "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True)
    jobs = json.loads(ledger.stdout)
    assert [job["result"] for job in jobs] == ["done"] * 3
    # a mixed rig: one board of each chip the demo holds firmware for ([[firmware]])
    assert sorted(job["chip"] for job in jobs) == ["esp32", "esp32c3", "esp32s3"]
    # each was reset by its lines and told the boot story of its own chip's app
    assert sorted((job["boot"], job["booted_project"]) for job in jobs) == [
        ("ok", f"station-demo-{chip}") for chip in ("esp32", "esp32c3", "esp32s3")]
