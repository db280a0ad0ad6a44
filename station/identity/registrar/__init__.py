"""Registrars: how a board becomes known to its cloud or broker ("none", "local-ca", "aws-iot").

`make_registrar` picks one from `[registrar] kind`; the worker only sees the `Registrar`
protocol of base.py. aws_iot (and boto3) is imported only when chosen.

    base.py        the Registrar protocol, "none", the journal and its crash-test hook
    local_ca.py    kind = "local-ca": a self-hosted CA signs device certificates
    aws_iot.py     kind = "aws-iot": AWS IoT Core, crash-safely and idempotently
    aws_client.py  the one AWS IoT client: threads, rate limits, throttling, clear errors
    policy.py      the device policy document, checked before any board
    keys.py        keys and CSRs (EC P-256, PEM, key comparison)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from station.identity.registrar.base import (
    CRASH_ENV,
    BoardFacts,
    Journal,
    NoRegistrar,
    Registrar,
    crash_point,
    journaled,
)
from station.identity.registrar.keys import (
    certificate_key_matches,
    key_pair_matches,
    same_public_key,
)

if TYPE_CHECKING:  # keep this package light: boto3 and the CA only when chosen
    from station.config import Config
    from station.identity.credentials import CredentialStore


def make_registrar(config: Config, out: CredentialStore,
                   emit_throttled: Callable[[str], None] | None = None) -> Registrar:
    """The configured registrar; `emit_throttled(api)` is called on the event loop thread
    whenever the cloud (or our own limiter) makes a board wait, for the dashboard."""
    kind = config.registrar.kind
    if kind == "local-ca":
        from station.identity.registrar.local_ca import LocalCaRegistrar

        return LocalCaRegistrar(config.registrar.local_ca, out)
    if kind == "aws-iot":
        from station.identity.registrar.aws_iot import AwsIotRegistrar

        return AwsIotRegistrar(config.registrar.aws, out, station=config.station.name,
                               emit_throttled=emit_throttled)
    return NoRegistrar()


__all__ = [
    "CRASH_ENV", "BoardFacts", "Journal", "NoRegistrar", "Registrar", "certificate_key_matches",
    "crash_point", "journaled", "key_pair_matches", "make_registrar", "same_public_key",
]
