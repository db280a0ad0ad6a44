"""A device registry's request and answer, as plain data: what registry.py sends and how it
reads what comes back. No sockets here, so every rule is a small test.

Why it looks like this:
- The request is rendered once per board from the [registry] templates: board fields
  are JSON-escaped into the body (a TOML table, so it is always valid JSON) and
  URL-quoted into the URL. The rendered method, URL and body are journaled before the
  request leaves (a crash leaves exactly what to send again); headers are not, because
  one of them carries the key.
- An answer is one of five things: registered (2xx), already registered (the configured
  statuses, e.g. 409, or a 4xx whose body says the id is taken: a re-plugged board, or a
  request that was answered but not recorded before a crash), refused (401/403: the key;
  retrying cannot help), worth retrying (408, 429, 5xx: `Retry-After` honoured), or
  failed (any other answer, quoted).
- A registry may echo what it was sent; the excerpt of an answer kept in the ledger has
  every secret header value taken out first.
"""

from __future__ import annotations

import copy
import email.utils
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from station.config import Header, RegistrySection

EXCERPT = 200  # characters of an answer's body kept in a message
DEFAULT_ID_FIELDS = ("id", "data.id", "device.id")


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: str  # JSON ("" for none)


@dataclass(frozen=True)
class Answer:
    """What one exchange came to."""

    outcome: Literal["registered", "already", "refused", "retry", "failed"]
    status: int | None = None
    device_id: str | None = None
    detail: str = ""  # the status line and an excerpt of the body, or the network error
    wait: float | None = None  # the registry's Retry-After, seconds


def board_values(thing: str, mac: str, chip: str, station: str,
                 certificate_id: str | None, firmware_version: str) -> dict[str, str]:
    return {"thing": thing, "mac": mac, "chip": chip, "station": station,
            "certificate_id": certificate_id or "", "firmware_version": firmware_version}


def _fill(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**values)
    if isinstance(value, Mapping):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return copy.deepcopy(value)


def render(section: RegistrySection, values: Mapping[str, str]) -> Request:
    """The board's request: fields URL-quoted into the URL, JSON-escaped into the body."""
    url = section.url.format(**{k: quote(v, safe="") for k, v in values.items()})
    body = "" if section.body is None else json.dumps(_fill(section.body, values),
                                                       separators=(",", ":"))
    return Request(method=section.method, url=url, body=body)


def headers_of(section: RegistrySection) -> dict[str, str]:
    return {h.name: h.value for h in section.headers}


def redact(text: str, headers: Sequence[Header]) -> str:
    """`text` with every value that came from the environment replaced by its name."""
    for h in headers:
        if h.env and h.value:
            text = text.replace(h.value, f"${h.env}")
    return text


def excerpt(text: str, headers: Sequence[Header]) -> str:
    one = " ".join(redact(text, headers).split())
    return one if len(one) <= EXCERPT else one[:EXCERPT - 1] + "…"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def device_id(text: str, id_field: str) -> str | None:
    """The id in a JSON answer: at `id_field` (dotted), else at id, data.id, device.id."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    for path in (id_field,) if id_field else DEFAULT_ID_FIELDS:
        node: Any = doc
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str | int) and not isinstance(node, bool):
            return str(node)
    return None


def classify(section: RegistrySection, status: int, reason: str, text: str,
             retry_after_header: str | None) -> Answer:
    detail = f"{status} {reason}".strip()
    body = excerpt(text, section.headers)
    if body:
        detail += f": {body}"
    found = device_id(text, section.id_field)
    if 200 <= status < 300:
        return Answer("registered", status, found, detail)
    if status in section.already_status or (
            400 <= status < 500 and status not in (401, 403, 408, 429)
            and re.search(section.already_match, text, re.I)):
        return Answer("already", status, found, detail)
    if status in (401, 403):
        return Answer("refused", status, None, detail)
    if status in (408, 429) or status >= 500:
        return Answer("retry", status, None, detail, retry_after(retry_after_header))
    return Answer("failed", status, None, detail)


def backoff(section: RegistrySection, attempt: int, asked: float | None) -> float:
    """The wait before attempt `attempt + 1`: the registry's Retry-After if it gave one,
    else `backoff` doubled per attempt, never past `max_wait`."""
    if asked is not None:
        return asked
    return float(min(section.backoff * 2 ** (attempt - 1), section.max_wait))
