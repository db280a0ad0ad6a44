"""Registrars: how a board becomes known to its cloud or broker ("none", "local-ca", "aws-iot").

`make_registrar` picks one from `[registrar] kind`; the worker only sees the `Registrar`
protocol of base.py. aws_iot (and boto3) is imported only when chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from station.registrar.base import NoRegistrar, Registrar

if TYPE_CHECKING:  # credentials.py imports registrar.base: keep this package light
    from station.config import Config
    from station.credentials import CredentialStore


def make_registrar(config: Config, out: CredentialStore,
                   emit_throttled: Callable[[str], None] | None = None) -> Registrar:
    """The configured registrar; `emit_throttled(api)` is called on the event loop thread
    whenever the cloud (or our own limiter) makes a board wait, for the dashboard."""
    kind = config.registrar.kind
    if kind == "local-ca":
        from station.registrar.local_ca import LocalCaRegistrar

        return LocalCaRegistrar(config.registrar.local_ca, out)
    if kind == "aws-iot":
        from station.registrar.aws_iot import AwsIotRegistrar

        return AwsIotRegistrar(config.registrar.aws, out, station=config.station.name,
                               emit_throttled=emit_throttled)
    return NoRegistrar()


__all__ = ["make_registrar"]
