"""Where the write phase goes (issue #23): one board, one chip, per data block.

A rig (`python -m station.sim`, its own process, line and flash timing on, one board of
the chip on a CP2102N bridge); the station's flasher (`EsptoolFlasher`, this process)
connects at the rate and writes the demo firmware for that chip region by region, as the
worker does, with every FLASH_DEFL_DATA round trip stamped on the host:

- `line_s`: the block's frame and its 12-byte ACK on the wire (10 bits per byte);
- `wait_s`: the rest of the round trip, split into `flash_lag_s`, the stub not yet free
  to take the block because the flash still programs the previous one (esp-flasher-stub
  ACKs a block, then inflates and writes it before it reads the next command: one block
  in flight, `handle_command` / `s_flash_defl_data_post_process`; the previous block's
  programming time from the sim's FlashTiming, counted from its ACK), and
  `turnaround_s`, the rest: the host's and the rig's own latency per round trip;
- begin / finish: FLASH_DEFL_BEGIN (first erase step) and FLASH_DEFL_END (the last
  block's programming);
- `modelled_flash_s`: the same blocks on the sim's flash model with an infinitely fast
  host (line time + the stub's programming time whenever it exceeds the line's).

CPU: `time.process_time()` of this (host) process over the write.

Run alone: `python benchmarks/writeprofile.py [--chip esp32] [--baud 2000000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import common
import flashmodel
import processes

ACK = flashmodel.frame_bytes(2)  # the stub's FLASH_DEFL_DATA reply


def _frame_bytes(payload: bytes) -> int:
    return flashmodel.frame_bytes(len(payload), payload.count(0xC0) + payload.count(0xDB))


def _modelled(regions: Any, baud: int) -> float:
    """Line time of every block, plus the flash's programming wherever it lags the line
    (blank chip: esp-flasher-stub skips every erase; the sim's FlashTiming)."""
    from station.sim.flash import FlashTiming

    timing = FlashTiming()
    now = busy = 0.0
    for region in regions:
        inflate = zlib.decompressobj()
        now += flashmodel.line_seconds(flashmodel.frame_bytes(16) + 12, baud)
        for i in range(0, len(region.compressed), 0x4000):
            chunk = region.compressed[i:i + 0x4000]
            arrival = now + flashmodel.line_seconds(_frame_bytes(b"\0" * 16 + chunk), baud)
            start = max(arrival, busy)  # the stub takes the block once the flash is free
            now = start + flashmodel.line_seconds(ACK, baud)
            busy = start + timing.program(len(inflate.decompress(chunk)))
        now = max(now, busy) + flashmodel.line_seconds(flashmodel.frame_bytes(4) + 12, baud)
    return now


def profile(chip: str, baud: int, root: Path) -> dict[str, Any]:
    import station.flash._write as write_mod
    from station.config import FirmwareSection
    from station.demo import make_demo_firmware
    from station.flash import EsptoolFlasher, load_firmware
    from station.sim.flash import FlashTiming

    args = make_demo_firmware(root / f"fw-{chip}", chip=chip, app_size=common.APP_SIZE)
    bundle = load_firmware(FirmwareSection(chip=chip, flasher_args=args, images=()))
    blocks: list[dict[str, float]] = []
    original = write_mod._command

    timing = FlashTiming()
    inflater: list[Any] = [None]  # the region's stream, as the stub inflates it

    def stamped(esp: Any, op: int, payload: bytes, chk: int, timeout: float,
                what: str) -> None:
        sent = time.perf_counter()
        original(esp, op, payload, chk, timeout, what)
        acked = time.perf_counter()
        frame = flashmodel.line_seconds(_frame_bytes(payload), baud)
        ack = flashmodel.line_seconds(ACK, baud)
        # the stub took the previous block when its ACK left, and programs it meanwhile
        busy = blocks[-1]["busy"] if blocks else 0.0
        lag = max(0.0, busy - (sent + frame))
        inflated = len(inflater[0].decompress(payload[16:]))
        blocks.append({"rtt_s": acked - sent, "line_s": frame + ack,
                       "wait_s": acked - sent - frame - ack, "flash_s": lag,
                       "busy": acked - ack + timing.program(inflated)})

    write_mod._command = stamped  # type: ignore[assignment]
    out: dict[str, Any] = {"chip": chip, "baud": baud, "regions": []}
    with processes.Processes() as procs:
        rig = processes.Rig(procs, 1, root / f"rig-{chip}",
                            extra_args=["--chip", chip, "--bridge", "cp2102n"])
        port = rig.wait_plugged()[0]["port"]

        async def go() -> None:
            flasher = EsptoolFlasher(baud=baud, chips=(chip,))
            t0 = time.perf_counter()
            session = await flasher.open(port)
            out["connect_s"] = round(time.perf_counter() - t0, 3)
            esp = session.esp
            cpu0, w0 = time.process_time(), time.perf_counter()
            for region in bundle.regions:
                del blocks[:]
                inflater[0] = zlib.decompressobj()
                calls: dict[str, float] = {}
                for name in ("flash_defl_begin", "flash_defl_finish"):
                    fn = getattr(esp, name)

                    def timed(*a: Any, _fn: Any = fn, _n: str = name,
                              _calls: dict[str, float] = calls, **k: Any) -> Any:
                        s = time.perf_counter()
                        try:
                            return _fn(*a, **k)
                        finally:
                            _calls[_n] = time.perf_counter() - s
                    setattr(esp, name, timed)
                r0 = time.perf_counter()
                await session.write(region, lambda done, total: None)
                for name in ("flash_defl_begin", "flash_defl_finish"):
                    delattr(esp, name)
                total = time.perf_counter() - r0
                n = len(blocks)
                waits = sorted(b["wait_s"] for b in blocks)
                out["regions"].append({
                    "name": region.name, "bytes": len(region.data),
                    "sent": len(region.compressed), "blocks": n,
                    "total_s": round(total, 3),
                    "floor_s": round(flashmodel.line_seconds(len(region.compressed), baud), 3),
                    "line_s": round(sum(b["line_s"] for b in blocks), 3),
                    "wait_s": round(sum(waits), 3),
                    "flash_lag_s": round(sum(b["flash_s"] for b in blocks), 3),
                    "turnaround_s": round(sum(b["wait_s"] - b["flash_s"] for b in blocks), 3),
                    "wait_median_ms": round(1e3 * waits[n // 2], 2) if n else 0.0,
                    "wait_max_ms": round(1e3 * waits[-1], 2) if n else 0.0,
                    "begin_s": round(calls.get("flash_defl_begin", 0.0), 3),
                    "finish_s": round(calls.get("flash_defl_finish", 0.0), 3)})
            out["write_s"] = round(time.perf_counter() - w0, 3)
            out["write_cpu_s"] = round(time.process_time() - cpu0, 3)
            t1 = time.perf_counter()
            for region in bundle.regions:
                await session.verify(region)
            out["verify_s"] = round(time.perf_counter() - t1, 3)
            await session.close()

        asyncio.run(go())
    write_mod._command = original  # type: ignore[assignment]
    out["floor_s"] = round(flashmodel.line_seconds(bundle.compressed_bytes, baud), 3)
    out["modelled_flash_s"] = round(_modelled(bundle.regions, baud), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="station benchmark: the write phase")
    parser.add_argument("--chip", default="esp32")
    parser.add_argument("--baud", type=int, default=2_000_000)
    parser.add_argument("--name", default=None, help="results/<name>.json")
    args = parser.parse_args(argv)
    with common.workspace("writeprofile") as root:
        result = profile(args.chip, args.baud, root)
    print(json.dumps(result, indent=1))
    if args.name:
        print(f"written {common.write_json(result, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
