"""The station's event log (state/events.jsonl) as a test reads it while the station runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def event_log(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Every complete event in `path` (of one `kind` if given). The station appends one
    line per event, so the last line may be half written: only lines the station has
    ended with a newline count (a half line can end in "}" too, inside a nested value)."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # what follows the last newline is unfinished
    events = [json.loads(line) for line in lines if line.strip()]
    return [e for e in events if kind is None or e["kind"] == kind]
