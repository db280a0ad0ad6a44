"""Issue 22 end to end: `station run` tells a real Bodh registry about every board.

Real esptool on virtual boards, the real daemon in a subprocess, the registry of
tests/registrykit.py (Bodh's contract over HTTPS with a test CA, or over HTTP behind a
proxy that drops every other connection). Checked where it ends up: the registry's
devices (each board once), the ledger (`station ledger`), `station reconcile`'s lines,
and that the API key and the boards' private keys are in no log.
"""

from __future__ import annotations

import secrets
import signal
from collections import Counter
from pathlib import Path

import pytest

from station.identity import CRASH_ENV
from station.identity.registrar.local_ca import LocalCa
from station.sim import PluggedBoard, Rig
from tests.registrykit import DroppingProxy, bodh, wait_until
from tests.test_bad_inputs import Site, background

pytestmark = pytest.mark.timeout(300)

KEY = f"bodh-admin-{secrets.token_hex(12)}"


def thing(board: PluggedBoard) -> str:
    return board.mac.replace(":", "")  # the Site's [identity] thing_name is "{mac}"


def use_bodh(site: Site, url: str, ca: Path | None = None, **keys: object) -> None:
    site.env["BODH_API_KEY"] = KEY
    site.set("registry", "kind", "bodh").set("registry", "url", url)
    if ca is not None:
        site.set("registry", "ca_file", ca)
    for key, value in {"backoff": 0.05, **keys}.items():
        site.set("registry", key, value)


def assert_no_secrets(root: Path, *outputs: str) -> None:
    """Neither the API key nor any board's private key in a log, the ledger, an output."""
    keys = [line for pem in (root / "certs_out").glob("*/private.pem.key")
            for line in pem.read_text().splitlines() if "PRIVATE KEY" not in line]
    texts = {"output": "\n".join(outputs)}
    for path in (root / "state").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("latin-1")
    for where, text in texts.items():
        assert KEY not in text, f"the API key is in {where}"
        for line in keys:
            assert line not in text, f"a private key is in {where}"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCa:
    return LocalCa.open(tmp_path_factory.mktemp("registry-ca") / "ca")


def ca_file(tmp_path: Path, ca: LocalCa) -> Path:
    path = tmp_path / "registry-ca.crt"
    path.write_text(ca.pem)
    return path


# -- many boards, a registry that fails now and then ---------------------------------------


@pytest.mark.slow
def test_through_a_proxy_dropping_half_the_connections_nothing_is_lost_or_doubled(
        site: Site, rig: Rig) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(16)]
    with bodh(KEY) as server, DroppingProxy(server.port) as proxy:
        use_bodh(site, proxy.url, attempts=12)
        result = site.run(len(boards))
        assert result.code == 0, str(result)
    assert server.created == Counter({thing(b): 1 for b in boards}), "lost or doubled"
    assert proxy.counts["refused"] >= 2 and proxy.counts["lost"] >= 2, proxy.counts
    rows = site.ledger()
    assert sorted(r["thing_name"] for r in rows) == sorted(thing(b) for b in boards)
    assert {r["result"] for r in rows} == {"done"}, rows
    # an answer lost on the way back: the device was made, the next try heard "taken"
    outcomes = Counter(r["registry"] for r in rows)
    assert set(outcomes) <= {"registered", "already"}, outcomes
    # (each such board heard it at least once; one whose second answer was lost too, twice)
    assert 1 <= outcomes["already"] <= server.answers[422], (outcomes, server.answers)
    assert "registry registered POST " in result.stdout
    assert_no_secrets(site.root, result.stdout, result.stderr)


def test_a_wrong_key_fails_the_board_at_the_registry_naming_the_variable(
        site: Site, rig: Rig) -> None:
    board = rig.plug(chip="esp32")
    with bodh("another-key") as server:
        use_bodh(site, server.url)
        result = site.run(1)
    assert result.code == 3, str(result)
    [row] = site.ledger()
    assert (row["result"], row["failed_stage"], row["registry"]) == \
        ("failed", "registry", "failed"), row
    assert "401 Unauthorized" in row["error"] and "$BODH_API_KEY" in row["error"], row
    assert server.devices == {} and row["mac"] == thing(board)
    assert_no_secrets(site.root, result.stdout, result.stderr)


