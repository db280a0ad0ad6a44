"""Connect per chip (issue #23): how long a board takes from its port to a stub at the
line rate, on every chip the sim offers, and what a baud step-down costs.

- Connect per chip: a rig (`python -m station.sim`, its own process, line-rate
  throttling and flash timing on, CP2102N bridges) with one board of each chip; the
  station's flasher (`EsptoolFlasher.open`, this process, firmware for that chip, as a
  `[firmware] chip = ...` station) connects to each board twice at each rate: the
  slot's first board and a later one. Sequential, one board at a time.
- Step-down: the same on CP2102 bridges (921600 at most) asked for 3 Mbaud, a fresh
  flasher each time (no slot memory), twice per chip: the port as a real rig's sysfs
  names it (10c4:ea60 from the rig's plugged event, the CP2102's product string "CP2102
  USB to UART Bridge Controller", handed to the flasher's `adapter=` seam: the station
  then knows the bridge's top, issue #23) and as the pty is (no USB device: an unknown
  adapter, 3 rungs 3M -> 2M -> 1.5M -> 921600). The cost is that connect minus a calm
  connect of the same board at 921600 (the rate it ends at; earlier tables took the
  CP2102N connect at 3 Mbaud, kept in the JSON as `calm_3m_cp2102n_s`).
- One station run (`station run`, 1 and 16 ESP32 boards at 2 Mbaud, the 1.5 MB demo app
  of BENCHMARKS.md): per board against the line-rate floor, T(16)/T(1), stage means.

Run alone: `python benchmarks/connect.py [--rates 921600,2000000,3000000] [--no-station]
[--step-only] [--station-at 921600,3000000 [--station-only]]`.
It measures whatever `station` package Python imports (PYTHONPATH may point at another
checkout to measure the code before a change with the same script).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import flashmodel
import processes

CHIPS = ("esp32", "esp32s2", "esp32s3", "esp32c2", "esp32c3", "esp32c5", "esp32c6",
         "esp32c61", "esp32h2", "esp32h21", "esp32h4", "esp32p4", "esp32s31")  # with a stub
RATES = (921_600, 2_000_000, 3_000_000)
STEP_CHIPS = ("esp32", "esp32c3", "esp32s3")
STEP_FROM = 3_000_000
STEP_RUNGS = 3  # 3M -> 2M -> 1.5M -> 921600 (ports/baud.py LADDER)
OPENS = 2  # the slot's first board, then a later one
OPEN_TIMEOUT = 60.0


def _connect_s(flasher: Any, port: str) -> float:
    async def go() -> float:
        started = time.monotonic()
        session = await asyncio.wait_for(flasher.open(port), OPEN_TIMEOUT)
        took = time.monotonic() - started
        await session.close()
        return took
    return asyncio.run(go())


def _rig(procs: processes.Processes, chips: tuple[str, ...], directory: Path,
         bridge: str) -> list[str]:
    rig = processes.Rig(procs, len(chips), directory,
                        extra_args=["--chip", ",".join(chips), "--bridge", bridge])
    plugged = sorted(rig.wait_plugged(), key=lambda e: e["index"])
    assert [e["chip"] for e in plugged] == list(chips), plugged
    return [e["port"] for e in plugged]


def per_chip(root: Path, rates: tuple[int, ...]) -> dict[str, Any]:
    from station.flash import EsptoolFlasher

    out: dict[str, Any] = {}
    with processes.Processes() as procs:
        ports = _rig(procs, CHIPS, root / "chips", "cp2102n")
        for chip, port in zip(CHIPS, ports, strict=True):
            out[chip] = {}
            for baud in rates:
                flasher = EsptoolFlasher(baud=baud, chips=(chip,))
                times = [_connect_s(flasher, port) for _ in range(OPENS)]
                out[chip][str(baud)] = {"first_s": round(times[0], 3),
                                        "later_s": round(statistics.fmean(times[1:]), 3)}
            print(f"    {chip}: " + ", ".join(f"{b}: {v['first_s']:.2f}/{v['later_s']:.2f}s"
                                              for b, v in out[chip].items()), flush=True)
    return out


def _sysfs_adapter(event: dict[str, Any]) -> Any:
    """What pyserial's sysfs reader gives the station for this bridge on a real rig: the
    VID:PID the rig reports and the chip's own product string."""
    from serial.tools.list_ports_common import ListPortInfo

    from station.ports.baud import classify

    info = ListPortInfo(event["port"], skip_link_detection=True)
    vid, pid = (int(x, 16) for x in event["vid_pid"].split(":"))
    info.vid, info.pid = vid, pid
    info.product = f"{event['bridge'].upper()} USB to UART Bridge Controller"
    return classify(info)


def _always(adapter: Any) -> Any:
    return lambda _port: adapter


