"""`station report` on a ledger the real station wrote: a 200-board night on a virtual rig.

The night: `station run` (a subprocess) on 16 virtual boards at full speed, an operator
(tests/linekit.py) replacing each board once the ledger has its end; hub port 5 holds
mute boards only (they fail at connect: the slot gets flagged) and two boards that are
not ESPs. Every number the report shows is checked against plain SQL on that ledger;
the HTML is opened in headless Chromium (Debian's package), which must load it without
an error and take a screenshot, kept next to the test's files.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from station.demo import make_demo_firmware
from station.sim import Faults, Rig
from tests.linekit import Operator, sixteen_slots

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BOARDS = 200
MUTE_HUB = 5  # slot A6
RUN_TIMEOUT = 420.0


def write_config(root: Path, firmware: Path, rig: Path, extra: str = "") -> Path:
    slots = sixteen_slots()
    config = root / "station.toml"
    config.write_text(f"""\
[station]
name = "night-line"
state_dir = "state"
[ports]
watch = ["{rig}/pci-*"]
rescan_interval = 0.2
reenumerate_window = 0  # boards swapped right after done on ptys (no VID:PID): new boards
{extra}
[ports.slots]
{slots}
[firmware]
chip = "esp32"
flasher_args = "{firmware}"
[worker]
retries = 0
[worker.timeouts]
connect = 10
""")
    return config


def station(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "station", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def run_night(root: Path, firmware: Path, boards: int, faults: Any) -> Path:
    """`station run --exit-after N` with an operator; returns the config."""
    rig_dir = root / "rig"
    config = write_config(root, firmware, rig_dir)
    with Rig(rig_dir, seed=5, throttle=False, flash_timing=False) as rig:
        out = (root / "station.out").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "station", "run", "--config",
                                 str(config), "--headless", "--exit-after", str(boards)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        try:
            operator = Operator(rig, root / "state", slots=min(16, boards), faults=faults,
                                budget=boards)
            operator.start()
            operator.run_until("the night's end", lambda: proc.poll() is not None,
                               timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode in (0, 3), (root / "station.out").read_text()[-3000:]
    return config


def faults(index: int, n: int) -> Faults:
    if index == MUTE_HUB:
        return Faults(mute=True)
    if (index, n) in ((9, 2), (12, 4)):
        return Faults(garbage=True)
    return Faults()


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_firmware(tmp_path_factory.mktemp("fw"), chip="esp32", app_size=64_000)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory, firmware: Path) -> Path:
    root = tmp_path_factory.mktemp("night")
    started = time.monotonic()
    config = run_night(root, firmware, BOARDS, faults)
    print(f"\n{BOARDS}-board night: {time.monotonic() - started:.0f} s")
    return config


class Tables(html.parser.HTMLParser):
    """The report's summary (data-key -> value) and every table's rows, as text."""

    def __init__(self) -> None:
        super().__init__()
        self.summary: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self._key: str | None = None
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("class") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "thead":
            self._head = True
        elif tag == "tr":
            self._key, self._row = a.get("data-key"), []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "thead":
            self._head = False
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._key:
                self.summary[self._key] = self._row[-1]
            elif self._table is not None and not self._head:
                self.tables[self._table].append(self._row)
            self._row = None


def parse(text: str) -> Tables:
    tables = Tables()
    tables.feed(text)
    return tables


def sql(config: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(config.parent / "state" / "ledger.sqlite3")
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def test_the_report_shows_the_ledgers_numbers(night: Path) -> None:
    out = night.parent / "report.html"
    result = station(night, "report", "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = parse(out.read_text())
    s = page.summary

    [(boards, done, failed, removed)] = sql(night, """SELECT count(*),
        sum(result = 'done'), sum(result = 'failed'), sum(result = 'removed') FROM jobs""")
    assert boards == BOARDS
    assert (s["boards"], s["done"], s["failed"], s["removed"]) == \
        (str(boards), str(done), str(failed), str(removed))
    assert failed >= 5  # the mute slot's boards (3 or more), and the two that are not ESPs
    assert s["yield"] == f"{100 * done / (done + failed):.1f}%"
    [(first, last)] = sql(night, "SELECT min(started_at), max(finished_at) FROM jobs")
    assert s["boards_per_hour"] == f"{done * 3600 / (last - first):.1f}"
    took = [e - b for b, e in sql(night, "SELECT started_at, finished_at FROM jobs "
                                         "WHERE result = 'done'")]
    assert s["median_seconds"] == f"{statistics.median(took):.1f}"
    [(runs,)] = sql(night, "SELECT count(*) FROM runs")
    assert runs == 1 and s["restarts"] == "0 (0)"
    assert s["throttles"] == "0"  # no cloud on this line

    by_stage = dict(sql(night, "SELECT failed_stage, count(*) FROM jobs "
                               "WHERE result = 'failed' GROUP BY failed_stage"))
    assert {r[0]: int(r[1]) for r in page.tables["failstage"]} == by_stage
    assert sum(int(r[1]) for r in page.tables["reasons"]) == failed
    per_slot = {slot: (n, d, f) for slot, n, d, f in sql(night, """SELECT slot, count(*),
        sum(result = 'done'), sum(result = 'failed') FROM jobs GROUP BY slot""")}
    shown = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in page.tables["slots"]}
    assert shown == per_slot
    assert len(shown) == 16
    flagged = {r[0] for r in page.tables["slots"] if r[6] == "yes"}
    assert flagged == {slot for (slot,) in sql(night, "SELECT DISTINCT slot FROM slot_flags")}
    assert flagged == {"A6"}  # the mute boards' hub port: 3 in a row at connect
    [flag] = page.tables["flags"]
    assert flag[0] == "A6" and flag[2] == "connect" and "check the cable" in flag[4]

    done_stages = Counter(stage for (timings,) in sql(
        night, "SELECT timings FROM jobs WHERE result = 'done'")
        for stage in json.loads(timings))
    assert {r[0]: int(r[1]) for r in page.tables["stages"]} == dict(done_stages)

    md = station(night, "report", "--format", "md", "--out", "-")
    assert md.returncode == 0, md.stderr
    assert f"| boards done | {done} |" in md.stdout, md.stdout
    assert f"| boards failed (never done) | {failed} |" in md.stdout, md.stdout
    assert "| A6 |" in md.stdout and "<svg" not in md.stdout


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium package is not installed (.ci/run installs it with "
                    "apt-get as root; here it could not be)")
    return path


def browse(report: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = report.parent / f"chromium-profile-{len(args)}"
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={profile}", *args, report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


def test_the_report_opens_in_a_browser_without_errors(night: Path) -> None:
    out = night.parent / "report.html"
    assert station(night, "report", "--out", str(out)).returncode == 0
    text = out.read_text()
    # self-contained: nothing to fetch (the only URLs are SVG's namespace names)
    for ref in ("src=", "<link", "<script", "@import", "url(http"):
        assert ref not in text
    assert set(re.findall(r"https?://[^\s\"')<]+", text)) == {
        "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    assert text.count("<svg") == 4  # timeline, stages, failures, slot map

    shot = night.parent / "report.png"
    taken = browse(out, f"--screenshot={shot}", "--window-size=1100,3300",
                   "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 20_000, taken.stderr[-3000:]
    keep = os.environ.get("STATION_ARTIFACTS")  # pytest prunes old tmp dirs: copy it out
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(keep) / "report.png")
        shutil.copy2(out, Path(keep) / "report.html")
    print(f"\nscreenshot of the report: {shot}" + (f" (copied to {keep})" if keep else ""))
    dom = browse(out, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    page = parse(dom.stdout)  # what the browser built, not the file
    [(done,)] = sql(night, "SELECT count(*) FROM jobs WHERE result = 'done'")
    assert page.summary["done"] == str(done)
    assert dom.stdout.count("<svg") == 4
    for log in (taken.stderr, dom.stderr):
        problems = [line for line in log.splitlines()
                    if "CONSOLE" in line or "Failed to load" in line]
        assert problems == [], problems


def test_a_window_with_no_boards_says_so(night: Path) -> None:
    result = station(night, "report", "--since", "2099-01-01", "--format", "md", "--out", "-")
    assert result.returncode == 0, result.stderr
    assert "No boards in this window (from 2099-01-01 00:00 UTC)." in result.stdout
    assert "| boards (distinct MACs) | 0 |" in result.stdout
    out = night.parent / "later.html"
    result = station(night, "report", "--since", "2099-01-01", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "No boards in this window" in out.read_text() and "<svg" not in out.read_text()
    other = station(night, "report", "--station", "no-such-line", "--format", "md", "--out", "-")
    assert "No boards in this window (station no-such-line)." in other.stdout
    bad = station(night, "report", "--since", "last tuesday")
    assert bad.returncode == 2
    assert "--since: 'last tuesday' is not a time" in bad.stderr


def test_an_empty_ledger_and_a_missing_one(tmp_path: Path, firmware: Path) -> None:
    config = write_config(tmp_path, firmware, tmp_path / "rig")
    missing = station(config, "report")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"station: ledger: {tmp_path / 'state' / 'ledger.sqlite3'}: no ledger here; has a "
        "station run with this [station] state_dir? (check --config)")
    assert station(config, "ledger").returncode == 0  # makes the empty ledger
    out = tmp_path / "empty.html"
    result = station(config, "report", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"station report: {out}" in result.stdout
    text = out.read_text()
    assert "No boards in this ledger yet." in text and "<svg" not in text
    assert parse(text).summary["yield"] == "n/a"


def test_a_ledger_of_one_board(tmp_path: Path, firmware: Path) -> None:
    config = run_night(tmp_path, firmware, 1, lambda _i, _n: Faults())
    out = tmp_path / "one.html"
    result = station(config, "report", "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = parse(out.read_text())
    assert (page.summary["boards"], page.summary["done"], page.summary["yield"]) == \
        ("1", "1", "100.0%")
    assert [r[0] for r in page.tables["slots"]] == ["A1"]
    assert "No board failed." in out.read_text()
    assert out.read_text().count("<svg") == 3  # no failures chart


def test_restarts_that_see_the_same_boards_count_them_once(tmp_path: Path) -> None:
    """A station restarted with its boards still plugged takes each again (`skipped`,
    already done) and a board that is not an ESP fails again: jobs, not boards (issue 24).
    The report counts physical boards by MAC and computes yield and pace on them."""
    from tests.test_bad_inputs import Site, make_firmware  # noqa: PLC0415 (one test's kit)

    site = Site(tmp_path, make_firmware(tmp_path / "fw"))
    with Rig(site.hub, seed=11, throttle=False, flash_timing=False) as rig:
        for _ in range(3):
            rig.plug(chip="esp32")
        rig.plug(chip="esp32", faults=Faults(garbage=True))
        first = site.run(4)
        again = site.run(4)  # the restart: the same four boards, still plugged
    assert (first.code, again.code) == (3, 3), (first, again)
    rows = site.ledger()
    assert sorted(r["result"] for r in rows) == ["done"] * 3 + ["failed"] * 2 + ["skipped"] * 3

    md = site.cli("report", "--format", "md", "--out", "-")
    assert md.code == 0, md
    figures = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", md.stdout, re.M))
    # the not-an-ESP board failed before its MAC was read: each of its jobs counts alone
    assert figures["boards (distinct MACs)"] == "5", md.stdout
    assert figures["jobs (each time a port was taken: retries and restarts add jobs)"] == "8"
    assert figures["boards done"] == "3" and figures["boards failed (never done)"] == "2"
    assert figures["jobs skipped (the board was already done)"] == "3"
    assert figures["yield: boards done / (done + failed)"] == "60.0%", md.stdout
    [(span,)] = sql(site.config, "SELECT max(finished_at) - min(started_at) FROM jobs")
    assert figures["boards done per hour (first start to last end)"] == \
        f"{3 * 3600 / span:.1f}", (md.stdout, span)
