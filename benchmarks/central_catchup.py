"""How fast a station catches up with the central PostgreSQL after an outage.

    .venv/bin/python benchmarks/central_catchup.py [--boards 1000]

Fills a local ledger (synchronous=NORMAL: the fill is not what is measured) with the
events of N boards as an AWS IoT station journals them (16 each), then times the real
Replicator shipping the whole backlog to a throw-away PostgreSQL cluster
(benchmarks/soak_pg.py), for two batch sizes. Prints one line per batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from benchmarks.soak_pg import PASSWORD, Cluster, find_bindir  # noqa: E402
from station.events import (  # noqa: E402
    Event,
    Identified,
    JobFinished,
    JobStarted,
    Registered,
    RegistrationStep,
    Stage,
    StageChanged,
)
from station.fleet import Replicator  # noqa: E402
from station.record import Ledger  # noqa: E402

STEPS = ("key-written", "cert-created", "policy-attached", "thing-created",
         "cert-attached", "cert-activated", "on-board")


def board_events(n: int) -> list[Event]:
    job, mac, cert = f"job{n:06d}", f"240ac4{n:06x}", f"{n:064x}"
    where = {"job_id": job, "port": f"/dev/ttyUSB{n % 16}", "slot": f"A{n % 16 + 1}"}
    events: list[Event] = [JobStarted(**where, station="bench", firmware_hash="f" * 64)]
    events += [StageChanged(**where, stage=Stage(s)) for s in ("connect", "identify")]
    events.append(Identified(**where, chip="esp32", mac=mac, thing_name=f"t-{mac}"))
    events += [RegistrationStep(**where, mac=mac, thing_name=f"t-{mac}", step=s,
                                certificate_id=cert) for s in STEPS]
    events += [StageChanged(**where, stage=Stage(s)) for s in ("flash", "verify", "reset")]
    events.append(Registered(**where, thing_name=f"t-{mac}", certificate_id=cert,
                             registrar="aws-iot"))
    events.append(JobFinished(**where, result=Stage.DONE, timings={"flash": 10.0}))
    return events


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boards", type=int, default=1000)
    args = p.parse_args()
    bindir = find_bindir()
    if bindir is None:
        print("no PostgreSQL server binaries (apt-get install postgresql)", file=sys.stderr)
        return 2
    os.environ["PGPASSWORD"] = PASSWORD
    pg = Cluster(bindir)
    try:
        pg.init()
        state = Path(tempfile.mkdtemp(prefix="central-catchup-"))
        with Ledger.open(state, synchronous="NORMAL") as ledger:
            async def fill() -> None:
                for n in range(args.boards):
                    await asyncio.gather(*(ledger.record(e) for e in board_events(n)))
            asyncio.run(fill())
        path = state / "ledger.sqlite3"
        total = sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone()[0]
        for batch in (500, 100):
            db = pg.new_database()
            (state / "central.json").unlink(missing_ok=True)
            rep = Replicator(path, "bench", pg.url(db), batch=batch)
            rep.connect_at_start()
            started = time.monotonic()
            rep.start()
            while rep.status().shipped < total:
                time.sleep(0.01)  # polling interval of the measurement
            took = time.monotonic() - started
            rep.stop()
            print(f"batch {batch}: {total} events of {args.boards} boards shipped in "
                  f"{took:.2f} s: {total / took:.0f} events/s, {args.boards / took:.0f} "
                  "boards/s")
    finally:
        pg.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
