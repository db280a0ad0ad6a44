"""The bad-input matrix (issue #6), part 1: the config, the firmware, the ledger, the state.

Every way a user can hurt the station gets one clear line naming the thing to fix, the
documented exit code, and nothing recorded is lost. Each case runs the real CLI in a
subprocess (`python -m station run|check ...`) as an operator would, against virtual
boards where boards matter. docs/bad-inputs.md lists the cases in one table.

Parts: this file (config, firmware, ledger, state_dir, two stations),
test_bad_inputs_boards.py (ports and disks: per-board faults with other boards in
flight), test_bad_inputs_aws.py (cloud access). The helpers here are shared by them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from station.daemon import EXIT_BUSY, EXIT_CONFIG, EXIT_OK
from station.demo import make_demo_firmware
from station.events import Identified, JobFinished, JobStarted, Stage
from station.record import Ledger
from station.sim import Rig

pytestmark = pytest.mark.timeout(180)

CLI_TIMEOUT = 60.0
"""A start-up failure is immediate; this only bounds a station that wrongly started."""
RUN_TIMEOUT = 120.0
"""`station run --exit-after N` on a few unthrottled virtual boards."""
EARLIER_JOB = "earlier-job"
EARLIER_MAC = "240ac4aabbcc"


# -- shared helpers (imported by the other test_bad_inputs_* files) -----------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"

    def complaint(self) -> str:
        """The one line a start-up failure prints on stderr (fails if there are more)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr\n{self}"
        assert lines[0].startswith("station: "), self
        return lines[0]


def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply, as for a service user.

    root ignores file modes (CAP_DAC_OVERRIDE), so as root the station runs without the
    two capabilities that bypass them (setpriv); it stays uid 0, so the files it owns
    (ptys, the state_dir) stay usable. Skips if that is not possible here.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def toml_value(value: Any) -> str:
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


@dataclass
class Firmware:
    """A small ESP-IDF-like build per chip, shared by a module's tests."""

    esp32: Path  # flasher_args.json
    esp32s3: Path

    def images(self) -> list[dict[str, Any]]:
        """[firmware] images for the esp32 build (the alternative to flasher_args)."""
        build = self.esp32.parent
        return [{"offset": 0x1000, "file": build / "bootloader" / "bootloader.bin"},
                {"offset": 0x8000, "file": build / "partition_table" / "partition-table.bin"},
                {"offset": 0x10000, "file": build / "app.bin"}]


def make_firmware(root: Path) -> Firmware:
    return Firmware(esp32=make_demo_firmware(root / "esp32", app_size=0x4000),
                    esp32s3=make_demo_firmware(root / "esp32s3", chip="esp32s3",
                                               app_size=0x4000))


