"""What the operator sees: the live table of slots, or one log line per event.

    view.py       the station as its events describe it (`StationView`); the others read it
    dashboard.py  the live table: `render(view, now)` and rich's Live over it; which
                  columns give way, in what order, where the terminal is narrow
    fit.py        text that fits the width rich gives it: a name cut in the middle, the
                  widest of several texts that fits, items packed onto lines
    lines.py      headless: one log line per event (`format_event`, `HeadlessLog`)
    keys.py       single keys on the live table, read without blocking and without Enter
"""

from station.screen.dashboard import LiveDashboard, render
from station.screen.keys import read_keys
from station.screen.lines import HeadlessLog, format_event
from station.screen.view import Display, StationView

__all__ = [
    "Display", "HeadlessLog", "LiveDashboard", "StationView", "format_event", "read_keys",
    "render",
]
