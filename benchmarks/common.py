"""Shared plumbing of the benchmarks: firmware, configs, the rig, the station, esptool.

Everything runs as separate processes, as on a real line: the virtual rig
(`python -m station.sim`, line-rate and flash timing models ON), the station
(`station run --exit-after N --headless`) and the esptool CLI peers. Every wait has a
timeout, and every process started here is stopped again on error or Ctrl-C
(`Processes` context manager).

Times: the rig prints one JSON line per plug, stamped here on arrival (wall clock); the
station's events.jsonl carries the wall-clock `at` of each job's start and end and the
per-stage timings. CPU seconds and peak RSS of a child come from `os.wait4` (the
kernel's rusage of exactly that process; ru_maxrss is VmHWM).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BAUD = 921600
APP_SIZE = 1_500_000
CHIP = "esp32"
BITS_PER_BYTE = 10
STOP_TIMEOUT = 30.0
READY_TIMEOUT = 30.0
PLUG_TIMEOUT = 60.0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import esptool

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "esptool": esptool.__version__}


def line_seconds(nbytes: int, baud: int = BAUD) -> float:
    """The line-rate floor: 10 bits (start, 8 data, stop) per byte."""
    return nbytes * BITS_PER_BYTE / baud


# -- firmware ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    name: str
    offset: int
    path: Path
    size: int  # padded, as written
    compressed: int  # bytes of the zlib -9 stream the station (and esptool) sends


@dataclass(frozen=True)
class Firmware:
    flasher_args: Path
    images: tuple[Image, ...]

    @property
    def size(self) -> int:
        return sum(i.size for i in self.images)

    @property
    def compressed(self) -> int:
        return sum(i.compressed for i in self.images)

    def write_flash_args(self) -> list[str]:
        """esptool `write-flash` arguments for the same images at the same offsets."""
        doc = json.loads(self.flasher_args.read_text())
        settings = doc["flash_settings"]
        args = ["--flash-mode", settings["flash_mode"], "--flash-size", settings["flash_size"],
                "--flash-freq", settings["flash_freq"]]
        for image in self.images:
            args += [f"0x{image.offset:x}", str(image.path)]
        return args

    def summary(self) -> dict[str, Any]:
        return {"images": [{"name": i.name, "offset": f"0x{i.offset:x}", "bytes": i.size,
                            "compressed": i.compressed,
                            "ratio": round(i.compressed / i.size, 3)} for i in self.images],
                "bytes": self.size, "compressed": self.compressed,
                "ratio": round(self.compressed / self.size, 3)}


def make_firmware(directory: Path) -> Firmware:
    """The demo build (bootloader, partition table, 1.5 MB app at ~60%), deterministic."""
    from station.config import FirmwareSection
    from station.demo import make_demo_firmware
    from station.flash import load_firmware

    args = make_demo_firmware(directory, chip=CHIP, app_size=APP_SIZE)
    bundle = load_firmware(FirmwareSection(chip=CHIP, flasher_args=args, images=()))
    files = json.loads(args.read_text())["flash_files"]
    images = tuple(Image(name=r.name, offset=r.offset,
                         path=directory / files[f"0x{r.offset:x}"], size=len(r.data),
                         compressed=len(r.compressed)) for r in bundle.regions)
    return Firmware(flasher_args=args, images=images)


def nvs_compressed_bytes(firmware: Firmware) -> int:
    """Bytes the credentials partition sends, for an AWS-sized certificate and EC key."""
    import base64
    import random

    from station.config import FirmwareSection
    from station.flash import load_firmware
    from station.identity import nvs_region
    from station.parts import DeviceCredentials

    bundle = load_firmware(FirmwareSection(chip=CHIP, flasher_args=firmware.flasher_args,
                                           images=()))
    part = bundle.partition("nvs")
    rng = random.Random(5)

    def pem(kind: str, der_bytes: int) -> str:
        body = base64.encodebytes(rng.randbytes(der_bytes)).decode()
        return f"-----BEGIN {kind}-----\n{body}-----END {kind}-----\n"

    creds = DeviceCredentials(thing_name="bench-240ac4000000",
                              certificate_pem=pem("CERTIFICATE", 860),
                              private_key_pem=pem("PRIVATE KEY", 138),
                              public_key_pem=pem("PUBLIC KEY", 91),
                              endpoint="a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com")
    region = nvs_region(creds, part.offset, part.size, "station")
    return len(region.compressed)


# -- config -----------------------------------------------------------------------------


def write_config(workdir: Path, firmware: Firmware, ports_glob: str, kind: str = "none",
                 aws: dict[str, Any] | None = None, baud: int | str = BAUD) -> Path:
    """A station.toml like `station demo` writes, with the registrar under test."""
    registrar = f'[registrar]\nkind = "{kind}"\n'
    if aws:
        registrar += "\n[registrar.aws]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in aws.items())
    text = f"""\