def step_down(root: Path, calm: dict[str, Any] | None) -> dict[str, Any]:
    from station.flash import EsptoolFlasher

    out: dict[str, Any] = {}
    with processes.Processes() as procs:
        rig = processes.Rig(procs, len(STEP_CHIPS), root / "steps",
                            extra_args=["--chip", ",".join(STEP_CHIPS), "--bridge", "cp2102"])
        plugged = sorted(rig.wait_plugged(), key=lambda e: e["index"])
        for chip, event in zip(STEP_CHIPS, plugged, strict=True):
            assert event["chip"] == chip and event["bridge"] == "cp2102", event
            port, sysfs = event["port"], _sysfs_adapter(event)
            base = _connect_s(EsptoolFlasher(baud=921_600, chips=(chip,)), port)
            named = _connect_s(EsptoolFlasher(baud=STEP_FROM, chips=(chip,),
                                              adapter=_always(sysfs)), port)
            unknown = _connect_s(EsptoolFlasher(baud=STEP_FROM, chips=(chip,)), port)
            out[chip] = {"calm_921600_s": round(base, 3),
                         "named_s": round(named, 3), "named_cost_s": round(named - base, 3),
                         "unknown_s": round(unknown, 3),
                         "unknown_cost_s": round(unknown - base, 3),
                         "unknown_per_rung_s": round((unknown - base) / STEP_RUNGS, 3)}
            if calm is not None:
                out[chip]["calm_3m_cp2102n_s"] = calm[chip][str(STEP_FROM)]["first_s"]
            print(f"    {chip}: calm {base:.2f}s at 921600; from {STEP_FROM}: "
                  f"{named:.2f}s (+{named - base:.2f}) as sysfs names a CP2102, "
                  f"{unknown:.2f}s (+{unknown - base:.2f}) unknown adapter", flush=True)
    return out


def station_runs(ctx: common.Context, baud: int = 2_000_000) -> dict[str, Any]:
    floor = flashmodel.line_seconds(ctx.firmware.compressed, baud)
    runs = {n: ctx.station(n, baud=baud).summary() for n in (1, 16)}
    return {"baud": baud, "floor_s": round(floor, 3), "runs": runs,
            "t16_over_t1": round(runs[16]["wall_s"] / runs[1]["wall_s"], 3)}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []  # the per-chip connects are a table, not targets (the is per board)
    runs = [result["station"]] if result.get("station") else []
    runs += list(result.get("station_at", {}).values())
    for chip, s in result.get("step_down", {}).items():
        rows.append(common.target(f"{chip}: a CP2102 step-down (sysfs names it)",
                                  s["named_cost_s"], 1.0, "<=", "s"))
        rows.append(common.target(f"{chip}: a step-down, unknown adapter", s["unknown_cost_s"],
                                  1.0, "<=", "s", note=f"{STEP_RUNGS} rungs"))
    for st in runs:
        one, many = st["runs"][1], st["runs"][16]
        rows.append(common.target(f"per board at {st['baud']} Bd <= floor + 1.0 s (1 board)",
                                  one["per_board_s"]["mean"], st["floor_s"] + 1.0, "<=", "s",
                                  note=f"floor {st['floor_s']:.2f}s"))
        rows.append(common.target(f"per board at {st['baud']} Bd <= floor + 1.0 s "
                                  "(16 boards, mean)", many["per_board_s"]["mean"],
                                  st["floor_s"] + 1.0, "<=", "s"))
        rows.append(common.target(f"T(16)/T(1) at {st['baud']} Bd", st["t16_over_t1"],
                                  1.03, "<="))
    return rows


def run(ctx: common.Context, rates: tuple[int, ...] = RATES,
        station: bool = True, chips: bool = True, steps: bool = True,
        station_rates: tuple[int, ...] = ()) -> dict[str, Any]:
    """Part of `run_all` (its 1- and 16-board runs at 2 Mbaud are the baud matrix's)."""
    import station as package

    print(f"  station from {Path(package.__file__).parent}", flush=True)
    result: dict[str, Any] = {"station_package": str(Path(package.__file__).parent)}
    if chips:
        print("  connect per chip ...", flush=True)
        result["per_chip"] = per_chip(ctx.root, rates)
    if steps and (STEP_FROM in rates or not chips):
        print("  step-down ...", flush=True)
        result["step_down"] = step_down(ctx.root, result.get("per_chip"))
    if station:
        result["station"] = station_runs(ctx)
    for baud in station_rates:  # the per-board rows at other rates (1 and 16 boards)
        print(f"  station at {baud} ...", flush=True)
        result.setdefault("station_at", {})[str(baud)] = station_runs(ctx, baud)
    result["targets"] = targets(result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="station benchmark: connect per chip")
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    parser.add_argument("--no-station", action="store_true", help="connects only")
    parser.add_argument("--step-only", action="store_true",
                        help="the step-down rows alone (no per-chip table, no station run)")
    parser.add_argument("--station-at", default="",
                        help="station runs (1 and 16 boards) at these rates too, e.g. "
                             "921600,3000000")
    parser.add_argument("--station-only", action="store_true",
                        help="the --station-at runs alone")
    parser.add_argument("--name", default="connect", help="results/<name>.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    rates = tuple(int(r) for r in args.rates.split(","))
    station_rates = tuple(int(r) for r in args.station_at.split(",") if r)
    load = common.loadavg()
    with common.context("connect", args.keep) as ctx:
        only = args.step_only or args.station_only
        result = run(ctx, rates, station=not (args.no_station or only),
                     chips=not only, steps=not args.station_only,
                     station_rates=station_rates)
        out = {"machine": common.machine(), "loadavg_start": load, "connect": result,
               "loadavg_end": common.loadavg()}
    path = common.write_json(out, args.name)
    common.print_targets(result["targets"])
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
