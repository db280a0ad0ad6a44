"""Single keys on the live dashboard, read without blocking and without Enter.

Why it looks like this: rich's Live owns the screen and redraws from its own thread, and
the event loop must never block on a read. So stdin goes into cbreak mode (keys arrive
one by one, no echo, Ctrl-C still a signal) and the loop reads it with `add_reader`
only when there is a byte. Only when stdin is a terminal and the station is its
foreground job: under systemd, in a pipe, in the background or with `--headless` there
are no keys, and nothing is changed. The terminal's settings
are put back on exit, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Callable, Iterator, Mapping


@contextlib.contextmanager
def read_keys(actions: Mapping[str, Callable[[], object]]) -> Iterator[bool]:
    """While inside: each key of `actions` pressed calls its action on the event loop.
    Yields whether keys are read at all (stdin is a terminal)."""
    try:
        fd = sys.stdin.fileno()
        # in the foreground only: `station run &` changing the terminal would be stopped
        # by SIGTTOU, and the keys belong to the shell then anyway
        interactive = os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError):  # closed or replaced stdin
        interactive = False
    if not interactive:
        yield False
        return
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def on_input() -> None:
        try:
            data = os.read(fd, 32)
        except OSError:
            return
        for key in data.decode(errors="replace"):
            action = actions.get(key.lower())
            if action is not None:
                action()

    tty.setcbreak(fd)
    loop.add_reader(fd, on_input)
    try:
        yield True
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