@dataclass
class Site:
    """One station: its station.toml (as sections of values), state, certs_out, hub."""

    root: Path
    firmware: Firmware
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sections = {
            "station": {"name": "line-1", "state_dir": "state"},
            "ports": {"watch": [str(self.hub / "pci-*")], "rescan_interval": 0.2},
            "firmware": {"chip": "esp32", "flasher_args": self.firmware.esp32},
            "worker": {"retry_delay": 0.05},
            "registrar": {"kind": "local-ca"},
            "registrar.local_ca": {"dir": "ca"},
            "credentials": {"out_dir": "certs_out", "partition": "nvs"},
            **self.sections,
        }

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def config(self) -> Path:
        return self.root / "station.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def certs_out(self) -> Path:
        return self.root / "certs_out"

    def set(self, section: str, key: str, value: Any) -> Site:
        """Change one key of station.toml (None removes it)."""
        table = self.sections.setdefault(section, {})
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
        return self

    def write(self) -> Path:
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n"
                                                for k, v in table.items()) + "\n"
                       for name, table in self.sections.items())
        self.config.write_text(text)
        return self.config

    def cli(self, *args: str, prefix: Sequence[str] = (), timeout: float = CLI_TIMEOUT,
            config: bool = True) -> Result:
        """`station <args> --config station.toml`; outputs in files (no pipe can fill)."""
        if config:
            self.write()
            args = (*args, "--config", str(self.config))
        out, err = self.root / "out.txt", self.root / "err.txt"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.run([*prefix, sys.executable, "-m", "station", *args],
                                  cwd=self.root, env=self.env, stdin=subprocess.DEVNULL,
                                  stdout=o, stderr=e, timeout=timeout, check=False)
        return Result(proc.returncode, out.read_text(errors="replace"),
                      err.read_text(errors="replace"))

    def run(self, boards: int, prefix: Sequence[str] = (),
            timeout: float = RUN_TIMEOUT) -> Result:
        return self.cli("run", "--headless", "--exit-after", str(boards), prefix=prefix,
                        timeout=timeout)

    def check(self, prefix: Sequence[str] = ()) -> Result:
        return self.cli("check", prefix=prefix)

    def ledger(self) -> list[dict[str, Any]]:
        """`station ledger --format json`: what the user gets in the morning."""
        result = self.cli("ledger", "--format", "json")
        assert result.code == EXIT_OK, str(result)
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    def rows_by_port(self) -> dict[str, dict[str, Any]]:
        return {row["port"]: row for row in self.ledger() if row["job_id"] != EARLIER_JOB}

    def seed_ledger(self) -> None:
        """An earlier night's board, done: no failure of tonight may lose it."""
        async def record(ledger: Ledger) -> None:
            where = {"job_id": EARLIER_JOB, "port": "/dev/ttyUSB9", "slot": "Z9"}
            await ledger.record(JobStarted(**where, station="line-1", firmware_hash="ab" * 32,
                                           at=1_800_000_000.0))
            await ledger.record(Identified(**where, chip="esp32", mac=EARLIER_MAC,
                                           thing_name=EARLIER_MAC, at=1_800_000_001.0))
            await ledger.record(JobFinished(**where, result=Stage.DONE, at=1_800_000_020.0))

        ledger = Ledger.open(self.state)
        try:
            asyncio.run(record(ledger))
        finally:
            ledger.close()

    def assert_history_kept(self) -> None:
        """The earlier board is still there (read directly: the config may be broken)."""
        ledger = Ledger.open(self.state)
        try:
            earlier = [row for row in ledger.jobs() if row["job_id"] == EARLIER_JOB]
        finally:
            ledger.close()
        assert len(earlier) == 1 and earlier[0]["result"] == "done", earlier
        assert earlier[0]["mac"] == EARLIER_MAC


def quick_rig(site: Site) -> Rig:
    """Virtual boards without line-rate or flash timing: each board takes ~0.3 s."""
    return Rig(site.hub, seed=11, throttle=False, flash_timing=False)