# Written by benchmarks/common.py
[station]
name = "bench"
state_dir = "state"
max_parallel = 16

[ports]
watch = [{json.dumps(ports_glob)}]
baud = {json.dumps(baud)}
rescan_interval = 1.0

[firmware]
chip = "{CHIP}"
flasher_args = {json.dumps(str(firmware.flasher_args))}

[identity]
thing_name = "bench-{{mac}}"

{registrar}
[credentials]
out_dir = "certs_out"
partition = "nvs"
namespace = "station"
"""
    path = workdir / "station.toml"
    path.write_text(text)
    return path


# -- processes --------------------------------------------------------------------------


@dataclass
class Usage:
    """What the kernel says a finished child used."""

    returncode: int
    cpu_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float
    wall_s: float


class Processes:
    """Every child a benchmark starts; all are stopped (SIGINT, then kill) on exit."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.children):
            stop(proc)

    def start(self, cmd: Sequence[str], log: Path | None = None, *, stdout_pipe: bool = False,
              env: dict[str, str] | None = None, cwd: Path | None = None
              ) -> subprocess.Popen[bytes]:
        out: IO[bytes] | int
        if stdout_pipe:
            out = subprocess.PIPE
        elif log is not None:
            out = log.open("wb")
        else:
            out = subprocess.DEVNULL
        try:
            proc = subprocess.Popen(list(cmd), stdout=out, stdin=subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT if log is not None and not stdout_pipe
                                    else (log.open("wb") if log is not None
                                          else subprocess.DEVNULL),
                                    env=env, cwd=cwd)
        finally:
            if not isinstance(out, int):
                out.close()
        proc.started = time.time()  # type: ignore[attr-defined]
        self.children.append(proc)
        return proc


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT,
         timeout: float = STOP_TIMEOUT) -> None:
    """Ask a child to stop; kill it if it does not within `timeout`."""
    if proc.returncode is not None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def span_s(started: Sequence[subprocess.Popen[bytes]], usages: Sequence[Usage]) -> float:
    """Wall seconds from the first process's start to the last one's end (each process
    carries its `started` time, set by `Processes.start`)."""
    first = min(p.started for p in started)  # type: ignore[attr-defined]
    return float(max(p.started + u.wall_s  # type: ignore[attr-defined]
                     for p, u in zip(started, usages, strict=True)) - first)


