"""`station check` and `station reconcile`: the station's answers before and after a run.

    commands.py  `check`: everything `run` does at start but watching ports, said aloud;
                 `reconcile`: the clean-up after a crash, without taking boards
    host.py      the host: what breaks a real native-USB rig (ModemManager, brltty, groups)
    hubs.py      the hub hosts: is each `[ports] remote` URL served, now?
"""

from station.check.commands import check, check_central, reconcile

__all__ = ["check", "check_central", "reconcile"]
