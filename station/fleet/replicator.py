"""Store and forward: ship the local ledger to the central PostgreSQL, in order, in batches.

Why it looks like this:
- The local SQLite ledger stays the station's durable journal and the only thing crash
  recovery (close_interrupted, the registrars' reconcile, the certificate ownership
  journal) reads. The replicator is a consumer like the dashboard: it never sits in the
  path of a board. Its bus observer only sets a flag; everything else happens on its own
  thread, with its own read-only SQLite connection (WAL lets it read while the writer
  commits) and its own PostgreSQL connection.
- Store: the events are already durable locally before the replicator hears of them, so
  it buffers nothing in memory and a PostgreSQL outage of any length costs disk, not
  RAM. Forward: it reads events after `cursor` in rowid order (the ledger's append
  order), `batch` at a time, together with the current rows of the jobs they touch
  (one SQLite snapshot), and ships them in one PostgreSQL transaction that also moves
  `stations.shipped_seq`. See central.ship for why that is idempotent.
- Where to resume is PostgreSQL's answer, read at every (re)connection: after an outage,
  a SIGKILL mid-transaction or a restart it sends exactly what PostgreSQL lacks. A copy
  of the cursor kept in state_dir (central.json, best effort) only feeds the lag shown
  while PostgreSQL cannot be asked.
- The local event's rowid is its id: the ledger only appends and never deletes, so
  rowids are dense and stable (the station never VACUUMs its ledger).
- Reconnects back off from 1 s to 5 s; a refusal (wrong password, schema newer, a
  name clash) retries every 30 s in case a person fixes it, and says so once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg

from station.errors import CentralError, CentralUnreachableError
from station.events import Event
from station.fleet import _slots as centralslots
from station.fleet import central

log = logging.getLogger("station.replicator")

IDLE = 1.0
"""Seconds between looks at the ledger when nothing woke the replicator."""
BACKOFF_MAX = 5.0
REFUSED_RETRY = 30.0
STOP_FLUSH = 10.0
"""At a graceful stop, how long the replicator may keep shipping what is left."""
STATEMENT_TIMEOUT = 60.0
"""A PostgreSQL that takes longer than this for one batch is taken as not answering."""
CURSOR_FILE = "central.json"

State = Literal["starting", "up", "unreachable", "refused", "stopped"]


@dataclass(frozen=True)
class ReplicationStatus:
    """What the dashboard's footer and the metrics show; a snapshot, safe to share."""

    where: str
    state: State = "starting"
    pending: int = 0  # local events PostgreSQL does not have (as far as we know)
    lag_s: float = 0.0  # age of the oldest of them
    shipped: int = 0  # events shipped by this process
    reason: str = ""
    since: float | None = None  # when the current outage or refusal began

    @property
    def healthy(self) -> bool:
        return self.state in ("starting", "up")

    def line(self, now: float) -> str:
        """One line for the footer, e.g. `central db:5432/factory: up to date`."""
        head = f"central {self.where}"
        waiting = f"{self.pending} event(s) waiting, lag {_duration(self.lag_s)}"
        if self.state == "up":
            return f"{head}: up to date" if self.pending == 0 else f"{head}: {waiting}"
        if self.state == "starting":
            return f"{head}: connecting"
        if self.state == "stopped":
            return f"{head}: stopped, {waiting}"
        down = _duration(now - self.since) if self.since is not None else "?"
        word = "UNREACHABLE" if self.state == "unreachable" else "REFUSED"
        return f"{head} {word} for {down}, buffering locally: {waiting} ({self.reason})"


