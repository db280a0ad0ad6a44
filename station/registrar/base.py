"""The Registrar interface: turn an identified board into credentials the cloud accepts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from station.events import RegistrationStep
from station.parts import BoardIdentity


@dataclass(frozen=True)
class DeviceCredentials:
    """Everything a board needs to talk to its broker. Never log this object's keys."""

    thing_name: str
    certificate_pem: str
    private_key_pem: str
    public_key_pem: str
    endpoint: str
    ca_pem: str | None = None
    certificate_id: str | None = None
    certificate_arn: str | None = None

    def __repr__(self) -> str:  # keeps the private key out of logs and tracebacks
        return f"DeviceCredentials(thing_name={self.thing_name!r}, id={self.certificate_id!r})"


Journal = Callable[[str, str | None, str | None], Awaitable[None]]
"""journal(step, certificate_id, certificate_arn): durably record a registration step
(becomes a RegistrationStep event in the ledger) before the next cloud call."""


@dataclass(frozen=True)
class BoardFacts:
    """What the registrar may record about a board (thing attributes)."""

    identity: BoardIdentity
    thing_name: str
    station: str
    firmware_hash: str


class Registrar(Protocol):
    """A way to register boards: "aws-iot", "local-ca" or "none"."""

    kind: str

    async def start(self) -> None:
        """Check access and prepare shared things (policy, endpoint, CA); fail fast."""

    async def register(self, board: BoardFacts, journal: Journal) -> DeviceCredentials:
        """Register one board; idempotent per thing name; raises RegistrationError."""

    async def reconcile(self, steps: Sequence[RegistrationStep], journal_for: Callable[
        [str, str], Journal]) -> list[str]:
        """Finish or clean up registrations a crash interrupted; returns what it did."""

    async def close(self) -> None: ...
