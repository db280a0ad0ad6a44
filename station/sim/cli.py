"""``station sim``: run a rig of virtual boards until SIGINT/SIGTERM.

Prints one JSON line per event on stdout (flushed), e.g.::

    {"event": "plugged", "index": 0, "port": "DIR/pci-...-port0", "pty": "/dev/pts/3",
     "mac": "24:0a:c4:12:34:56", "chip": "esp32", "usb": "bridge", ...}
    {"event": "unplugged", "index": 0, "port": "...", "mac": "...", "reason": "fault",
     "dump": "DIR/flash-240ac4123456.bin"}

plus ``reset``, ``disconnected`` and ``reenumerated`` for resets a board sees; see
docs/virtual-boards.md for every field.

On exit every board is unplugged (its flash dumped to ``DIR/flash-<mac>.bin``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from station.config import positive, seconds

from .bridge import BRIDGES, DEFAULT_BRIDGE
from .chips import CHIP_NAMES, chip_spec, parse_chip_list
from .control import open_fifo, serve
from .faults import parse_fault_specs
from .plugged import parse_size
from .reset_circuit import EN_CAP_UF, parse_reset_circuit
from .rig import Rig
from .stub_model import STUB_MODELS
from .usb import parse_gap, usb_link


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``sim`` options to ``parser`` (used by ``station sim`` and ``-m``)."""
    parser.add_argument("--boards", type=positive, default=16, help="number of boards (16)")
    parser.add_argument("--dir", required=True,
                        help="directory for the by-path symlinks and flash dumps")
    parser.add_argument("--chip", default="esp32", metavar="CHIP[,CHIP...]",
                        help="chip model, or a comma-separated list that plugged boards "
                             f"cycle through (esp32); any of: {', '.join(CHIP_NAMES)}")
    parser.add_argument("--usb", default="bridge", metavar="KIND[,KIND...]",
                        help="how boards hang off the hub: bridge (a USB-UART bridge), jtag "
                             "(USB-Serial/JTAG) or otg; a comma-separated list cycles (bridge)")
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE, choices=sorted(BRIDGES),
                        help=f"bridge chip of bridge boards, sets its highest baud "
                             f"({DEFAULT_BRIDGE})")
    parser.add_argument("--reenumerate-gap", default="0.2-2", metavar="S|MIN-MAX",
                        help="seconds a native-USB board is off the bus after a reset: fixed, "
                             "or drawn from the seed in a range (0.2-2)")
    parser.add_argument("--persist", action="store_true",
                        help="boards continue from the files an earlier run left in DIR "
                             "(flash-<mac>.bin, efuse-<mac>.bin; the same --seed plugs the "
                             "same MACs); default: every run plugs new chips")
    parser.add_argument("--preloaded", action="store_true",
                        help="boards carry old firmware (non-blank flash the stub must erase)")
    parser.add_argument("--stub-model", default="flasher", choices=STUB_MODELS,
                        help="whose flash schedule the stub follows: esp-flasher-stub "
                             "(esptool 5.6's default) or the legacy esptool stub (flasher)")
    parser.add_argument("--seed", type=int, default=0, help="seed for MACs and faults")
    parser.add_argument("--plug-interval", type=seconds, default=0.0, metavar="S",
                        help="seconds between plugging successive boards (0)")
    parser.add_argument("--fault", action="append", default=[], metavar="SPEC",
                        help="INDEX:KIND[=VALUE][,...]; kinds: unplug_after=N, mute, "
                             "corrupt=RATE, slow=FACTOR, garbage, busy, reset_timing, "
                             "pull_after_burns=N, weak_efuse=BLOCK, "
                             "locked=sdm|key|encrypted|secure_boot (repeatable)")
    parser.add_argument("--no-throttle", action="store_true",
                        help="do not model the UART line rate")
    parser.add_argument("--no-flash-timing", action="store_true",
                        help="erase/program instantly")
    parser.add_argument("--flash-size", default="4MB", help="flash size per board (4MB)")
    parser.add_argument("--log-level", default="WARNING", help="log level on stderr")
    # RFC 2217 face, reset circuit, boot story (docs/virtual-boards.md)
    parser.add_argument("--rfc2217", type=int, default=None, metavar="BASEPORT",
                        help="serve board i over RFC 2217 on TCP port BASEPORT+i of "
                             "127.0.0.1 (0: free ports); its plugged line has the URL")
    parser.add_argument("--reset-circuit", default="auto", metavar="KIND[,KIND...]",
                        help="bridge boards with --rfc2217 or --pty-lines: auto (the "
                             "devkit's DTR/RTS auto-reset) or none (buttons only); a "
                             "comma-separated list cycles (auto)")
    parser.add_argument("--en-cap", type=float, default=EN_CAP_UF, metavar="UF",
                        help=f"EN capacitor in uF: the reset RC delay ({EN_CAP_UF:g})")
    parser.add_argument("--app-line", default=None, metavar="TEXT",
                        help="a line every board's app prints after its app_init lines, "
                             "e.g. 'SELFTEST: PASS'")
    parser.add_argument("--board-app-line", action="append", default=[],
                        metavar="INDEX=TEXT", help="the app line of one board (repeatable)")
    parser.add_argument("--pty-lines", default=None, metavar="SOCKET",
                        help="give the ptys DTR/RTS for relays started with "
                             "station.sim.pty_lines.relay_env(SOCKET), e.g. esptool's "
                             "esp_rfc2217_server; bridge boards get their reset circuit")
    parser.add_argument("--control", default=None, metavar="FIFO",
                        help="named pipe for commands: press_boot_en N, press_en N, "
                             "unplug N, replug N (created if missing)")


