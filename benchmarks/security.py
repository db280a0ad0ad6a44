"""Locking boards at line rate (issue 20): what flash encryption, secure boot v2 and the
release-mode lock-down add per board.

Two `station run`s of 16 boards at 2 Mbaud, the rig in its own process with line-rate
throttling and flash timing on, the 1.5 MB demo app, one chip (esp32s3: XTS-AES, the
usual secure product), the boot check on in both (a locked line needs it, and the
difference should be the security work alone):

- plain: the demo build for the chip, no [security];
- secure: the same app built for flash encryption and secure boot v2 (station.demo
  `secure=True`), `[security] flash_encryption = "release"`, `key = "host"`,
  `secure_boot = "v2"` (the station signs at start with a key made here by espsecure),
  `lockdown = true`.

Target: per board (job start to done, mean of 16) the secure run adds <= 1.0 s. The
profile comes from the station's own records: per-stage timings of each job
(`JobFinished.timings`), the security journal's before/after lines of each eFuse batch
(`SecurityStep.at`), and, measured here in-process, the host's per-board work that has
no journal line (key generation, the images' encryption with espsecure).

Run alone: `python benchmarks/security.py [--boards 16]`; part of `run_all`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from processes import read_events

CHIP = "esp32s3"
BAUD = 2_000_000
BOARDS = 16
TARGET_S = 1.0
STEPS = ("key", "encrypt", "secure_boot", "lockdown")
SECURITY = """
[verify]
boot = "app"
boot_timeout = 10.0
"""
LOCK = """
[security]
flash_encryption = "release"
key = "host"
secure_boot = "v2"
signing_key = "{key}"
lockdown = true
"""


def _signing_key(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "espsecure", "generate-signing-key", "--version",
                    "2", "--scheme", "rsa3072", str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return path


def _run(root: Path, name: str, firmware: common.Firmware, boards: int,
         extra: str) -> tuple[common.StationRun, list[dict[str, Any]]]:
    from station.sim.pty_lines import relay_env

    sock = root / f"{name}.sock"  # DTR/RTS of the ptys: the boot check resets the board
    print(f"  station run: {boards} board(s), {name}, {CHIP} at {BAUD} Bd ...", flush=True)
    run = common.run_station(boards, firmware, root / name, baud=BAUD, chip=CHIP,
                             extra=extra, env=relay_env(sock),
                             rig_args=["--chip", CHIP, "--pty-lines", str(sock)],
                             timeout=600.0)
    print(f"    {run.wall_s:.2f}s, {run.usage.cpu_s:.2f} CPU-s", flush=True)
    return run, read_events(root / name / "state")


def _batches(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Each eFuse batch's duration, from its journal lines (before -> after)."""
    before: dict[tuple[str, str], float] = {}
    took: dict[str, list[float]] = {step: [] for step in STEPS}
    for e in events:
        if e["kind"] != "SecurityStep" or e["step"] not in took:
            continue
        where = (e["job_id"], e["step"])
        if e["phase"] == "before":
            before[where] = e["at"]
        elif e["phase"] == "after" and where in before:
            took[e["step"]].append(e["at"] - before.pop(where))
    return {step: {"mean_s": round(statistics.fmean(v), 3), "max_s": round(max(v), 3),
                   "boards": len(v)} for step, v in took.items() if v}


def _host_work(firmware: common.Firmware, repeat: int = 5) -> dict[str, float]:
    """Per board on the host, no journal line: a fresh key, the images' ciphertext."""
    from station.config import FirmwareSection
    from station.flash import load_firmware
    from station.security.images import SecuredFirmware, key_fingerprint

    bundle = load_firmware(FirmwareSection(chip=CHIP, flasher_args=firmware.flasher_args,
                                           images=()))
    secured = SecuredFirmware(chip=CHIP, regions=bundle.regions, encrypted=frozenset(),
                              digest=None)
    keygen, encrypt = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        key = os.urandom(32)
        key_fingerprint(key)
        keygen.append(time.perf_counter() - started)
        started = time.perf_counter()
        for region in bundle.regions:
            secured.encrypt_for(key, region)
        encrypt.append(time.perf_counter() - started)
    return {"key_generation_s": round(statistics.fmean(keygen), 6),
            "encryption_s": round(statistics.fmean(encrypt), 3),
            "encrypted_bytes": sum(len(r.data) for r in bundle.regions)}


