"""[registry] (a device registry over HTTP) and [verify] cloud (the board's own MQTT
session): read and checked at start.

Why it looks like this:
- A registry's request is a template (`url`, a JSON `body` as a TOML table whose strings
  name board fields), so a line can talk to its own inventory API, a platform's device
  list or an ERP without code. A template naming a field the station does not have is an
  error at start, not a 400 from the registry at the first board.
- Secrets never go in station.toml: a header that carries one (its name says key, token,
  auth, secret, password, cookie) must read `env:NAME`, and NAME must be set when the
  station starts; the value lives in a `Header` whose repr never shows it, so neither a
  traceback nor a log line of the config can leak it.
- kind = "bodh" is exactly bodh_cli's `register` (github IoTReady/bodh_cli, bodh.py):
  `POST /api/devices`, body `{"device": {"id": <device id>}}`, headers `Accept` and
  `Content-Type: application/json` and `x-api-key: <admin key>`, HTTPS unless the
  instance is self-hosted on plain HTTP (the CLI's `--secure`, default on). Its
  keys are the CLI's own (`host`, `port`, `secure`, the key) or one `url`; what the
  contract fixes (method, body, headers) cannot be changed: kind = "http" can.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from station.config._table import Table

REGISTRY_FIELDS = ("thing", "mac", "chip", "station", "certificate_id", "firmware_version")
CLOUD_FIELDS = ("thing", "mac", "chip", "station")
SECRET_HEADER = re.compile(r"auth|key|token|secret|passw|cookie|session|signature", re.I)
SECRET_QUERY = re.compile(r"(?:^|[&;])[^=]*(?:key|token|secret|passw|sig)[^=]*=", re.I)
ENV = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
BODH_PATH = "/api/devices"
BODH_PORT = 4000  # bodh_cli's default port (for self-hosted instances)
ENV_HELP = ("the station reads secrets only from its environment: set it in the service's "
            "Environment= or EnvironmentFile= (config/station.service)")


@dataclass(frozen=True)
class Header:
    """One request header; a value from the environment is never shown."""

    name: str
    value: str = field(repr=False)
    env: str | None = None  # the variable it came from ("BODH_API_KEY")

    def __repr__(self) -> str:
        shown = f"${self.env}" if self.env else repr(self.value)
        return f"Header({self.name}: {shown})"

    @property
    def shown(self) -> str:
        """For messages and `station check`: the variable's name, never its value."""
        return f"{self.name} from ${self.env}" if self.env else f"{self.name}: {self.value}"


@dataclass(frozen=True)
class RegistrySection:
    """[registry]: kind "none" (default), "http" or "bodh" (a preset of "http")."""

    kind: Literal["none", "http", "bodh"] = "none"
    url: str = ""  # a template: {thing} etc. are URL-quoted into it
    method: str = "POST"
    body: Mapping[str, Any] | None = None  # a JSON template: string leaves are templates
    headers: tuple[Header, ...] = ()
    ca_file: Path | None = None
    verify_tls: bool = True
    timeout: float = 10.0  # seconds per request
    attempts: int = 5  # requests per board at most (429, 5xx and network errors retried)
    backoff: float = 0.5  # first wait between attempts; doubled each time
    max_wait: float = 60.0  # the longest wait (a longer Retry-After fails the board now)
    already_status: tuple[int, ...] = (409,)
    already_match: str = r"already|taken|exists"
    """A regex: a 4xx answer whose body matches means "registered already" (a 422 whose
    body says the id is taken: the Phoenix/Rails way)."""
    id_field: str = ""  # dotted path to the id in the answer ("" = id, data.id, device.id)

    @property
    def fields(self) -> frozenset[str]:
        """The board fields the request names."""
        found = set(_fields(self.url))
        for text in _strings(self.body or {}):
            found |= set(_fields(text))
        return frozenset(found)

    def describe(self) -> str:
        headers = ", ".join(h.shown for h in self.headers if h.env)
        return f"{self.kind} {self.method} {self.url}" + (f" ({headers})" if headers else "")


@dataclass(frozen=True)
class CloudSection:
    """[verify] cloud: prove each board's new credentials on its broker before it leaves."""

    mode: Literal["off", "connect", "publish"] = "off"
    topic: str = "things/{thing}/station-test"  # AWS's shipped policy allows things/<thing>/*
    endpoint: str = ""  # host[:port]; "" = the board's own (what the registrar wrote)
    ca_file: Path | None = None  # the broker's CA; default: the registrar's, else the system's
    timeout: float = 10.0