class Replicator:
    """Ships `state_dir/ledger.sqlite3` to `conninfo` as station `station`."""

    def __init__(self, ledger_path: Path, station: str, conninfo: str, *, batch: int = 500,
                 connect_timeout: float = 5.0) -> None:
        self.ledger_path = ledger_path
        self.station = station
        self.conninfo = conninfo
        self.batch = batch
        self.connect_timeout = connect_timeout
        self._status = ReplicationStatus(where=central.describe(conninfo))
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replicator", daemon=True)
        self._conn: psycopg.Connection | None = None
        self._cursor = self._saved_cursor()
        self._slots = centralslots.Shipped()  # flags and runs PostgreSQL holds
        self._local: sqlite3.Connection | None = None
        self._flush_until = 0.0

    # -- the loop's side --------------------------------------------------------------

    def connect_at_start(self) -> str | None:
        """Connect and migrate before boards are taken (on the caller's thread).

        Raises CentralError when the server refuses (one line at start); returns a
        warning if it cannot be reached (the station runs and buffers)."""
        try:
            self._connect()
        except CentralUnreachableError as e:
            self._set(state="unreachable", reason=_reason(e), since=time.time())
            return f"{e}; the station runs and buffers in its local ledger"
        return None

    def start(self) -> None:
        self._thread.start()

    def observe(self, _event: Event) -> None:
        """Bus observer: something was journaled; never blocks."""
        self._wake.set()

    def status(self) -> ReplicationStatus:
        return self._status

    def stop(self, flush: float = STOP_FLUSH) -> None:
        """Ship what is left (for at most `flush` seconds if PostgreSQL is up), then stop."""
        self._flush_until = time.monotonic() + flush
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=flush)
        conn = self._conn
        if self._thread.is_alive() and conn is not None:
            with contextlib.suppress(Exception):
                conn.cancel()  # a stuck statement must not hold the station's exit
        if self._thread.is_alive():
            self._thread.join(timeout=self.connect_timeout + 2)
        self._close()

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 1.0
        retry_at = 0.0
        last_try = False  # at a stop: one more connection attempt, to ship what is left
        while True:
            stopping = self._stopping.is_set()
            if stopping and time.monotonic() > self._flush_until:
                break
            if stopping and self._conn is None:
                if last_try:
                    break
                last_try, retry_at = True, 0.0
            if self._conn is None and time.monotonic() >= retry_at:
                try:
                    self._connect()
                    backoff = 1.0
                except CentralUnreachableError as e:
                    self._down("unreachable", e)
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, BACKOFF_MAX)
                except CentralError as e:
                    self._down("refused", e)
                    retry_at = time.monotonic() + REFUSED_RETRY
                except Exception as e:  # a bug must never stop the station
                    log.exception("central ledger: connecting failed")
                    self._down("refused", e)
                    retry_at = time.monotonic() + REFUSED_RETRY
            shipped = 0
            if self._conn is not None:
                try:
                    shipped = self._ship_once()
                except psycopg.Error as e:
                    self._close_pg()
                    error = central.as_error(e, self._status.where)
                    refused = not isinstance(error, CentralUnreachableError)
                    self._down("refused" if refused else "unreachable", error)
                    retry_at = time.monotonic() + (REFUSED_RETRY if refused else backoff)
                except CentralError as e:
                    self._close_pg()
                    self._down("refused", e)
                    retry_at = time.monotonic() + REFUSED_RETRY
                except Exception as e:
                    log.exception("central ledger: shipping failed")
                    self._close_pg()
                    self._down("refused", e)
                    retry_at = time.monotonic() + REFUSED_RETRY
            self._refresh()
            if shipped >= self.batch:
                continue  # catching up: no pause between full batches
            if stopping and shipped == 0 and self._status.pending == 0:
                break
            if not stopping:
                self._wake.wait(IDLE)
                self._wake.clear()
            elif self._conn is None:
                break
        self._set(state="stopped")

    def _connect(self) -> None:
        conn = central.connect(self.conninfo, self.connect_timeout,
                               application=f"station {self.station}")
        try:
            conn.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT * 1000)}")
            conn.commit()
            try:
                central.migrate(conn, self.station)
                cursor = central.shipped_seq(conn, self.station)
                slots = centralslots.shipped(conn, self.station)
            except psycopg.Error as e:
                raise central.as_error(e, self._status.where) from None
            local_end = self._local_end()
            if cursor > local_end:
                raise CentralError(
                    f"[ledger] central {self._status.where} holds events of station "
                    f"{self.station!r} up to #{cursor} but this ledger ends at #{local_end}: "
                    "another station uses this [station] name, or this ledger was replaced; "
                    "give each station its own name")
        except BaseException:
            conn.close()
            raise
        was_down = self._status.state in ("unreachable", "refused")
        self._conn, self._cursor, self._slots = conn, cursor, slots
        if was_down:
            log.warning("central ledger %s: reachable again; catching up from #%d",
                        self._status.where, cursor)
        self._set(state="up", reason="", since=None)

    def _down(self, state: State, error: BaseException) -> None:
        reason = _reason(error)
        if self._status.state != state or self._status.reason != reason:
            log.warning("%s; buffering in the local ledger, boards go on", error)
        since = self._status.since if self._status.state in ("unreachable", "refused") \
            and self._status.since is not None else time.time()
        self._set(state=state, reason=reason, since=since)

    def _local_db(self) -> sqlite3.Connection:
        if self._local is None:
            self._local = sqlite3.connect(f"file:{self.ledger_path}?mode=ro", uri=True,
                                          timeout=30, isolation_level=None,
                                          check_same_thread=False)
        return self._local

    def _local_end(self) -> int:
        row = self._local_db().execute("SELECT max(rowid) FROM events").fetchone()
        return int(row[0] or 0)

    def _read(self) -> central.Batch | None:
        db = self._local_db()
        db.execute("BEGIN")  # one snapshot for the events and their jobs
        try:
            events = db.execute(
                "SELECT rowid, job_id, at, kind, stage, attempt, detail FROM events "
                "WHERE rowid > ? ORDER BY rowid LIMIT ?", (self._cursor, self.batch)).fetchall()
            if not events:
                return None
            ids = sorted({e[1] for e in events})
            marks = ", ".join("?" * len(ids))
            cur = db.execute(f"SELECT {', '.join(central.JOB_COLUMNS)} FROM jobs "  # noqa: S608
                             f"WHERE job_id IN ({marks})", ids)
            names = [d[0] for d in cur.description]
            jobs = [dict(zip(names, row, strict=True)) for row in cur]
        finally:
            db.execute("COMMIT")
        return central.Batch(events=events, jobs=jobs)

    def _ship_once(self) -> int:
        """Ship a batch of events, then the slot flags and runs that changed; how many."""
        assert self._conn is not None
        batch = self._read()
        if batch is not None:
            central.ship(self._conn, self.station, batch)
            self._cursor = batch.last_seq
            self._save_cursor()
            self._set(shipped=self._status.shipped + len(batch.events))
        changes = centralslots.read(self._local_db(), self._slots)
        if changes:
            centralslots.ship(self._conn, self.station, changes, self._slots)
        return (len(batch.events) if batch is not None else 0) + len(changes)

    def _refresh(self) -> None:
        """Pending events and the age of the oldest, from the local ledger."""
        try:
            db = self._local_db()
            end = self._local_end()
            row = db.execute("SELECT at FROM events WHERE rowid > ? ORDER BY rowid LIMIT 1",
                             (self._cursor,)).fetchone()
        except sqlite3.Error as e:
            log.debug("cannot read the local ledger for the lag: %s", e)
            return
        lag = max(0.0, time.time() - row[0]) if row else 0.0
        self._set(pending=max(0, end - self._cursor), lag_s=lag)

    def _set(self, **changes: Any) -> None:
        from dataclasses import replace

        self._status = replace(self._status, **changes)  # one reference swap: atomic

    def _close_pg(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _close(self) -> None:
        self._close_pg()
        if self._local is not None and not self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._local.close()
            self._local = None

    # -- the cursor's copy (a hint for the lag while PostgreSQL cannot be asked) -------

    @property
    def _cursor_path(self) -> Path:
        return self.ledger_path.parent / CURSOR_FILE

    def _saved_cursor(self) -> int:
        try:
            data = json.loads(self._cursor_path.read_text())
            return int(data["shipped_seq"]) if data.get("where") == self._status.where else 0
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _save_cursor(self) -> None:
        with contextlib.suppress(OSError):
            tmp = self._cursor_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"where": self._status.where,
                                       "shipped_seq": self._cursor}))
            tmp.replace(self._cursor_path)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}:{s % 60:02d}" if s < 3600 else \
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _reason(error: BaseException) -> str:
    """The message without the `[ledger] central WHERE:` head the footer already shows."""
    text = " ".join(str(error).split())
    if text.startswith("[ledger] central ") and ": " in text:
        text = text.split(": ", 1)[1]
    if text.startswith("cannot reach PostgreSQL ("):
        text = text.removeprefix("cannot reach PostgreSQL (").removesuffix(")")
    # libpq's wording around the reason: the footer has the host and no room to spare
    text = re.sub(r'connection to server at "[^"]*"(, port \d+)? failed: ', "", text)
    return text.replace(" Is the server running on that host and accepting TCP/IP "
                        "connections?", "")
