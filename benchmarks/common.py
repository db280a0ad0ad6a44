"""Shared plumbing of the benchmarks: firmware, configs, the station run, esptool, output.

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
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processes import Processes, Rig, Usage, read_events, wait_usage, wait_watching

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BAUD = 921600
APP_SIZE = 1_500_000
CHIP = "esp32"


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


def make_firmware(directory: Path, chip: str = CHIP, secure: bool = False) -> Firmware:
    """The demo build (bootloader, partition table, 1.5 MB app at ~60%), deterministic;
    `secure`: built for flash encryption and secure boot v2 (station.demo)."""
    from station.config import FirmwareSection
    from station.demo import make_demo_firmware
    from station.flash import load_firmware

    args = make_demo_firmware(directory, chip=chip, app_size=APP_SIZE, secure=secure)
    bundle = load_firmware(FirmwareSection(chip=chip, flasher_args=args, images=()))
    files = json.loads(args.read_text())["flash_files"]
    images = tuple(Image(name=r.name, offset=r.offset,
                         path=directory / files[f"0x{r.offset:x}"], size=len(r.data),
                         compressed=len(r.compressed)) for r in bundle.regions)
    return Firmware(flasher_args=args, images=images)


# -- config -----------------------------------------------------------------------------


def write_config(workdir: Path, firmware: Firmware, ports_glob: str, kind: str = "none",
                 aws: dict[str, Any] | None = None, baud: int | str = BAUD,
                 chip: str = CHIP, extra: str = "") -> Path:
    """A station.toml like `station demo` writes, with the registrar under test; `extra`
    is appended (more sections: [verify], [security])."""
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
chip = "{chip}"
flasher_args = {json.dumps(str(firmware.flasher_args))}

[identity]
thing_name = "bench-{{mac}}"

{registrar}
[credentials]
out_dir = "certs_out"
partition = "nvs"
namespace = "station"
{extra}"""
    path = workdir / "station.toml"
    path.write_text(text)
    return path



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
                baud: int = BAUD, rig_args: Sequence[str] = (), chip: str = CHIP,
                extra: str = "") -> StationRun:
    """Start the station, wait until it watches, plug `boards` boards, wait for all."""
    if workdir.exists():
        shutil.rmtree(workdir)
    ports = workdir / "ports"
    ports.mkdir(parents=True)
    config = write_config(workdir, firmware, str(ports / "pci-*"), kind, aws, baud=baud,
                          chip=chip, extra=extra)
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
             "started_at": started[e["job_id"]],
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
