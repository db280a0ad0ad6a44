"""[registry]: each board made known to a device registry over HTTP, beside the registrar.

Most fleets keep an inventory next to their certificate authority: their own API, a
platform's device list (IoTReady's Bodh, `kind = "bodh"`), an ERP. This step tells it
about every board while the board is flashed; a board is done only once the registry
has it.

Why it looks like this:
- Journaled around the request: a "pending" row (method, URL, body) is durable before
  the request leaves, the outcome after the answer. A SIGKILL between the two leaves a
  "pending" row; the next start (or `station reconcile`) sends that request again, and
  the registry's "already registered" answer counts as done. So a board is never
  registered twice (the registry refuses a second device with the same id) nor missing
  (whatever was in flight is finished). This relies on the registry keying devices by
  the id the station sends, which Bodh and most inventories do.
- Retried with backoff on what can pass (429, 5xx, 408, the network: a refused or dropped
  connection, an answer that never came), honouring `Retry-After`; never on a refusal of
  the key (401/403) or a malformed request, which need a person.
- One shared httpx client per station: connections are kept and reused across boards;
  its calls never block the event loop.
- No secret in any log: headers are never journaled or logged; an answer quoted in a
  message has the environment's values taken out (registry_http.redact).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from station.config import RegistrySection
from station.errors import RegistrationError
from station.events import RegistryStep
from station.identity.registrar.base import BoardFacts, crash_point
from station.identity.registry_http import (
    Answer,
    Request,
    backoff,
    board_values,
    classify,
    headers_of,
    redact,
    render,
)

if TYPE_CHECKING:  # imported when a [registry] starts: a station without one (most) skips
    import httpx  # ~40 ms of CPU at every start

log = logging.getLogger("station.registry")
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise
logging.getLogger("httpcore").setLevel(logging.WARNING)


@dataclass(frozen=True)
class RegistryNote:
    """One journaled step of a board's registry request (becomes a RegistryStep event)."""

    step: str  # "pending", "registered", "already", "failed"
    request: Request
    device_id: str | None = None
    status: int | None = None
    detail: str = ""


RegistryJournal = Callable[[RegistryNote], Awaitable[None]]


@dataclass(frozen=True)
class RegistryOutcome:
    step: str  # "registered" or "already"
    device_id: str | None


