"""What the operator sees: the live table of slots, or one log line per event.

    dashboard.py  the live table: `render(view, now)` and rich's Live over it
    keys.py       single keys on the live table, read without blocking and without Enter
"""

from station.screen.dashboard import (
    Display,
    HeadlessLog,
    LiveDashboard,
    StationView,
    format_event,
    render,
)
from station.screen.keys import read_keys

__all__ = [
    "Display", "HeadlessLog", "LiveDashboard", "StationView", "format_event", "read_keys",
    "render",
]
