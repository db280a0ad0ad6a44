"""The device registry step (identity/registry.py) against a real Bodh server, and its
config ([registry], config/registry.py): fast, no boards.

The server (tests/registrykit.py) speaks Bodh's contract over HTTPS with a test CA and
over plain HTTP; faults are scripted per request. Waits between attempts go through an
injected sleep that records them, so Retry-After is checked without waiting for it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from station.config import RegistrySection
from station.config._table import Table
from station.config.registry import registry_section
from station.errors import ConfigError, RegistrationError
from station.events import RegistryStep
from station.identity import BoardFacts, HttpRegistry, RegistryNote
from station.identity.registrar.local_ca import LocalCa
from station.identity.registry_http import classify, render, retry_after
from station.parts import BoardIdentity
from tests.registrykit import BodhServer, bodh, wait_until

KEY = "bodh-admin-key-0123456789"
pytestmark = pytest.mark.timeout(60)


def section(data: dict[str, Any], file: Path = Path("/site/station.toml")) -> RegistrySection:
    return registry_section(Table(file, "registry", data))


def board(n: int = 1) -> BoardFacts:
    mac = f"24a1600000{n:02x}"
    return BoardFacts(identity=BoardIdentity("esp32", mac), thing_name=f"line1-{mac}",
                      station="line-1", firmware_hash="ab" * 32, firmware_version="1.0.0")


class Notes:
    def __init__(self) -> None:
        self.notes: list[RegistryNote] = []

    async def __call__(self, note: RegistryNote) -> None:
        self.notes.append(note)

    @property
    def steps(self) -> list[str]:
        return [n.step for n in self.notes]


class Waits:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def registry(server: BodhServer, ca: LocalCa | None, monkeypatch: pytest.MonkeyPatch,
             **keys: Any) -> tuple[HttpRegistry, Waits]:
    monkeypatch.setenv("BODH_API_KEY", keys.pop("key", KEY))
    data: dict[str, Any] = {"kind": "bodh", "url": server.url, "timeout": 2.0, **keys}
    if ca is not None:
        data["ca_file"] = str(_ca_file(ca))
    waits = Waits()
    return HttpRegistry(section(data), sleep=waits), waits


_CA_FILES: dict[int, Path] = {}


def _ca_file(ca: LocalCa) -> Path:
    import tempfile

    path = _CA_FILES.get(id(ca))
    if path is None:
        path = Path(tempfile.mkdtemp()) / "ca.crt"
        path.write_text(ca.pem)
        _CA_FILES[id(ca)] = path
    return path


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCa:
    return LocalCa.open(tmp_path_factory.mktemp("ca") / "ca")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def register(reg: HttpRegistry, facts: BoardFacts, notes: Notes) -> Any:
    try:
        return await reg.register(facts, notes)
    finally:
        await reg.close()


# -- the config ---------------------------------------------------------------------------


def test_bodh_preset_is_bodh_clis_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BODH_API_KEY", KEY)
    s = section({"kind": "bodh", "host": "bodh.example.com"})
    assert s.url == "https://bodh.example.com:443/api/devices"  # the CLI's secure default
    assert s.method == "POST" and s.body == {"device": {"id": "{thing}"}}
    assert {h.name: h.value for h in s.headers} == {
        "Accept": "application/json", "x-api-key": KEY, "Content-Type": "application/json"}
    assert KEY not in repr(s) and "$BODH_API_KEY" in repr(s)
    plain = section({"kind": "bodh", "host": "10.0.0.5", "secure": False})
    assert plain.url == "http://10.0.0.5:4000/api/devices"  # self-hosted: the CLI's port
    assert section({"kind": "bodh", "url": "http://bodh.local:4000/"}).url == \
        "http://bodh.local:4000/api/devices"
    request = render(s, {"thing": 'a"b', "mac": "m", "chip": "c", "station": "s",
                         "certificate_id": "", "firmware_version": ""})
    assert json.loads(request.body) == {"device": {"id": 'a"b'}}


@pytest.mark.parametrize("data,env,expected", [
    ({"kind": "bodh", "url": "bodh.example.com"}, {},
     "registry.url: 'bodh.example.com' has no scheme: write https://bodh.example.com"),
    ({"kind": "http", "url": "https://r.example/api/{serial}"}, {},
     "registry.url: 'https://r.example/api/{serial}': {serial} is not a field the station "
     "has (use {thing}, {mac}, {chip}, {station}, {certificate_id}, {firmware_version})"),
    ({"kind": "http", "url": "https://r.example/d", "body": {"d": {"id": "{thingname}"}}}, {},
     "registry.body.d.id: '{thingname}': {thingname} is not a field"),
    ({"kind": "http", "url": "https://r.example/d", "headers": {"x-api-key": "s3cr3t"}}, {},
     "registry.headers.x-api-key: secrets never go in station.toml: write \"env:NAME\""),
    ({"kind": "bodh", "url": "https://b.example", "api_key": "s3cr3t"}, {},
     "registry.api_key: secrets never go in station.toml"),
    ({"kind": "bodh", "url": "https://b.example"}, {"BODH_API_KEY": None},
     "registry.api_key: the environment variable BODH_API_KEY is not set"),
    ({"kind": "http", "url": "https://user:pw@r.example/d"}, {},
     "registry.url: credentials never go in station.toml"),
    ({"kind": "http", "url": "https://r.example/d?api_key=abc"}, {},
     "registry.url: a key in the query string would be in station.toml"),
    ({"kind": "bodh", "url": "https://b.example", "body": {"x": "y"}}, {},
     "registry.body: is fixed by kind = \"bodh\""),
])
def test_config_mistakes_name_the_key(data: dict[str, Any], env: dict[str, str | None],
                                      expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BODH_API_KEY", KEY)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as e:
        section(data)
    assert expected in str(e.value)
    assert str(e.value).startswith("/site/station.toml: registry.")
    assert "s3cr3t" not in str(e.value).split("secrets never")[-1]


# -- answers, as plain data ---------------------------------------------------------------


def test_answers_are_sorted_and_retry_after_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BODH_API_KEY", KEY)
    s = section({"kind": "bodh", "url": "https://b.example"})
    taken = json.dumps({"errors": {"id": ["has already been taken"]}})
    assert classify(s, 201, "Created", '{"data": {"id": "x1"}}', None).device_id == "x1"
    assert classify(s, 422, "Unprocessable", taken, None).outcome == "already"
    assert classify(s, 422, "Unprocessable", '{"errors": {"id": ["is invalid"]}}',
                    None).outcome == "failed"
    assert classify(s, 409, "Conflict", "", None).outcome == "already"
    assert classify(s, 401, "Unauthorized", f"bad key {KEY}", None).outcome == "refused"
    assert KEY not in classify(s, 401, "Unauthorized", f"bad key {KEY}", None).detail
    assert classify(s, 429, "Too Many", "", "7").wait == 7.0
    assert classify(s, 503, "Unavailable", "", None).outcome == "retry"
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after("soon") is None


# -- against the server ---------------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
def test_register_then_already(tls: bool, ca: LocalCa,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    with bodh(KEY, ca if tls else None) as server:
        reg, _ = registry(server, ca if tls else None, monkeypatch)
        notes = Notes()
        first = run(register(reg, board(), notes))
        assert (first.step, first.device_id) == ("registered", board().thing_name)
        assert notes.steps == ["pending", "registered"]
        assert json.loads(notes.notes[0].request.body) == {"device": {"id": board().thing_name}}
        reg, _ = registry(server, ca if tls else None, monkeypatch)
        again = run(register(reg, board(), Notes()))
        assert again.step == "already"
        assert server.created == {board().thing_name: 1}
        assert server.keys_seen == [KEY, KEY]


def test_a_wrong_key_fails_at_once_naming_the_variable_never_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with bodh(KEY) as server:
        reg, waits = registry(server, None, monkeypatch, key="wrong-key-42")
        notes = Notes()
        with pytest.raises(RegistrationError) as e:
            run(register(reg, board(), notes))
        assert "401 Unauthorized" in str(e.value) and "x-api-key from $BODH_API_KEY" in \
            str(e.value)
        assert "wrong-key-42" not in str(e.value) + repr(notes.notes)
        assert notes.steps == ["pending", "failed"] and waits.waits == []
        assert server.devices == {}


def test_429_retry_after_500_and_a_slow_answer_are_retried_into_one_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with bodh(KEY, faults=["429", "500", "slow"], retry_after="3", slow=1.5) as server:
        reg, waits = registry(server, None, monkeypatch, timeout=0.5, backoff=0.25)
        outcome = run(register(reg, board(), Notes()))
        # 429: the registry's 3 s; 500: the backoff doubled (2nd wait); the slow answer
        # timed out, the next try made the device, the slow one then heard "taken"
        assert waits.waits == [3.0, 0.5, 1.0]
        assert outcome.step == "registered"
        wait_until("the slow request's end", lambda: server.answers[422] == 1)
        assert server.created == {board().thing_name: 1}
        assert server.answers[429] == 1 and server.answers[500] == 1


@pytest.mark.parametrize("fault", ["drop", "lose"])
def test_dropped_connections_are_retried_and_make_one_device(
        fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with bodh(KEY, faults=[fault, fault]) as server:
        reg, waits = registry(server, None, monkeypatch)
        outcome = run(register(reg, board(), Notes()))
        assert len(waits.waits) == 2
        assert outcome.step == ("registered" if fault == "drop" else "already")
        assert server.created == {board().thing_name: 1}


def test_gives_up_after_its_attempts_and_a_long_retry_after_fails_now(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with bodh(KEY, faults=["500"] * 3) as server:
        reg, _ = registry(server, None, monkeypatch, attempts=3)
        with pytest.raises(RegistrationError, match="gave up after 3 attempts: 500"):
            run(register(reg, board(), Notes()))
    with bodh(KEY, faults=["429"], retry_after="3600") as server:
        reg, waits = registry(server, None, monkeypatch)
        with pytest.raises(RegistrationError, match="asks to wait 3600 s .* max_wait 60 s"):
            run(register(reg, board(), Notes()))
        assert waits.waits == []


def test_https_without_the_registrys_ca_is_not_trusted_and_not_retried(
        ca: LocalCa, monkeypatch: pytest.MonkeyPatch) -> None:
    with bodh(KEY, ca) as server:
        reg, waits = registry(server, None, monkeypatch)  # no ca_file: the system's CAs
        with pytest.raises(RegistrationError, match="certificate is not trusted .* ca_file"):
            run(register(reg, board(), Notes()))
        assert waits.waits == [] and server.posts == {}


def test_reconcile_sends_what_was_pending_and_already_counts_as_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with bodh(KEY) as server:
        reg, _ = registry(server, None, monkeypatch)
        run(register(reg, board(1), Notes()))  # board 1 reached the registry, 2 did not
        body = json.dumps({"device": {"id": board(2).thing_name}})
        steps = [RegistryStep(job_id=f"j{n}", port="", slot="", mac=board(n).identity.mac,
                              thing_name=board(n).thing_name, step="pending", method="POST",
                              url=server.url + "/api/devices", body=body if n == 2 else
                              json.dumps({"device": {"id": board(1).thing_name}}))
                 for n in (1, 2)]
        notes = Notes()
        reg, _ = registry(server, None, monkeypatch)

        async def go() -> list[str]:
            try:
                return await reg.reconcile(steps, lambda mac, thing: notes)
            finally:
                await reg.close()

        lines = run(go())
        assert notes.steps == ["already", "registered"]
        assert "sent again: already" in lines[0] and "sent again: registered" in lines[1]
        assert server.created == {board(1).thing_name: 1, board(2).thing_name: 1}