class HttpRegistry:
    """kind "http" or "bodh": `register` per board, `reconcile` after a crash."""

    def __init__(self, section: RegistrySection,
                 emit_throttled: Callable[[str], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.section = section
        self.kind = section.kind
        self._throttled = emit_throttled
        self._sleep = sleep
        self._client: httpx.AsyncClient | None = None

    @property
    def needs_certificate(self) -> bool:
        """The request names {certificate_id}: it waits for the registrar."""
        return "certificate_id" in self.section.fields

    def describe(self) -> str:
        return self.section.describe()

    async def start(self) -> None:
        verify: ssl.SSLContext | bool = False
        if self.section.verify_tls:
            ca = self.section.ca_file
            verify = ssl.create_default_context(cafile=str(ca) if ca else None)
        import httpx

        self._client = httpx.AsyncClient(verify=verify, timeout=self.section.timeout,
                                         follow_redirects=False)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def register(self, board: BoardFacts, journal: RegistryJournal) -> RegistryOutcome:
        """Make the board known; "already" is success. Raises RegistrationError."""
        identity = board.identity
        request = render(self.section, board_values(
            board.thing_name, identity.mac, identity.chip, board.station,
            board.certificate_id, board.firmware_version))
        await journal(RegistryNote("pending", request))
        crash_point("registry-pending")
        answer = await self._exchange(request, board.thing_name)
        crash_point("registry-posted")  # answered, the outcome not yet recorded
        if answer.outcome in ("registered", "already"):
            await journal(RegistryNote(answer.outcome, request, answer.device_id,
                                       answer.status, answer.detail))
            crash_point(f"registry-{answer.outcome}")
            log.info("%s: registry %s (%s)%s", board.thing_name, answer.outcome,
                     answer.status, f", id {answer.device_id}" if answer.device_id else "")
            return RegistryOutcome(answer.outcome, answer.device_id)
        await journal(RegistryNote("failed", request, None, answer.status, answer.detail))
        raise RegistrationError(self._message(request, answer))

    def _message(self, request: Request, answer: Answer) -> str:
        where = f"registry {request.method} {request.url}"
        if answer.outcome == "refused":
            keys = ", ".join(h.shown for h in self.section.headers if h.env)
            hint = f"; check {keys}" if keys else "; the registry wants a key: add a " \
                "header from the environment (\"env:NAME\")"
            return f"{where}: the registry refused the request ({answer.detail}){hint}"
        return f"{where}: {answer.detail}"

    async def _exchange(self, request: Request, thing: str) -> Answer:
        """The request until an answer that is not worth retrying, or the last attempt."""
        attempts = self.section.attempts
        answer = Answer("failed", detail="no attempt made")
        for attempt in range(1, attempts + 1):
            answer = await self._once(request)
            if answer.outcome != "retry" or attempt == attempts:
                break
            wait = backoff(self.section, attempt, answer.wait)
            if wait > self.section.max_wait:
                return Answer("failed", answer.status, None, f"{answer.detail}; the registry "
                              f"asks to wait {wait:g} s (Retry-After), longer than [registry] "
                              f"max_wait {self.section.max_wait:g} s")
            if answer.status == 429 and self._throttled is not None:
                self._throttled("registry")
            log.info("%s: registry: %s; attempt %d of %d in %.2f s", thing, answer.detail,
                     attempt + 1, attempts, wait)
            await self._sleep(wait)
        if answer.outcome == "retry":
            return Answer("failed", answer.status, None,
                          f"gave up after {attempts} attempts: {answer.detail}")
        return answer

    async def _once(self, request: Request) -> Answer:
        if self._client is None:
            await self.start()
        assert self._client is not None
        import httpx

        try:
            reply = await self._client.request(
                request.method, request.url, content=request.body.encode() or None,
                headers=headers_of(self.section))
        except httpx.TransportError as e:
            text = redact(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                          self.section.headers)
            if "CERTIFICATE_VERIFY_FAILED" in text:  # a person must act: not retried
                return Answer("failed", None, None, f"the registry's certificate is not "
                              f"trusted ({text}); give its CA as [registry] ca_file")
            return Answer("retry", None, None, f"cannot reach the registry ({text})")
        return classify(self.section, reply.status_code, reply.reason_phrase, reply.text,
                        reply.headers.get("retry-after"))

    async def reconcile(self, steps: Sequence[RegistryStep],
                        journal_for: Callable[[str, str], RegistryJournal]) -> list[str]:
        """Send again every request a crash left "pending"; "already" is done."""
        last: dict[str, RegistryStep] = {}
        for step in steps:
            last[step.thing_name] = step
        lines = []
        for step in (s for s in last.values() if s.step == "pending"):
            request = Request(step.method, step.url, step.body)
            answer = await self._exchange(request, step.thing_name)
            if answer.outcome in ("registered", "already"):
                await journal_for(step.mac, step.thing_name)(RegistryNote(
                    answer.outcome, request, answer.device_id, answer.status, answer.detail))
                lines.append(f"registry: {step.thing_name}: the request in flight at the "
                             f"stop was sent again: {answer.outcome}" +
                             (f" (id {answer.device_id})" if answer.device_id else ""))
            else:  # not known whether it landed: it stays pending for the next try
                lines.append(f"registry: {step.thing_name}: still pending "
                             f"({self._message(request, answer)}); station reconcile "
                             "tries again")
        return lines


def pending_without_registry(steps: Sequence[RegistryStep]) -> list[str]:
    """[registry] kind = "none" now, but a crash left requests in flight: say so."""
    last: dict[str, RegistryStep] = {}
    for step in steps:
        last[step.thing_name] = step
    return [f"registry: {s.thing_name}: a request to {s.url} was in flight at the stop, but "
            "[registry] kind is now \"none\": not sent again" for s in last.values()
            if s.step == "pending"]


def make_registry(section: RegistrySection,
                  emit_throttled: Callable[[str], None] | None = None) -> HttpRegistry | None:
    return None if section.kind == "none" else HttpRegistry(section, emit_throttled)