# -- a SIGKILL while the request is out ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["after the answer", "mid-request"])
def test_killed_mid_post_then_reconcile_registers_the_board_once(
        how: str, site: Site, rig: Rig) -> None:
    board = rig.plug(chip="esp32")
    with bodh(KEY) as server:
        use_bodh(site, server.url)
        if how == "after the answer":  # the registry answered; the outcome row never came
            site.env[CRASH_ENV] = "registry-posted"
            crashed = site.run(1)
            assert crashed.code == -signal.SIGKILL, crashed
            del site.env[CRASH_ENV]
        else:  # killed while the registry holds the request; it makes the device after
            server.hold = thing(board)
            with background(site, "--exit-after", "1") as station:
                assert server.held.wait(timeout=120), station.seen
                station.proc.send_signal(signal.SIGKILL)
                assert station.finish().code == -signal.SIGKILL
            server.release.set()
            wait_until("the held request's device", lambda: server.created[thing(board)] == 1)
        [row] = site.ledger()
        assert row["registry"] == "pending" and row["result"] == "in progress", row

        reconciled = site.cli("reconcile")
        assert reconciled.code == 0, reconciled
        assert f"registry: {thing(board)}: the request in flight at the stop was sent " \
               "again: already" in reconciled.stdout, reconciled
        [row] = site.ledger()
        assert (row["result"], row["registry"]) == ("failed", "already"), row

        board = replug(rig, board)
        again = site.run(1)
        assert again.code == 0, again
        assert [r["registry"] for r in site.ledger()] == ["already", "already"]
    assert server.created == {thing(board): 1}
    assert server.posts[thing(board)] == 3  # the first, reconcile's, the board's again
    assert_no_secrets(site.root, again.stdout, again.stderr, reconciled.stdout)


def replug(rig: Rig, board: PluggedBoard) -> PluggedBoard:
    rig.unplug(board)
    return rig.plug(chip=board.chip, mac=board.mac, index=board.index)


# -- over HTTPS, and what `station check` says ----------------------------------------------


def test_https_with_the_test_ca_and_check_names_the_variable_not_the_key(
        site: Site, rig: Rig, ca: LocalCa) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(2)]
    with bodh(KEY, ca, faults=["429", "500"], retry_after="1") as server:
        use_bodh(site, server.url, ca_file(site.root, ca))
        checked = site.check()
        assert checked.code == 0, checked
        assert f"registry    bodh POST {server.url}/api/devices (x-api-key from " \
               "$BODH_API_KEY)" in checked.stdout, checked
        assert server.posts == {}, "check sent a request"
        result = site.run(len(boards))
        assert result.code == 0, str(result)
    assert server.created == Counter({thing(b): 1 for b in boards})
    rows = site.ledger()
    assert {(r["registry"], r["registry_id"] == r["thing_name"]) for r in rows} == \
        {("registered", True)}, rows
    assert all("registry_http" in r["timings"] for r in rows), rows
    report = site.cli("report", "--format", "md", "--out", "-")
    assert "| device registry: registered / already had it / failed | 2 / 0 / 0 |" in \
        report.stdout, report.stdout[:2000]
    assert_no_secrets(site.root, result.stdout, result.stderr, checked.stdout)


def test_kind_http_templates_wait_for_the_certificate_and_keep_the_registrys_id(
        site: Site, rig: Rig) -> None:
    """Your own registry: the body names {certificate_id} (the request waits for the
    registrar) and {firmware_version} (the app's esp_app_desc); the answer's id is read
    at id_field."""
    board = rig.plug(chip="esp32")
    with bodh(KEY) as server:
        site.env["INVENTORY_KEY"] = KEY
        site.set("registry", "kind", "http").set("registry", "url", server.url + "/api/devices")
        site.set("registry", "body", {"device": {"id": "{thing}", "mac": "{mac}",
                                                 "certificate": "{certificate_id}",
                                                 "firmware": "{firmware_version}"}})
        site.set("registry", "id_field", "data.uuid")
        site.set("registry.headers", "x-api-key", "env:INVENTORY_KEY")
        result = site.run(1)
        assert result.code == 0, str(result)
    [row] = site.ledger()
    sent = server.bodies[thing(board)]["device"]
    assert sent == {"id": thing(board), "mac": thing(board),
                    "certificate": row["certificate_id"], "firmware": "1.0.0"}, sent
    assert row["certificate_id"] and row["registry"] == "registered"
    assert row["registry_id"] == server.devices[thing(board)]["uuid"]