def run(args: argparse.Namespace) -> int:
    """Run the rig; returns the process exit code."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        faults = parse_fault_specs(args.fault)
        flash_size = parse_size(args.flash_size)
        chips = parse_chip_list(args.chip)
        usbs = [u.strip() for u in args.usb.split(",") if u.strip()] or ["bridge"]
        gap = parse_gap(args.reenumerate_gap)
        circuits = [parse_reset_circuit(c.strip()) for c in args.reset_circuit.split(",")
                    if c.strip()] or ["auto"]
        app_lines = parse_app_lines(args.board_app_line)
        if args.en_cap <= 0:
            raise ValueError(f"--en-cap must be positive, got {args.en_cap}")
        if args.rfc2217 is not None and not 0 <= args.rfc2217 <= 65535 - args.boards:
            raise ValueError(f"--rfc2217 {args.rfc2217}: not a TCP port base for "
                             f"{args.boards} boards")
        control_fd = open_fifo(Path(args.control)) if args.control else None
        for index in range(max(args.boards, 0)):  # every board's kind checked up front
            chip, usb = chips[index % len(chips)], usbs[index % len(usbs)]
            try:
                usb_link(chip_spec(chip), usb, args.bridge if usb == "bridge" else None)
            except ValueError as e:
                raise ValueError(f"board {index}: {e}") from None
    except ValueError as e:
        print(f"station sim: {e}", file=sys.stderr)
        return 2

    stop = threading.Event()
    print_lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with print_lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Rig(args.dir, seed=args.seed, throttle=not args.no_throttle,
                 flash_timing=not args.no_flash_timing, on_event=emit,
                 reenumerate_gap=gap, stub_model=args.stub_model,
                 rfc2217_base=args.rfc2217, pty_lines=args.pty_lines,
                 persist=args.persist) as rig:
            if control_fd is not None:
                serve(rig, control_fd, emit, stop)
            for index in range(args.boards):
                if stop.is_set():
                    break
                usb = usbs[index % len(usbs)]
                try:
                    rig.plug(chip=chips[index % len(chips)], flash_size=flash_size,
                             faults=faults.get(index), index=index, usb=usb,
                             bridge=args.bridge if usb == "bridge" else None,
                             preloaded=args.preloaded,
                             reset_circuit=circuits[index % len(circuits)],
                             app_line=app_lines.get(index, args.app_line),
                             en_cap_uf=args.en_cap)
                except ValueError as e:  # e.g. the TCP port is taken
                    print(f"station sim: {e}", file=sys.stderr)
                    return 2
                if args.plug_interval > 0 and stop.wait(args.plug_interval):
                    break
            while not stop.wait(3600):
                pass
    except ValueError as e:  # e.g. the pty lines socket cannot be bound
        print(f"station sim: {e}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if control_fd is not None:
            os.close(control_fd)
    return 0


def parse_app_lines(specs: list[str]) -> dict[int, str]:
    """``--board-app-line INDEX=TEXT`` options: board index -> app line."""
    lines: dict[int, str] = {}
    for spec in specs:
        index, sep, text = spec.partition("=")
        if not sep or not index.strip().isdigit():
            raise ValueError(f"--board-app-line {spec!r} must look like INDEX=TEXT")
        lines[int(index)] = text
    return lines
