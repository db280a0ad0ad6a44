"""What a remote port is called: an `rfc2217://host:port` URL, as pyserial and esptool
take it (`serial.serial_for_url`).

The URL is the port's whole identity on the station: its slot key, its ledger name and
what esptool opens. It is checked once, in the config, so a typo is a config error
naming `[ports] remote` instead of a hub host that "never answers".
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlsplit

SCHEME = "rfc2217"


def is_remote(port: str) -> bool:
    """A port the station reaches over TCP (RFC 2217), not a device node."""
    return port.startswith(f"{SCHEME}://")


def host_port(url: str) -> tuple[str, int]:
    """(host, TCP port) of a URL that `remote_url_problem` accepted."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def remote_url_problem(url: object) -> str | None:
    """Why `url` is not a usable remote port, or None. pyserial would accept options
    after `?` (logging=..., ign_set_control, poll_modem, timeout=...); the station owns
    those choices, so a URL is host and port only."""
    if not isinstance(url, str):
        return f"must be rfc2217://host:port strings, not {url!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port that is not a number, or out of range
        return f"{url!r} is not an rfc2217://host:port URL ({e})"
    if parts.scheme != SCHEME or not parts.hostname:
        return f"{url!r} is not an rfc2217://host:port URL"
    if port is None or port == 0:
        return f"{url!r} names no TCP port (rfc2217://host:port)"
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return f"{url!r}: only rfc2217://host:port is accepted (no path, user or options)"
    if url != f"{SCHEME}://{parts.netloc}":
        return f"{url!r}: write it as rfc2217://{parts.netloc} (the URL is the slot key)"
    return None


class RemoteLinks(Protocol):
    """Where the flasher hands a remote port's open connection between jobs
    (station/ports/remote.py): a relay's client that disconnects resets the board."""

    def take(self, url: str) -> Any | None:
        """The connection kept after the last session on `url`, if still open."""

    def keep(self, url: str, port: Any) -> None:
        """Hold `port` open until the far end closes it."""

    def link_failed(self, url: str, port: Any) -> bool:
        """After a serial error: True if the connection is dead (the port is gone)."""