# The fixtures of every test_bad_inputs_* file (each defines these three the same way).


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Background:
    """`station run` in the background, its stdout lines readable with a deadline."""

    def __init__(self, site: Site, *args: str) -> None:
        site.write()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.err = (site.root / "background.err").open("wb")
        self.err_path = site.root / "background.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "station", "run", "--config", str(site.config),
             "--headless", *args], cwd=site.root, env=site.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self.err, text=True)
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                        daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, *needles: str, timeout: float = RUN_TIMEOUT) -> str:
        """The next stdout line containing every needle (blocks on the pipe, no polling)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no line with {needles} in {timeout:g}s: "
                                   f"{self.seen}") from None
            if line is None:
                raise AssertionError(f"station ended ({self.proc.wait(timeout=CLI_TIMEOUT)}) "
                                     f"before a line with {needles}: {self.seen}")
            self.seen.append(line)
            if all(n in line for n in needles):
                return line

    def stop(self, timeout: float = RUN_TIMEOUT) -> Result:
        """SIGTERM (drain, then exit) and collect the outputs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.finish(timeout)

    def finish(self, timeout: float = RUN_TIMEOUT) -> Result:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=CLI_TIMEOUT)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        self.close()
        return Result(code, "".join(self.seen), self.err_path.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=CLI_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()


def done_after_buttons(site: Site, port: str, press: Callable[[], None]) -> Result:
    """`station run` for one board that must ask for BOOT + EN on its row: `press()` is
    what the operator then does; the board must come up in download mode and be done."""
    station = Background(site, "--exit-after", "1")
    try:
        asked = station.wait_line(" press BOOT + EN", timeout=90)
        assert port in asked, station.seen
        press()
        station.wait_line(" in download mode", timeout=60)
        station.wait_line(" done in ", timeout=60)
        return station.finish()
    finally:
        station.close()


@contextlib.contextmanager
def background(site: Site, *args: str) -> Iterator[Background]:
    station = Background(site, *args)
    try:
        yield station
    finally:
        station.close()


# -- config and firmware: refused at start, before any board is touched -------------------


def _firmware_images(site: Site, extra: Sequence[dict[str, Any]] = (),
                     app: Path | None = None) -> None:
    images = site.firmware.images()
    if app is not None:
        images[2]["file"] = app
    site.set("firmware", "flasher_args", None).set("firmware", "images", [*images, *extra])


def _unreadable_app(site: Site) -> None:
    app = site.root / "app.bin"
    shutil.copy(site.firmware.esp32.parent / "app.bin", app)
    app.chmod(0)
    _firmware_images(site, app=app)


def _data_image(site: Site, offset: int, size: int) -> None:
    data = site.root / "spiffs.bin"
    data.write_bytes(bytes(range(256)) * (size // 256))
    _firmware_images(site, extra=[{"offset": offset, "file": data}])


def _bad_policy(site: Site) -> None:
    policy = site.root / "policy.json"
    policy.write_text('{"Version": "2012-10-17", "Statement": [')
    site.set("registrar", "kind", "aws-iot")
    site.set("registrar.aws", "policy_document", policy)


def _state_dir_under_a_file(site: Site) -> None:
    (site.root / "state-file").write_text("not a folder")
    site.set("station", "state_dir", "state-file/state")


CONFIG_CASES: dict[str, tuple[Any, list[str]]] = {
    # case: (how to break it, what the one stderr line must contain)
    "unknown key": (lambda s: s.set("worker", "retrys", 3),
                    ["config error", "station.toml: worker.retrys: unknown key"]),
    "wrong type": (lambda s: s.set("worker", "retries", "3"),
                   ["config error", "station.toml: worker.retries: must be int, not str '3'"]),
    "baud neither a rate nor auto": (
        lambda s: s.set("ports", "baud", "fast"),
        ["config error", "station.toml: ports.baud: must be an int baud rate or \"auto\", "
         "not 'fast'"]),
    "max_baud below the ROM's rate": (
        lambda s: s.set("ports", "max_baud", 57600),
        ["config error", "station.toml: ports.max_baud: 57600 is outside what a bridge runs "
         "(115200 to 6000000)"]),
    "max_baud above any bridge": (
        lambda s: s.set("ports", "max_baud", 12_000_000),
        ["config error", "station.toml: ports.max_baud: 12000000 is outside what a bridge "
         "runs (115200 to 6000000)"]),
    "adapter key neither VID:PID nor a known name": (
        lambda s: s.set("ports.baud_by_adapter", "cp2012", 921600),
        ["config error", "station.toml: ports.baud_by_adapter.cp2012: neither a VID:PID like "
         "\"10c4:ea60\" nor a known adapter (cp2102, cp2104, cp2102n, ch340, ch343, ch9102, "
         "ft232r, ft2232, ft231x, or other)"]),
    "missing firmware": (lambda s: _firmware_images(s, app=s.root / "nope" / "app.bin"),
                         ["station.toml: firmware.images[2].file:", "nope/app.bin: no such file"]),
    "missing flasher_args": (lambda s: s.set("firmware", "flasher_args", s.root / "build.json"),
                             ["station.toml: firmware.flasher_args:", "build.json: no such file"]),
    "unreadable firmware": (_unreadable_app,
                            ["firmware.images[2].file:", "app.bin: cannot be read "
                             "(Permission denied)"]),
    "image for another chip": (lambda s: _firmware_images(s, app=s.firmware.esp32s3.parent
                                                          / "app.bin"),
                               ["firmware error", "esp32s3/app.bin: firmware.images[2].file: "
                                "built for esp32s3", "but [firmware] chip is esp32"]),
    "build for another chip": (lambda s: s.set("firmware", "flasher_args", s.firmware.esp32s3),
                               ["firmware error", "esp32s3/flasher_args.json: "
                                "extra_esptool_args.chip: the build is for esp32s3, but "
                                "[firmware] chip is esp32"]),
    "image larger than flash": (lambda s: _data_image(s, 0x3F0000, 0x20000),
                                ["firmware error", "spiffs.bin: firmware.images[3].file: "
                                 "131072 bytes at 0x3f0000 end at 0x410000, past the end of "
                                 "4 MB flash"]),
    "overlapping images": (lambda s: _data_image(s, 0x12000, 0x2000),
                           ["firmware error", "spiffs.bin: firmware.images[3].offset: 0x12000 "
                            "overlaps app.bin"]),
    "bad partition label": (lambda s: s.set("credentials", "partition", "nvs_keys"),
                            ["station.toml: credentials.partition: no partition labelled "
                             "'nvs_keys' (partitions: nvs, phy_init, factory)"]),
    "invalid policy JSON": (_bad_policy,
                            ["config error", "station.toml: registrar.aws.policy_document:",
                             "policy.json: not valid JSON"]),
    "chip is an ESP8266": (lambda s: s.set("firmware", "chip", "esp8266"),
                           ["config error", "station.toml: firmware.chip: 'esp8266' is not "
                            "supported", "(one of esp32, esp32s2, esp32s3, esp32c3, "]),
    "chip mistyped": (lambda s: s.set("firmware", "chip", "esp32-c6"),
                      ["config error", "station.toml: firmware.chip: 'esp32-c6' is not an "
                       "ESP32-family chip esptool knows; did you mean 'esp32c6'?",
                       "esp32h2, esp32h21, esp32p4"]),
    "remote port not an rfc2217 URL": (
        lambda s: s.set("ports", "remote", ["tcp://hub-1:4000"]),
        ["config error", "station.toml: ports.remote: 'tcp://hub-1:4000' is not an "
         "rfc2217://host:port URL"]),
    "remote port without a TCP port": (
        lambda s: s.set("ports", "remote", ["rfc2217://hub-1"]),
        ["config error", "station.toml: ports.remote: 'rfc2217://hub-1' names no TCP port"]),
    "boot-check marker not a regex": (
        lambda s: s.set("verify", "boot", "app").set("verify", "marker", "SELFTEST: (PASS"),
        ["config error", "station.toml: verify.marker: 'SELFTEST: (PASS' is not a valid "
         "regex (missing ), unterminated subpattern"]),
    "boot check neither off, rom nor app": (
        lambda s: s.set("verify", "boot", "yes"),
        ["config error", "station.toml: verify.boot: must be \"off\", \"rom\" or "
         "\"app\", not 'yes'"]),
    "ask_buttons neither remote, all nor never": (
        lambda s: s.set("ports", "ask_buttons", "sometimes"),
        ["config error", "station.toml: ports.ask_buttons: must be \"remote\", \"all\" or "
         "\"never\", not 'sometimes'"]),
    "image_checks neither refuse nor warn": (
        lambda s: s.set("firmware", "image_checks", "maybe"),
        ["config error", "station.toml: firmware.image_checks: must be \"refuse\" or "
         "\"warn\", not 'maybe'"]),
    "registry URL without a scheme": (
        lambda s: s.set("registry", "kind", "bodh").set("registry", "url", "bodh.example.com"),
        ["config error", "station.toml: registry.url: 'bodh.example.com' has no scheme: write "
         "https://bodh.example.com (or http:// for a registry on plain HTTP); Bodh's default "
         "is https"]),
    "registry template naming an unknown field": (
        lambda s: s.set("registry", "kind", "http")
        .set("registry", "url", "https://inventory.example/devices")
        .set("registry", "body", {"device": {"id": "{thing}", "serial": "{serial}"}}),
        ["config error", "station.toml: registry.body.device.serial: '{serial}': {serial} is "
         "not a field the station has (use {thing}, {mac}, {chip}, {station}, "
         "{certificate_id}, {firmware_version})"]),
    "registry secret written in station.toml": (
        lambda s: s.set("registry", "kind", "http")
        .set("registry", "url", "https://inventory.example/devices")
        .set("registry.headers", "x-api-key", "k-8f2e61d0c3"),
        ["config error", "station.toml: registry.headers.x-api-key: secrets never go in "
         "station.toml: write \"env:NAME\" and set NAME in the station's environment"]),
    "registry key's environment variable not set": (
        lambda s: (s.env.pop("BODH_API_KEY", None), s.set("registry", "kind", "bodh")
                   .set("registry", "url", "https://bodh.example.com")),
        ["config error", "station.toml: registry.api_key: the environment variable "
         "BODH_API_KEY is not set; the station reads secrets only from its environment"]),
    "cloud check without credentials": (
        lambda s: s.set("registrar", "kind", "none").set("verify", "cloud", "publish"),
        ["config error", "station.toml: verify.cloud: \"publish\" needs the board's "
         "credentials, but [registrar] kind is \"none\""]),
    "config file missing": (lambda s: None, ["station.toml: no such file (pass --config PATH)"]),
    "state_dir cannot be made": (_state_dir_under_a_file,
                                 ["state-file/state", "Not a directory"]),
}


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_config_or_firmware_mistake_is_one_line_naming_it(site: Site, command: str,
                                                            case: str) -> None:
    site.seed_ledger()
    before = sha256(site.state / "ledger.sqlite3")
    breaks, expected = CONFIG_CASES[case]
    breaks(site)
    site.write()
    if case == "config file missing":
        site.config.unlink()
    prefix = unprivileged() if case == "unreadable firmware" else ()
    if command == "run":
        args: tuple[str, ...] = ("run", "--headless", "--exit-after", "1")
    else:
        args = ("check",)
    result = site.cli(*args, "--config", str(site.config), prefix=prefix, config=False)
    assert result.code == EXIT_CONFIG, str(result)
    line = result.complaint()
    for text in expected:
        assert text in line, result
    # refused before the ledger was opened: the file is untouched, byte for byte
    assert sha256(site.state / "ledger.sqlite3") == before
    site.assert_history_kept()


# -- the ledger --------------------------------------------------------------------------


def test_a_corrupt_ledger_is_named_kept_and_not_touched(site: Site) -> None:
    site.state.mkdir()
    ledger = site.state / "ledger.sqlite3"
    ledger.write_bytes(b"this was a ledger until a disk hiccup\n" * 200)
    before = sha256(ledger)
    for args in (("run", "--headless", "--exit-after", "1"), ("ledger",), ("reconcile",)):
        result = site.cli(*args)
        assert result.code == EXIT_CONFIG, str(result)
        line = result.complaint()
        assert f"ledger: {ledger}: corrupt (file is not a database)" in line, result
        assert f"mv {ledger} {ledger}.corrupt" in line, result
    assert sha256(ledger) == before  # the station never rewrites or deletes a ledger
    assert sorted(p.name for p in site.state.iterdir() if p.name.startswith("ledger")) == \
        ["ledger.sqlite3"]


def test_a_ledger_locked_by_another_process_is_exit_4_and_loses_nothing(site: Site) -> None:
    site.seed_ledger()
    holder = sqlite3.connect(site.state / "ledger.sqlite3", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # e.g. a sqlite3 shell left mid-transaction
        holder.execute("UPDATE jobs SET slot = slot")
        result = site.run(1)  # waits its busy timeout (5 s) for the write lock
        assert result.code == EXIT_BUSY, str(result)
        line = result.complaint()
        assert f"ledger: {site.state / 'ledger.sqlite3'}: locked by another process" in line
        assert "stop the other station or tool using it" in line
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    site.assert_history_kept()


# -- two stations on one state_dir --------------------------------------------------------


def test_a_second_station_on_the_same_state_dir_exits_4_and_the_first_carries_on(
        site: Site, rig: Rig) -> None:
    site.seed_ledger()
    first_board = rig.plug(chip="esp32")
    with background(site, "--exit-after", "2") as first:
        first.wait_line(first_board.port, "done")  # it holds the state_dir now
        second = site.run(1)
        assert second.code == EXIT_BUSY, second
        line = second.complaint()
        assert f"{site.state}: another station (pid {first.proc.pid}) is using this " \
               "state_dir" in line, second
        assert "give this one its own [station] state_dir" in line
        # reconcile would also write the ledger: refused the same way
        reconcile = site.cli("reconcile")
        assert reconcile.code == EXIT_BUSY, reconcile
        assert "another station" in reconcile.complaint()
        # reading the ledger needs no lock: a user can look while it runs
        assert any(row["port"] == first_board.port for row in site.ledger())
        # and the first one still takes boards
        second_board = rig.plug(chip="esp32")
        first.wait_line(second_board.port, "done")
        result = first.finish()
    assert result.code == EXIT_OK, str(result)
    rows = site.rows_by_port()
    assert {rows[b.port]["result"] for b in (first_board, second_board)} == {"done"}
    assert len(rows) == 2  # the refused station recorded nothing
    site.assert_history_kept()


# -- counts on the command line ------------------------------------------------------------

BAD_COUNTS = {
    "run --exit-after 0": (("run", "--headless", "--exit-after", "0"),
                           "argument --exit-after: must be at least 1, not 0"),
    "run --exit-after -1": (("run", "--headless", "--exit-after", "-1"),
                            "argument --exit-after: must be at least 1, not -1"),
    "run --exit-after two": (("run", "--headless", "--exit-after", "two"),
                             "argument --exit-after: must be a whole number, not 'two'"),
    "demo --boards 0": (("demo", "--headless", "--boards", "0"),
                        "argument --boards: must be at least 1, not 0"),
    "demo --boards -3": (("demo", "--headless", "--boards=-3"),
                         "argument --boards: must be at least 1, not -3"),
    "sim --boards 0": (("sim", "--boards", "0"), "argument --boards: must be at least 1, not 0"),
    "sim --plug-interval -1": (("sim", "--boards", "2", "--plug-interval=-1"),
                               "argument --plug-interval: must be 0 seconds or more, not -1"),
}


@pytest.mark.parametrize("case", list(BAD_COUNTS))
def test_a_bad_count_on_the_command_line_is_refused_before_anything_starts(
        site: Site, case: str) -> None:
    site.seed_ledger()
    before = sha256(site.state / "ledger.sqlite3")
    workdir = site.root / "demo-work"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("an operator's file")  # demo empties its --dir
    args, expected = BAD_COUNTS[case]
    if args[0] == "run":
        args = (*args, "--config", str(site.write()))
    else:
        args = (*args, "--dir", str(workdir))
    # A station that wrongly started would wait for boards: the timeout fails the test.
    result = site.cli(*args, config=False, timeout=20.0)
    assert result.code == EXIT_CONFIG, str(result)
    assert expected in result.stderr.splitlines()[-1], result
    assert result.stdout == "", result
    assert sha256(site.state / "ledger.sqlite3") == before
    assert [p.name for p in workdir.iterdir()] == ["keep.txt"]
    site.assert_history_kept()


def test_commands_that_only_read_the_record_need_no_firmware(tmp_path: Path) -> None:
    """The morning report is made on a station whose build was replaced, or on a copy of
    station.toml in the office (issue 24): `ledger`, `report`, `slot` and `board` read
    [station] and [ledger] only. `run` and `check` still refuse the missing build."""
    site = Site(tmp_path, make_firmware(tmp_path / "fw"))
    with quick_rig(site) as rig:
        board = rig.plug(chip="esp32")
        assert site.run(1).code == EXIT_OK
    site.firmware.esp32.parent.rename(site.root / "build-elsewhere")
    rows = site.ledger()
    assert [(r["mac"], r["result"]) for r in rows] == [(board.mac.replace(":", ""), "done")]
    report = site.cli("report", "--format", "md", "--out", "-")
    assert report.code == EXIT_OK and "| boards done | 1 |" in report.stdout, report
    assert site.cli("slot", "list").stdout == "no slot is flagged\n"
    central = site.cli("board", board.mac)
    assert (central.code, central.stderr.strip()) == (EXIT_CONFIG, (
        f"station: config error: {site.config}: ledger.central: not set: name the central "
        "PostgreSQL (postgresql://user@host/database) to read the fleet")), central
    run = site.run(1)
    assert run.code == EXIT_CONFIG
    assert f"firmware.flasher_args: {site.firmware.esp32}: no such file" in run.stderr, run
    # the sections they do read are still checked, naming the key
    site.set("station", "state_dri", "x")
    typo = site.cli("ledger")
    assert (typo.code, typo.stderr.strip()) == (EXIT_CONFIG, (
        f"station: config error: {site.config}: station.state_dri: unknown key (check "
        "the spelling; see README)")), typo
