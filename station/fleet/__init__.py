"""Many stations, one record: the central PostgreSQL ledger, the replicator that ships the
local ledger to it, and what the fleet knows about a board.

    central.py     the central ledger's schema, migrations and the fleet's queries
    replicator.py  store and forward: the local ledger shipped in order, in batches
    _slots.py      its slot flags and station runs, shipped beside the events (schema 2)
    lookup.py      has another station provisioned this board? (asked at identify)
    view.py        `station ledger --central` and `station board MAC`
"""

from station.fleet import central
from station.fleet.lookup import FleetLookup
from station.fleet.replicator import ReplicationStatus, Replicator
from station.fleet.view import export_board, export_jobs

__all__ = [
    "FleetLookup", "ReplicationStatus", "Replicator", "central", "export_board", "export_jobs",
]
