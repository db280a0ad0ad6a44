"""The local record: the ledger (the journal and the station's source of truth) and the
event log.

    ledger.py    `Ledger`: SQLite in WAL mode, one writer thread, group commit
    _tables.py   its tables: schema, migrations, how each event lands, the queries
    _slots.py    its slot flags and station runs (schema 2)
    export.py    the ledger for people: exported rows, CSV, the table
    eventlog.py  the JSON-lines event log, for people and `jq`
"""

from station.record._tables import SCHEMA_VERSION
from station.record.eventlog import EventLog, event_fields, iso
from station.record.export import export_csv, export_row
from station.record.ledger import FILENAME, Ledger

__all__ = [
    "FILENAME", "SCHEMA_VERSION", "EventLog", "Ledger", "event_fields", "export_csv",
    "export_row", "iso",
]
