"""The night report: "how did the night go?", as one HTML or Markdown file.

    build.py    `station report`: the window, the sections, HTML with charts or Markdown
    data.py     the one query layer: what a report needs from a ledger (`ReportSource`)
    central.py  the same rows from the central PostgreSQL ledger (`--central`)
    stats.py    the numbers, from the rows of any source; no SQL, no drawing
    charts.py   matplotlib figures as inline SVG (imported when drawing)
"""

from station.report.build import make_report, parse_time, report_command
from station.report.data import ReportSource, SqliteLedgerSource, Window

__all__ = [
    "ReportSource", "SqliteLedgerSource", "Window", "make_report", "parse_time",
    "report_command",
]
