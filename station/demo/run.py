"""`station demo`: the real station on virtual boards, with no hardware and no cloud.

The rig runs in its own process (`python -m station.sim`), exactly as real boards are
outside the station; the daemon is the unchanged `station run`, pointed at the rig's
by-path folder with a generated ESP-IDF-like firmware for each chip on the rig (a mixed
rig: one `[[firmware]]` entry per chip) and a local CA. It takes the
boards it is given and stops when all are final, leaving the ledger, certs_out and the
boards' flash dumps in the working folder for a look afterwards.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from station.app import serve, setup_logging
from station.config import load
from station.daemon import Options
from station.demo.firmware import make_demo_firmware
from station.sim.pty_lines import give_this_process_lines

RIG_STOP_TIMEOUT = 30.0
DEMO_CHIPS = ("esp32", "esp32s3", "esp32c3")  # the rig's boards cycle through these


def write_demo_config(workdir: Path, flasher_args: Path | dict[str, Path],
                      ports_glob: str) -> Path:
    """A station.toml for the demo: local CA, NVS credentials, the rig's ports; one
    [firmware] table, or a [[firmware]] entry per chip given {chip: flasher_args}."""
    builds = flasher_args if isinstance(flasher_args, dict) else {"esp32": flasher_args}
    if len(builds) == 1:
        ((chip, args),) = builds.items()
        firmware = f"[firmware]\nchip = \"{chip}\"\nflasher_args = {json.dumps(str(args))}\n"
    else:
        firmware = "".join(f"[[firmware]]\nchip = \"{chip}\"\n"
                           f"flasher_args = {json.dumps(str(args))}\n\n"
                           for chip, args in builds.items()).rstrip() + "\n"
    text = f"""\
# Written by `station demo`; a working example of a full station.toml.
[station]
name = "demo"
state_dir = "state"
max_parallel = 16

[ports]
watch = [{json.dumps(ports_glob)}]
baud = 921600
rescan_interval = 1.0

{firmware}
[identity]
thing_name = "demo-{{mac}}"

[registrar]
kind = "local-ca"

[registrar.local_ca]
dir = "ca"
endpoint = "mqtt.demo.local:8883"

[credentials]
out_dir = "certs_out"
partition = "nvs"
namespace = "station"

[verify]
boot = "app"  # read each board's boot story after the reset: does it run our app?
"""
    path = workdir / "station.toml"
    path.write_text(text)
    return path


def run_demo(boards: int, workdir: Path, headless: bool, throttle: bool = True) -> int:
    workdir = workdir.resolve()  # the config's paths are taken from its own folder
    if workdir.exists():
        shutil.rmtree(workdir)
    rig_dir = workdir / "rig"
    rig_dir.mkdir(parents=True)
    builds = {chip: make_demo_firmware(workdir / "firmware" / chip, chip=chip)
              for chip in DEMO_CHIPS}
    config = load(write_demo_config(workdir, builds, str(rig_dir / "ports" / "pci-*")))
    setup_logging(config, headless)
    # The rig's boards have the devkit's auto-reset circuit, and this process's ports
    # carry DTR/RTS to it (station/sim/pty_lines.py), as a USB-UART bridge's driver does.
    lines = rig_dir / "pty-lines.sock"
    give_this_process_lines(lines)
    rig = _start_rig(boards, rig_dir, throttle, lines)
    try:
        print(f"station demo: {boards} virtual boards in {rig_dir / 'ports'}; "
              f"results in {workdir}", flush=True)
        code = asyncio.run(serve(config, Options(exit_after=boards), headless=headless))
    finally:
        _stop_rig(rig)
    print(f"station demo: done; ledger: station ledger --config {config.path}")
    return code


def _start_rig(boards: int, rig_dir: Path, throttle: bool,
               lines: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "station.sim", "--boards", str(boards),
           "--dir", str(rig_dir / "ports"), "--plug-interval", "0.25", "--seed", "7",
           "--chip", ",".join(DEMO_CHIPS), "--pty-lines", str(lines), "--en-cap", "1"]
    if not throttle:
        cmd.append("--no-throttle")
    log = (rig_dir / "rig.log").open("wb")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    finally:
        log.close()


def _stop_rig(rig: subprocess.Popen[bytes]) -> None:
    rig.send_signal(signal.SIGINT)
    try:
        rig.wait(timeout=RIG_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        rig.kill()
        rig.wait(timeout=5)
