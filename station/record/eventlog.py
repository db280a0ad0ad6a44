"""The JSON-lines event log: every event a board went through, for people and `jq`.

The ledger is the durable record; this log is the readable one (one JSON object a line,
rotated by size), so it is flushed but never fsynced, and a failing disk here is reported
once and never fails a board.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from station.events import Event, Progress

log = logging.getLogger("station.eventlog")


def iso(at: float | None) -> str:
    """Seconds since the epoch -> `2026-11-27T02:45:01Z` (UTC, what logs and exports show)."""
    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_fields(event: Event) -> dict[str, Any]:
    """An event as plain JSON-able data (Stage is a str subclass, so it serialises as is)."""
    return dataclasses.asdict(event)


class EventLog:
    """Every event except mid-region Progress, one JSON object a line, for people and jq.

    Appends go through one thread of their own so the loop never waits on the disk; the
    ledger is the durable record, so lines are flushed to the OS but not fsynced. The
    file rotates at `max_bytes` (events.jsonl.1 is the newest old one, `keep` are kept).
    """

    def __init__(self, path: Path, *, max_bytes: int = 50 * 2**20, keep: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="events")
        self._file: io.TextIOWrapper | None = None
        self._failing = False

    @staticmethod
    def wanted(event: Event) -> bool:
        """Progress only where a region starts or ends; everything else."""
        return not isinstance(event, Progress) or event.done in (0, event.total)

    @staticmethod
    def line(event: Event) -> str:
        data = {"kind": type(event).__name__, "time": iso(event.at), **event_fields(event)}
        return json.dumps(data, sort_keys=False) + "\n"

    async def record(self, event: Event) -> None:
        if self.wanted(event):
            await asyncio.wrap_future(self._executor.submit(self._append, self.line(event)))

    def _append(self, line: str) -> None:
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._file.write(line)
            self._file.flush()
            if self._file.tell() >= self.max_bytes:
                self._rotate()
            self._failing = False
        except OSError as e:  # the log is a convenience: never fail a board over it
            if not self._failing:  # once per outage, not once per event
                log.error("%s: cannot write the event log: %s", self.path, e)
            self._failing = True

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def close(self) -> None:
        await asyncio.wrap_future(self._executor.submit(self._close_file))
        self._executor.shutdown(wait=True)