def batch_profile(root: Path, key_file: Path) -> dict[str, Any]:
    """One board alone on the rig (its own process, throttled, flash timing on), the
    station's own eFuse code (security.efuses, one view per loader as a board gets)
    over esptool at 2 Mbaud: each batch's seconds and serial commands (round trips)."""
    import esptool
    from processes import Processes, Rig

    from station.config import load
    from station.security import chip_plan
    from station.security import efuses as fuses

    config = common.write_config(root, common.make_firmware(root / "fw", chip=CHIP,
                                                            secure=True),
                                 str(root / "none-*"), chip=CHIP,
                                 extra=SECURITY + LOCK.format(key=key_file))
    plan = chip_plan(CHIP, load(config).security)
    out: dict[str, Any] = {}
    with Processes() as procs:
        rig = Rig(procs, 1, root / "ports", extra_args=["--chip", CHIP])
        port = rig.wait_plugged()[0]["port"]
        esp = esptool.detect_chip(port, 115200).run_stub()
        esp.change_baud(BAUD)
        sent = [0]
        command = esp.command

        def counted(*args: Any, **kwargs: Any) -> Any:
            sent[0] += 1
            return command(*args, **kwargs)
        esp.command = counted
        view = fuses.Efuses()

        def timed(name: str, work: Any) -> Any:
            sent[0], started = 0, time.perf_counter()
            result = work()
            out[name] = {"s": round(time.perf_counter() - started, 3), "commands": sent[0]}
            return result
        state = timed("read (init)", lambda: fuses.read_state(esp, plan, view))
        for step in plan.steps:
            timed(step.name, lambda step=step, state=state: fuses.burn(  # type: ignore[misc]
                esp, plan, step, state, key=os.urandom(32),
                signing_key_pem=key_file.read_bytes(), view=view))
            if step.name == "key":
                state = timed("read (view)", lambda: fuses.read_state(esp, plan, view))
        esp._port.close()
        rig.close()
    return out


def run(ctx: common.Context, boards: int = BOARDS) -> dict[str, Any]:
    root = ctx.root / "security"
    root.mkdir(parents=True, exist_ok=True)
    plain_fw = common.make_firmware(root / "fw-plain", chip=CHIP)
    secure_fw = common.make_firmware(root / "fw-secure", chip=CHIP, secure=True)
    key = _signing_key(root / "signing.pem")
    plain, _ = _run(root, "plain", plain_fw, boards, SECURITY)
    locked, events = _run(root, "secure", secure_fw, boards,
                          SECURITY + LOCK.format(key=key))
    plain_s = plain.summary()
    locked_s = locked.summary()
    added = locked_s["per_board_s"]["mean"] - plain_s["per_board_s"]["mean"]
    stages = sorted(set(plain_s["stage_means_s"]) | set(locked_s["stage_means_s"]))
    by_stage = {s: {"plain_s": plain_s["stage_means_s"].get(s, 0.0),
                    "secure_s": locked_s["stage_means_s"].get(s, 0.0),
                    "added_s": round(locked_s["stage_means_s"].get(s, 0.0)
                                     - plain_s["stage_means_s"].get(s, 0.0), 3)}
                for s in stages}
    result: dict[str, Any] = {
        "chip": CHIP, "baud": BAUD, "boards": boards, "app_bytes": common.APP_SIZE,
        "plain": plain_s, "secure": locked_s,
        "added_per_board_s": round(added, 3),
        "added_wall_per_board_s": round((locked.wall_s - plain.wall_s) / boards, 3),
        "stages": by_stage, "efuse_batches": _batches(events),
        "host": _host_work(secure_fw),
        "one_board_batches": batch_profile(root / "profile", key)}
    result["targets"] = [common.target(
        f"security adds per board ({boards} boards, {CHIP}, {BAUD} Bd, release + SBv2 + "
        "lock-down)", added, TARGET_S, "<=", "s",
        note=f"plain {plain_s['per_board_s']['mean']:.2f}s, secure "
             f"{locked_s['per_board_s']['mean']:.2f}s"),
        common.target(f"security adds to the line's time per board ({boards} boards, wall "
                      "/ boards)", result["added_wall_per_board_s"], TARGET_S, "<=", "s",
                      note=f"wall {plain.wall_s:.1f}s -> {locked.wall_s:.1f}s")]
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="station benchmark: locking boards")
    parser.add_argument("--boards", type=int, default=BOARDS)
    parser.add_argument("--name", default="security", help="results/<name>.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    load = common.loadavg()
    with common.context("security", args.keep) as ctx:
        if args.keep:
            print(f"scratch folder: {ctx.root}")
        result = run(ctx, args.boards)
    out = {"machine": common.machine(), "loadavg_start": load, "security": result,
           "loadavg_end": common.loadavg()}
    path = common.write_json(out, args.name)
    common.print_targets(result["targets"])
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
