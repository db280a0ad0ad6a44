"""The local record: the ledger (the journal and the station's source of truth) and the
event log.

    ledger.py    `Ledger`: SQLite in WAL mode, one writer thread, group commit, migrations
    _slots.py    its slot flags and station runs (schema 2)
    eventlog.py  the JSON-lines event log, for people and `jq`
"""

from station.record.eventlog import EventLog, event_fields, iso
from station.record.ledger import FILENAME, SCHEMA_VERSION, Ledger, export_csv, export_row

__all__ = [
    "FILENAME", "SCHEMA_VERSION", "EventLog", "Ledger", "event_fields", "export_csv",
    "export_row", "iso",
]
