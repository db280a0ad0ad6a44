"""``python -m station.sim``: the sim CLI without the top-level ``station`` command."""

from __future__ import annotations

import argparse
import sys

from .cli import configure_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m station.sim",
                                     description="Run a rig of virtual ESP32 boards.")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
