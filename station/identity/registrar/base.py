"""The Registrar interface: turn an identified board into credentials the cloud accepts."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from station.events import RegistrationStep
from station.parts import BoardIdentity, DeviceCredentials

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
    certificate_id: str | None = None  # the registrar's, for the registry's {certificate_id}
    firmware_version: str = ""  # the app's version (esp_app_desc), for {firmware_version}
    ds: bool = False
    """[credentials] ds for this board's chip: an RSA key whose private half is never
    written (it becomes DS ciphertext, identity/ds.py); certs_out keeps the public key."""


class Registrar(Protocol):
    """A way to register boards: "aws-iot", "local-ca" or "none"."""

    kind: str

    async def start(self) -> None:
        """Check access and prepare shared things (policy, endpoint, CA); fail fast."""

    async def register(self, board: BoardFacts, journal: Journal) -> DeviceCredentials | None:
        """Register one board; idempotent per thing name; raises RegistrationError.

        Returns None only for the "none" kind: the board gets no credentials partition.
        """

    async def reconcile(self, steps: Sequence[RegistrationStep], journal_for: Callable[
        [str, str], Journal]) -> list[str]:
        """Finish or clean up registrations a crash interrupted; returns what it did."""

    async def release(self, credentials: DeviceCredentials, journal: Journal) -> None:
        """The board ended without these credentials: make them unusable until it comes
        back (register() then makes them usable again). Never raises."""

    async def close(self) -> None: ...


class NoRegistrar:
    """kind = "none": boards are flashed without registration or credentials."""

    kind = "none"

    async def start(self) -> None:
        return None

    async def register(self, board: BoardFacts, journal: Journal) -> DeviceCredentials | None:
        return None

    async def reconcile(self, steps: Sequence[RegistrationStep], journal_for: Callable[
            [str, str], Journal]) -> list[str]:
        return []

    async def release(self, credentials: DeviceCredentials, journal: Journal) -> None:
        return None

    async def close(self) -> None:
        return None


CRASH_ENV = "STATION_TEST_CRASH_AFTER"
"""Test hook: STATION_TEST_CRASH_AFTER=<step> makes the process SIGKILL itself right after
the journal has durably recorded <step> (e.g. "cert-created"), to prove crash safety.
Unset in production; reading an environment variable per step costs nothing."""


def crash_point(step: str) -> None:
    """SIGKILL this process if the crash-test hook names `step` (see CRASH_ENV)."""
    if os.environ.get(CRASH_ENV) == step:
        logging.getLogger("station.registrar").critical("test hook: SIGKILL after %s", step)
        os.kill(os.getpid(), signal.SIGKILL)


def journaled(journal: Journal) -> Journal:
    """The journal with the crash-test hook after each durable step."""
    async def record(step: str, certificate_id: str | None,
                     certificate_arn: str | None) -> None:
        await journal(step, certificate_id, certificate_arn)
        crash_point(step)
    return record
