"""Cross-station facts for a board being worked on: has another station provisioned it?

Why it looks like this:
- The answer lives in the central ledger, which may be slow or away; a board must never
  wait on it. So the question is asked only while the replicator says PostgreSQL is up,
  on a connection of its own (one thread: libpq calls block), with a short connect and
  statement timeout, and any failure means "not known": the board goes on as a new one
  and the station log says why the policy could not be applied.
- The worker sees only `KnownBoardLookup` (mac -> BoardHistory | None): it knows nothing
  of PostgreSQL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable

import psycopg

from station.errors import CentralError
from station.fleet import central
from station.parts import BoardHistory

log = logging.getLogger("station.fleet")

TIMEOUT = 2.0
"""Seconds a board may wait for the central ledger's answer at most."""


class FleetLookup:
    def __init__(self, conninfo: str, station: str, healthy: Callable[[], bool],
                 timeout: float = TIMEOUT) -> None:
        self.conninfo = conninfo
        self.station = station
        self.healthy = healthy
        self.timeout = timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fleet")
        self._conn: psycopg.Connection | None = None
        self._warned = False

    async def known(self, mac: str) -> BoardHistory | None:
        if not self.healthy():
            self._warn(f"{mac}: central ledger not reachable; [identity] on_known_board "
                       "not applied (treated as a new board)")
            return None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                found = await loop.run_in_executor(self._executor, self._query, mac)
        except (TimeoutError, CentralError, psycopg.Error) as e:
            self._warn(f"{mac}: central ledger did not answer ({e}); [identity] "
                       "on_known_board not applied (treated as a new board)")
            return None
        self._warned = False
        return found

    def _warn(self, text: str) -> None:
        if not self._warned:
            log.warning("%s", text)
        else:
            log.info("%s", text)
        self._warned = True

    def _query(self, mac: str) -> BoardHistory | None:
        try:
            if self._conn is None:
                self._conn = central.connect(self.conninfo, self.timeout,
                                             application=f"station {self.station} lookup")
                self._conn.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
                self._conn.commit()
            return central.known_board(self._conn, mac, self.station)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._executor.submit(self._drop)
        self._executor.shutdown(wait=True)