def _fields(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def check_template(t: Table, key: str, text: str, allowed: tuple[str, ...]) -> None:
    """Every {field} known, braces balanced: an error names the key and the fields."""
    names = ", ".join("{" + f + "}" for f in allowed)
    try:
        found = _fields(text)
    except ValueError as e:
        raise t.error(key, f"{text!r}: {e} (write {{{{ and }}}} for a literal brace)") from None
    for name in found:
        if name not in allowed:
            what = f"{{{name}}}" if name else "{}"
            raise t.error(key, f"{text!r}: {what} is not a field the station has (use "
                               f"{names})")


def _body(t: Table, value: Any, key: str) -> None:
    if isinstance(value, str):
        check_template(t, key, value, REGISTRY_FIELDS)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _body(t, v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _body(t, v, f"{key}[{i}]")


def check_url(t: Table, key: str, url: str, *, hint: str = "") -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        missing = "has no scheme" if "://" not in url else \
            f"is not an http(s) URL ({parts.scheme}://)"
        raise t.error(key, f"{url!r} {missing}: write https://{url.split('://')[-1]} (or "
                           f"http:// for a registry on plain HTTP){hint}")
    if parts.username or parts.password:
        raise t.error(key, "credentials never go in station.toml: send them in a header "
                           "from the environment (\"env:NAME\")")
    if SECRET_QUERY.search(parts.query):
        raise t.error(key, "a key in the query string would be in station.toml: send it in "
                           "a header from the environment (\"env:NAME\")")
    try:
        port = parts.port
    except ValueError:
        raise t.error(key, f"{url!r}: the port is not a number") from None
    if port is not None and not 0 < port < 65536:
        raise t.error(key, f"{url!r}: port {port} is not a TCP port")
    check_template(t, key, url, REGISTRY_FIELDS)


def secret_value(t: Table, key: str, raw: str, *, secret: bool) -> tuple[str, str | None]:
    """(value, variable): `env:NAME` read now; a secret written in the file refused."""
    m = ENV.match(raw.strip())
    if m is None:
        if secret or raw.startswith("env:"):
            why = f"{raw!r} is not env:NAME" if raw.startswith("env:") else \
                "secrets never go in station.toml"
            raise t.error(key, f"{why}: write \"env:NAME\" and set NAME in the station's "
                               "environment")
        return raw, None
    name = m.group(1)
    value = os.environ.get(name)
    if not value:
        raise t.error(key, f"the environment variable {name} is not set; {ENV_HELP}")
    return value, name


def _statuses(t: Table, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    values = t.get(key, list, list(default))
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 200 <= v <= 599:
            raise t.error(key, f"{v!r} is not an HTTP status (200 to 599)")
    return tuple(values)


def _common(t: Table) -> dict[str, Any]:
    """The keys both kinds share: TLS, timeouts, retries, the answer's id."""
    ca_file = t.path("ca_file", Path()) if "ca_file" in t.data else None
    if ca_file is not None and not ca_file.is_file():
        raise t.error("ca_file", f"{ca_file}: no such file")
    values = dict(ca_file=ca_file, verify_tls=t.get("verify_tls", bool, True),
                  timeout=t.number("timeout", 10.0, minimum=0.1),
                  attempts=t.integer("attempts", 5, minimum=1),
                  backoff=t.number("backoff", 0.5, minimum=0.0),
                  max_wait=t.number("max_wait", 60.0, minimum=0.0),
                  id_field=t.get("id_field", str, ""))
    if ca_file is not None and not values["verify_tls"]:
        raise t.error("verify_tls", "false turns off the check ca_file is for; give one")
    return values


def registry_section(t: Table) -> RegistrySection:
    kind = t.choice("kind", ("none", "http", "bodh"), "none")
    if kind == "none":
        section = RegistrySection()
    elif kind == "bodh":
        section = _bodh(t)
    else:
        section = _http(t)
    t.done()
    return section


def _http(t: Table) -> RegistrySection:
    if "url" not in t.data:
        raise t.error("url", "is required with kind = \"http\" (the registry's URL)")
    url = t.get("url", str, "")
    check_url(t, "url", url)
    method = t.get("method", str, "POST").upper()
    if method not in ("POST", "PUT", "PATCH"):
        raise t.error("method", f"must be POST, PUT or PATCH, not {method!r}")
    body = t.get("body", dict, {}) or None
    if body is not None:
        _body(t, body, "body")
    headers = []
    table = t.sub("headers")
    for name in table.data:
        raw = table.get(name, str, "")
        value, env = secret_value(table, name, raw, secret=bool(SECRET_HEADER.search(name)))
        headers.append(Header(name, value, env))
    table.done()
    names = {h.name.lower() for h in headers}
    if body is not None and "content-type" not in names:
        headers.append(Header("Content-Type", "application/json"))
    if "accept" not in names:
        headers.append(Header("Accept", "application/json"))
    already_match = t.get("already_match", str, RegistrySection.already_match)
    try:
        re.compile(already_match)
    except re.error as e:
        raise t.error("already_match", f"{already_match!r} is not a valid regex ({e})") \
            from None
    return RegistrySection(kind="http", url=url, method=method, body=body,
                           headers=tuple(headers),
                           already_status=_statuses(t, "already_status", (409,)),
                           already_match=already_match, **_common(t))


BODH_FIXED = ("method", "body", "headers", "already_status", "already_match")


def _bodh(t: Table) -> RegistrySection:
    """bodh_cli's contract; only where the instance is and the key are the user's."""
    for key in BODH_FIXED:
        if key in t.data:
            raise t.error(key, "is fixed by kind = \"bodh\" (bodh_cli's contract: POST "
                               "/api/devices, body {\"device\": {\"id\": ...}}); use kind = "
                               "\"http\" to change it")
    if "url" in t.data:
        for key in ("host", "port", "secure"):
            if key in t.data:
                raise t.error(key, "give url, or host/port/secure (bodh_cli's keys), not both")
        base = t.get("url", str, "")
        check_url(t, "url", base, hint="; Bodh's default is https")
        url = base.rstrip("/")
        if not urlsplit(url).path.endswith(BODH_PATH):
            url += BODH_PATH
    else:
        if "host" not in t.data:
            raise t.error("host", "is required with kind = \"bodh\" (or a url)")
        host = t.get("host", str, "").strip()
        if not host or "/" in host or ":" in host:
            raise t.error("host", f"{host!r} is not a host name (the port goes in port; for "
                                  "a URL use url)")
        secure = t.get("secure", bool, True)
        port = t.integer("port", 443 if secure else BODH_PORT, minimum=1)
        if port > 65535:
            raise t.error("port", f"{port} is not a TCP port")
        url = f"{'https' if secure else 'http'}://{host}:{port}{BODH_PATH}"
    raw = t.get("api_key", str, "env:BODH_API_KEY")
    key, env = secret_value(t, "api_key", raw, secret=True)
    headers = (Header("Accept", "application/json"), Header("x-api-key", key, env),
               Header("Content-Type", "application/json"))
    return RegistrySection(kind="bodh", url=url, method="POST",
                           body={"device": {"id": "{thing}"}}, headers=headers,
                           **_common(t))


def cloud_section(t: Table, registrar_kind: str) -> CloudSection:
    """The cloud_* keys of [verify] (the caller's table; it calls `done`)."""
    mode = t.get("cloud", str, "off")
    if mode not in ("off", "connect", "publish"):
        raise t.error("cloud", f"must be \"off\", \"connect\" or \"publish\", not {mode!r}")
    topic = t.get("cloud_topic", str, CloudSection.topic)
    check_template(t, "cloud_topic", topic, CLOUD_FIELDS)
    if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
        raise t.error("cloud_topic", f"{topic!r}: a topic to publish on, without wildcards "
                                     "(+, #) or $")
    endpoint = t.get("cloud_endpoint", str, "").strip()
    if endpoint:
        host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
        if "://" in endpoint or not (host or endpoint) or (port and not port.isdigit()):
            raise t.error("cloud_endpoint", f"{endpoint!r} is not host or host:port "
                                            "(e.g. \"broker.local:8883\")")
    ca_file = t.path("cloud_ca", Path()) if "cloud_ca" in t.data else None
    if ca_file is not None and not ca_file.is_file():
        raise t.error("cloud_ca", f"{ca_file}: no such file")
    section = CloudSection(mode=mode, topic=topic, endpoint=endpoint,  # type: ignore[arg-type]
                           ca_file=ca_file, timeout=t.number("cloud_timeout", 10.0, 0.5))
    if mode != "off" and registrar_kind == "none":
        raise t.error("cloud", f"\"{mode}\" needs the board's credentials, but [registrar] "
                               "kind is \"none\"")
    return section
