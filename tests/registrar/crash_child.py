"""A station stand-in for crash tests: `python -m tests.registrar.crash_child MODE URL OUT
JOURNAL N [KEY_SOURCE]` registers board N (MODE=register) or reconciles (MODE=reconcile)
with a durable JSON-lines journal. STATION_TEST_CRASH_AFTER in the environment kills it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from station.identity import CredentialStore
from station.identity.registrar.aws_iot import AwsIotRegistrar
from tests.registrar.conftest import FileJournal, aws_section, board


async def main(mode: str, url: str, out: str, journal_path: str, n: int,
               key_source: str) -> int:
    journal = FileJournal(Path(journal_path))
    registrar = AwsIotRegistrar(aws_section(url, key_source=key_source),
                                CredentialStore(Path(out)), station="line-1")
    await registrar.start()
    try:
        if mode == "register":
            facts = board(n)
            record = journal.journal_for(facts.identity.mac, facts.thing_name)
            creds = await registrar.register(facts, record)
            # what the worker journals once the credentials verify on the board's flash
            await record("on-board", creds.certificate_id, creds.certificate_arn)
            print(f"registered {creds.thing_name} {creds.certificate_id}")
        else:
            for line in await registrar.reconcile(journal.steps(), journal.journal_for):
                print(line)
    finally:
        await registrar.close()
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(asyncio.run(main(args[0], args[1], args[2], args[3], int(args[4]),
                              args[5] if len(args) > 5 else "csr")))