def wait_usage(proc: subprocess.Popen[bytes], timeout: float) -> Usage:
    """Wait for a child with `os.wait4`, which also gives its own rusage."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args!r} did not finish within {timeout:.0f}s")
        time.sleep(0.02)
    ended = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Usage(returncode=proc.returncode, cpu_s=ru.ru_utime + ru.ru_stime,
                 user_s=ru.ru_utime, sys_s=ru.ru_stime, max_rss_mb=ru.ru_maxrss / 1024,
                 wall_s=ended - proc.started)  # type: ignore[attr-defined]


class Rig:
    """`python -m station.sim` in its own process; plug times stamped as they arrive."""

    def __init__(self, procs: Processes, boards: int, directory: Path, seed: int = 1,
                 plug_interval: float = 0.0, throttle: bool = True,
                 flash_timing: bool = True, extra_args: Sequence[str] = ()) -> None:
        self.boards = boards
        self.directory = directory
        cmd = [sys.executable, "-m", "station.sim", "--boards", str(boards), "--dir",
               str(directory), "--seed", str(seed), "--plug-interval", str(plug_interval)]
        if not throttle:
            cmd.append("--no-throttle")
        if not flash_timing:
            cmd.append("--no-flash-timing")
        cmd += list(extra_args)  # e.g. --bridge cp2102, --usb jtag, --chip esp32s3
        self.plugged: list[dict[str, Any]] = []
        self._all = threading.Event()
        self.proc = procs.start(cmd, stdout_pipe=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "plugged":
                    event["at"] = time.time()
                    self.plugged.append(event)
                    if len(self.plugged) >= self.boards:
                        self._all.set()
        self._all.set()

    def wait_plugged(self, timeout: float = PLUG_TIMEOUT) -> list[dict[str, Any]]:
        if not self._all.wait(timeout) or len(self.plugged) < self.boards:
            raise TimeoutError(f"the rig plugged {len(self.plugged)} of {self.boards} boards")
        return self.plugged

    @property
    def first_plug(self) -> float:
        return min(e["at"] for e in self.plugged)

    def ports(self) -> list[str]:
        return [e["port"] for e in sorted(self.plugged, key=lambda e: e["index"])]

    def close(self) -> Usage | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
        try:
            return wait_usage(self.proc, STOP_TIMEOUT)
        except (TimeoutError, ChildProcessError):
            stop(self.proc, signal.SIGKILL)
            return None


def wait_watching(proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT) -> float:
    """Wait until the station watches its ports (its watchdog opened an inotify fd).

    `station run` prints nothing when it is ready, so this looks at the process's file
    descriptors; a station that never gets there is left to fail on its own.
    """
    started = time.monotonic()
    fd_dir = Path(f"/proc/{proc.pid}/fd")
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the station exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if "inotify" in os.readlink(fd):
                        time.sleep(0.2)  # the first rescan runs right after
                        return time.monotonic() - started
        time.sleep(0.05)
    return time.monotonic() - started


def read_events(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class StationRun:
    """One `station run --exit-after N` on N freshly plugged boards."""

    boards: int
    kind: str
    returncode: int
    wall_s: float  # first plug -> last job finished
    usage: Usage
    rig_cpu_s: float | None
    jobs: list[dict[str, Any]] = field(default_factory=list)  # per board: result, timings
    loadavg: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and all(j["result"] == "done" for j in self.jobs) \
            and len(self.jobs) == self.boards

    def per_board(self) -> list[float]:
        return [j["seconds"] for j in self.jobs]

    def stage_means(self) -> dict[str, float]:
        stages: dict[str, list[float]] = {}
        for job in self.jobs:
            for stage, seconds in job["timings"].items():
                stages.setdefault(stage, []).append(seconds)
        return {k: round(sum(v) / len(v), 3) for k, v in stages.items()}

    def summary(self) -> dict[str, Any]:
        seconds = self.per_board()
        return {"boards": self.boards, "registrar": self.kind, "exit_code": self.returncode,
                "all_done": self.ok, "wall_s": round(self.wall_s, 2),
                "per_board_s": {"mean": round(sum(seconds) / len(seconds), 2),
                                "min": round(min(seconds), 2), "max": round(max(seconds), 2)}
                if seconds else None,
                "stage_means_s": self.stage_means(),
                "station_cpu_s": round(self.usage.cpu_s, 2),
                "station_cpu_s_per_board": round(self.usage.cpu_s / self.boards, 3),
                "station_peak_rss_mb": round(self.usage.max_rss_mb, 1),
                "rig_cpu_s": None if self.rig_cpu_s is None else round(self.rig_cpu_s, 2),
                "loadavg": self.loadavg}


def run_station(boards: int, firmware: Firmware, workdir: Path, kind: str = "none",
                aws: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                timeout: float = 300.0, seed: int = 1, flash_timing: bool = True,
                baud: int = BAUD, rig_args: Sequence[str] = ()) -> StationRun:
    """Start the station, wait until it watches, plug `boards` boards, wait for all."""
    if workdir.exists():
        shutil.rmtree(workdir)
    ports = workdir / "ports"
    ports.mkdir(parents=True)
    config = write_config(workdir, firmware, str(ports / "pci-*"), kind, aws, baud=baud)
    cmd = [sys.executable, "-m", "station", "run", "--config", str(config), "--exit-after",
           str(boards), "--headless"]
    with Processes() as procs:
        station = procs.start(cmd, workdir / "station.out", env=env, cwd=workdir)
        wait_watching(station)
        rig = Rig(procs, boards, ports, seed=seed, flash_timing=flash_timing,
                  extra_args=rig_args)
        try:
            rig.wait_plugged()
            usage = wait_usage(station, timeout)
        finally:
            rig_usage = rig.close()
    events = read_events(workdir / "state")
    started = {e["job_id"]: e["at"] for e in events if e["kind"] == "JobStarted"}
    jobs = [{"job_id": e["job_id"], "result": e["result"], "error": e["error"],
             "seconds": e["at"] - started[e["job_id"]], "finished_at": e["at"],
             "timings": e["timings"]} for e in events if e["kind"] == "JobFinished"]
    end = max((j["finished_at"] for j in jobs), default=time.time())
    run = StationRun(boards=boards, kind=kind, returncode=usage.returncode,
                     wall_s=end - rig.first_plug, usage=usage,
                     rig_cpu_s=rig_usage.cpu_s if rig_usage else None, jobs=jobs,
                     loadavg=loadavg())
    if not run.ok:
        tail = (workdir / "station.out").read_text()[-2000:]
        raise RuntimeError(f"station run on {boards} boards: exit {usage.returncode}, "
                           f"{[j['result'] for j in jobs]}\n{tail}")
    return run


# -- esptool CLI ------------------------------------------------------------------------


def esptool_cmd(port: str, firmware: Firmware, baud: int = BAUD) -> list[str]:
    return [sys.executable, "-m", "esptool", "--chip", CHIP, "--port", port, "--baud",
            str(baud), "--before", "default-reset", "--after", "hard-reset", "write-flash",
            *firmware.write_flash_args()]


# -- output -----------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(name: str, keep: bool = False) -> Iterator[Path]:
    """A scratch folder for one benchmark (removed afterwards unless `keep`)."""
    path = Path(tempfile.mkdtemp(prefix=f"station-bench-{name}-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def target(name: str, value: float | None, limit: float, op: str, unit: str = "",
           note: str = "") -> dict[str, Any]:
    """One target row: `value op limit` (op is "<=" or ">=")."""
    met = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"target": name, "value": None if value is None else round(value, 3),
            "limit": f"{op} {round(limit, 3):g}{unit}", "met": met, "note": note}


def write_json(result: dict[str, Any], name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- the line-rate floor and the flash chip's model -------------------------------------


def frame_bytes(payload: int, escapes: int = 0) -> int:
    """A SLIP frame on the wire: 8-byte header, payload, escapes, two delimiters."""
    return 8 + payload + escapes + 2


def modelled_flash_seconds(firmware: Firmware, baud: int = BAUD) -> float:
    """What the write phase takes on the rig's flash model with an infinitely fast host.

    The stub (esptool's legacy flasher stub, which the rig models) ACKs a block on
    receipt, then erases what the block needs (64 KB blocks where aligned) and programs
    it while the next block is on the wire; the next block waits if the flash is still
    busy. The difference between this and the line-rate floor is the flash chip, not
    the host.
    """
    import zlib

    from station.config import FirmwareSection
    from station.flash import load_firmware
    from station.sim.flash import BLOCK, FlashTiming, erase_plan

    timing = FlashTiming()
    bundle = load_firmware(FirmwareSection(chip=CHIP, flasher_args=firmware.flasher_args,
                                           images=()))
    block = 0x4000  # the stub's FLASH_WRITE_SIZE
    reply = line_seconds(frame_bytes(2), baud)
    now = busy = 0.0
    for region in bundle.regions:
        inflate = zlib.decompressobj()
        data = region.compressed
        plan = erase_plan(region.offset, len(region.data))
        erased = write = region.offset
        now += line_seconds(frame_bytes(16) + frame_bytes(2), baud)  # FLASH_DEFL_BEGIN
        for i in range(0, len(data), block):
            chunk = data[i:i + block]
            escapes = chunk.count(0xC0) + chunk.count(0xDB)
            arrival = now + line_seconds(frame_bytes(16 + len(chunk), escapes), baud)
            start = max(arrival, busy)  # the stub takes the block once the flash is free
            now = start + reply
            out = len(inflate.decompress(chunk))
            write += out
            seconds = 0.0
            while plan and erased < write:
                addr, length = plan.pop(0)
                seconds += timing.erase(0, 1) if length == BLOCK else timing.erase(1, 0)
                erased = addr + length
            busy = start + seconds + timing.program(out)
        now = max(now, busy)  # FLASH_DEFL_END waits for the last block
    return now


# -- one benchmark session: firmware built once, station runs shared between scripts ----


@dataclass
class Context:
    """Shared by the scripts of one `run_all`: the firmware, and runs already made
    (the 16-board station run serves scaling, efficiency, host and registration)."""

    root: Path
    firmware: Firmware
    station_runs: dict[tuple[Any, ...], StationRun] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def station(self, boards: int, kind: str = "none", flash_timing: bool = True,
                baud: int = BAUD, **kwargs: Any) -> StationRun:
        key = (boards, kind, flash_timing, baud, tuple(kwargs.get("rig_args", ())))
        if key not in self.station_runs:
            at = "" if baud == BAUD else f" at {baud} Bd"
            print(f"  station run: {boards} board(s), registrar {kind}{at}"
                  f"{'' if flash_timing else ', rig without flash timing'} ...", flush=True)
            name = f"station-{kind}-{boards}{'' if flash_timing else '-line-only'}" \
                f"{'' if baud == BAUD else f'-{baud}'}"
            run = run_station(boards, self.firmware, self.root / name, kind=kind,
                              flash_timing=flash_timing, baud=baud, **kwargs)
            print(f"    {run.wall_s:.2f}s, {run.usage.cpu_s:.2f} CPU-s, "
                  f"{run.usage.max_rss_mb:.0f} MB", flush=True)
            self.station_runs[key] = run
        return self.station_runs[key]


@contextlib.contextmanager
def context(name: str, keep: bool = False) -> Iterator[Context]:
    with workspace(name, keep) as root:
        yield Context(root=root, firmware=make_firmware(root / "firmware"))


def floors(firmware: Firmware, extra_compressed: int = 0) -> dict[str, float]:
    """The line-rate floor (s) for the firmware (+ e.g. the NVS partition)."""
    return {"bytes_sent": firmware.compressed + extra_compressed,
            "line_s": round(line_seconds(firmware.compressed + extra_compressed), 3)}


def standalone(name: str, run: Any, argv: Sequence[str] | None = None) -> int:
    """`python benchmarks/<name>.py`: one benchmark, its JSON and its table rows."""
    import argparse

    parser = argparse.ArgumentParser(description=f"station benchmark: {name}")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    load = loadavg()
    with context(name, args.keep) as ctx:
        if args.keep:
            print(f"scratch folder: {ctx.root}")
        result = {"machine": machine(), "loadavg_start": load, name: run(ctx),
                  "loadavg_end": loadavg()}
    path = write_json(result, name)
    print_targets(result[name].get("targets", []))
    print(f"written {path}")
    return 0


def print_targets(rows: Sequence[dict[str, Any]]) -> None:
    width = max((len(r["target"]) for r in rows), default=10)
    for r in rows:
        met = {True: "met", False: "MISSED", None: "n/a"}[r["met"]]
        value = "-" if r["value"] is None else f"{r['value']:g}"
        print(f"  {r['target']:<{width}}  {value:>10}  {r['limit']:<12} {met}")


def markdown_targets(rows: Sequence[dict[str, Any]]) -> str:
    """The targets as a Markdown table (for BENCHMARKS.md)."""
    lines = ["| target | value | limit | met | note |", "| --- | ---: | --- | --- | --- |"]
    for r in rows:
        met = {True: "met", False: "**missed**", None: "n/a"}[r["met"]]
        value = "-" if r["value"] is None else f"{r['value']:g}"
        lines.append(f"| {r['target']} | {value} | {r['limit']} | {met} | {r['note']} |")
    return "\n".join(lines)
