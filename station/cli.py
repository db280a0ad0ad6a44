"""The `station` command: run, demo, sim, ports, ledger, check, reconcile.

Exit codes (a contract for scripts, systemd and benchmarks):
  0  all well (with --exit-after: every one of the N boards ended done or skipped)
  1  internal error (a bug: please report it with state_dir/station.log)
  2  configuration, firmware or state error (the message names the file and key, or the
     path: an unknown key, a missing image, a corrupt ledger, a state_dir it cannot write)
  3  --exit-after: some of the N boards failed or were removed
  4  another station holds the state_dir (or another process holds its ledger's lock)
  5  the registrar could not start (cloud credentials, endpoint, permissions, CA)
  130 aborted by a second SIGINT/SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from station import __version__
from station.config import Config, RecordConfig, load, load_record, positive
from station.daemon import (
    EXIT_BUSY,
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_REGISTRAR,
    Options,
)
from station.errors import (
    CentralError,
    ConfigError,
    FirmwareError,
    LedgerError,
    LedgerLockedError,
    RegistrationError,
    StateDirBusyError,
    StationError,
)

log = logging.getLogger("station")

DEFAULT_CONFIG = "station.toml"


ERROR_EXITS: tuple[tuple[type[StationError], str, int], ...] = (
    # most specific first: (error, what the line starts with, exit code)
    (FirmwareError, "firmware error: ", EXIT_CONFIG),
    (ConfigError, "config error: ", EXIT_CONFIG),
    (StateDirBusyError, "", EXIT_BUSY),
    (RegistrationError, "registrar: ", EXIT_REGISTRAR),
    (LedgerLockedError, "ledger: ", EXIT_BUSY),
    (LedgerError, "ledger: ", EXIT_CONFIG),
    (CentralError, "central ledger: ", EXIT_CONFIG),
    (StationError, "", EXIT_INTERNAL),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_CONFIG
    handler: Callable[[argparse.Namespace], int] = args.handler
    # One line on stderr each: what to fix, naming the file and key, port or path.
    try:
        return handler(args)
    except StationError as e:
        prefix, code = next((p, c) for kind, p, c in ERROR_EXITS if isinstance(e, kind))
        print(f"station: {prefix}{e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `station ledger | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:  # the state_dir or its log cannot be made: the disk, not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"station: {where}{e.strerror or e} (check that the folder exists, is "
              "writable by this user and has free space)", file=sys.stderr)
        return EXIT_CONFIG


def _not_sim(args: argparse.Namespace) -> int:
    raise AssertionError("the sim command is parsed only as the first argument")


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="station", description="ESP32 production flashing "
                                "station: plug boards in, they get registered and flashed.")
    p.add_argument("--version", action="version", version=f"station {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int],
                help_text: str, config: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.set_defaults(handler=handler)
        if config:
            c.add_argument("--config", "-c", default=DEFAULT_CONFIG, type=Path,
                           help=f"station config (default: {DEFAULT_CONFIG})")
        return c

    run = command("run", _run, "Watch the ports and flash every board that is plugged in.")
    _run_options(run)
    demo = command("demo", _demo, "Run the station on virtual boards (no hardware, no cloud).",
                   config=False)
    demo.add_argument("--boards", type=positive, default=16, help="virtual boards (default 16)")
    demo.add_argument("--dir", type=Path, default=Path("state/demo"),
                      help="working folder, emptied first (default state/demo)")
    demo.add_argument("--headless", action="store_true", help="log lines instead of the table")
    demo.add_argument("--no-throttle", action="store_true",
                      help="virtual boards at full speed instead of the serial line rate")

    sim_help = "Virtual ESP32 boards on pseudo-terminals."
    if list(argv[:1]) == ["sim"]:
        from station.sim import cli as sim_cli  # the simulator is known to the CLI only

        sim_cli.configure_parser(command("sim", sim_cli.run, sim_help, config=False))
    else:
        # Listed for `station -h`; its options are read only when it is the command:
        # importing the simulator cost every other command 0.13 s of CPU at start.
        command("sim", _not_sim, sim_help, config=False)
    command("ports", _ports, "List the serial ports the config watches, with their slots.")
    ledger = command("ledger", _ledger, "Export the ledger of boards.")
    ledger.add_argument("--format", choices=("table", "csv", "json"), default="table")
    ledger.add_argument("--central", action="store_true",
                        help="read the central PostgreSQL ledger ([ledger] central): every "
                        "station's boards")
    ledger.add_argument("--station", metavar="NAME", help="with --central: one station only")
    ledger.add_argument("--since", metavar="WHEN", help="with --central: jobs started since "
                        "a duration ago (30m, 24h, 7d) or a date (2026-11-27T22:00)")
    board = command("board", _board, "One board's whole history across stations, from the "
                    "central ledger.")
    board.add_argument("mac", metavar="MAC", help="the board's MAC (24:0a:c4:... or 240ac4...)")
    board.add_argument("--format", choices=("table", "csv", "json"), default="table")
    command("check", _check, "Validate config, firmware and cloud access; say what run "
            "would do.")
    command("reconcile", _reconcile, "Finish or clean up registrations a crash interrupted.")
    slot = command("slot", _slot, "List flagged (unhealthy) slots, or clear one.")
    slot.add_argument("action", choices=("list", "clear"))
    slot.add_argument("slot", nargs="?", help="the slot to clear, as the dashboard names it")
    report = command("report", _report, "Write the night report (HTML with charts, or "
                     "Markdown) from the ledger.")
    report.add_argument("--since", metavar="TIME", type=_time,
                        help="from TIME (UTC: 2026-12-01T18:00, or 12h / 90m / 2d ago); "
                        "default: the first board")
    report.add_argument("--until", metavar="TIME", type=_time,
                        help="until TIME (same forms); default: now")
    report.add_argument("--station", metavar="NAME", help="only this station's boards")
    report.add_argument("--central", action="store_true",
                        help="read the central PostgreSQL ledger ([ledger] central): every "
                        "station, or one with --station")
    report.add_argument("--format", choices=("html", "md"), default="html")
    report.add_argument("--out", "-o", type=Path, metavar="FILE",
                        help="write here (default: report.html / report.md; - for stdout)")
    return p


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--headless", action="store_true",
                   help="one log line per event instead of the live table")
    p.add_argument("--exit-after", type=positive, metavar="N",
                   help="take N boards, exit when all N are final (0 if all done, else 3)")
    p.add_argument("--reflash", action="store_true",
                   help="flash boards the ledger already has done with this firmware")


def _run(args: argparse.Namespace) -> int:
    from station.app import serve, setup_logging

    config = load(args.config)
    headless = args.headless or not sys.stdout.isatty()
    setup_logging(config, headless)
    options = Options(exit_after=args.exit_after, reflash=args.reflash)
    return asyncio.run(serve(config, options, headless))


def _demo(args: argparse.Namespace) -> int:
    from station.demo import run_demo

    return run_demo(boards=args.boards, workdir=args.dir, headless=args.headless,
                    throttle=not args.no_throttle)


def _ports(args: argparse.Namespace) -> int:
    from station.ports import native_usb, scan

    config = load(args.config)
    ports = scan(config.ports.watch)
    if config.ports.remote:  # hub hosts: one TCP connect each (ports/remote.py)
        from station.ports import probe_all

        for url, problem in probe_all(config.ports.remote):
            print(f"{config.slot_for(url, url):>8}  {url}  ({problem or 'hub reachable'})")
    if not ports:
        print(f"no ports match {', '.join(config.ports.watch)}")
        return EXIT_OK
    for info in ports:
        slot = config.slot_for(info.location, info.path)
        native = native_usb(info.target)  # the chip's own USB: it re-enumerates on reset
        kind = "" if native is None else \
            f", native USB {native.kind} {native.vid:04x}:{native.pid:04x}" + \
            (f" MAC {native.mac}" if native.mac else "")
        print(f"{slot:>8}  {info.path}  ->  {info.target}  (location {info.location or '-'}"
              f"{kind})")
    return EXIT_OK


def _central(config: Config | RecordConfig) -> str:
    if not config.ledger.central:
        raise ConfigError(str(config.path), "ledger.central", "not set: name the central "
                          "PostgreSQL (postgresql://user@host/database) to read the fleet")
    return config.ledger.central


def _board(args: argparse.Namespace) -> int:
    from station.fleet import export_board

    config = load_record(args.config)
    print(export_board(_central(config), args.mac, args.format), end="")
    return EXIT_OK


def _ledger(args: argparse.Namespace) -> int:
    from station.record import Ledger

    config = load_record(args.config)
    if args.central:
        from station.fleet import export_jobs

        print(export_jobs(_central(config), args.format, station=args.station,
                          since=args.since), end="" if args.format != "json" else "\n")
        return EXIT_OK
    if args.station or args.since:
        raise ConfigError(str(config.path), None, "--station and --since need --central "
                          "(the local ledger holds this station only)")
    ledger = Ledger.open(config.station.state_dir)
    try:
        print(ledger.export(args.format))
    finally:
        ledger.close()
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from station.check import check

    return asyncio.run(check(load(args.config), sys.stdout))


def _reconcile(args: argparse.Namespace) -> int:
    from station.app import setup_logging
    from station.check import reconcile

    config = load(args.config)
    setup_logging(config, headless=True)
    return asyncio.run(reconcile(config, sys.stdout))


def _slot(args: argparse.Namespace) -> int:
    from station.health import slot_command
    from station.record import Ledger

    config = load_record(args.config)
    ledger = Ledger.open(config.station.state_dir)
    try:
        return slot_command(ledger, args.action, args.slot, sys.stdout)
    finally:
        ledger.close()


def _time(text: str) -> float:
    from station.report import parse_time

    return parse_time(text)


def _report(args: argparse.Namespace) -> int:
    from station.report import report_command

    config = load_record(args.config)
    return report_command(config, since=args.since, until=args.until,
                          station=args.station, fmt=args.format, out=args.out,
                          stdout=sys.stdout,
                          central=_central(config) if args.central else None)


if __name__ == "__main__":
    sys.exit(main())
