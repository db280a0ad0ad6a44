"""Remote ports (issue 10): boards on hub hosts, reached over RFC 2217.

The real `station` command in a subprocess, real esptool, virtual boards. A hub host
that cannot be reached must show (dashboard line, `station ports`) and never hold up the
local ports.
"""

from __future__ import annotations

import socket

import pytest

from station.daemon import EXIT_BOARDS_FAILED, EXIT_OK
from station.sim import Rig
from tests.remotekit import Relay, point_the_table_elsewhere, sixteen_boot_and_stay_done
from tests.test_bad_inputs import Background, Site, done_after_buttons

pytestmark = pytest.mark.timeout(180)


def closed_url() -> str:
    """An rfc2217:// URL on which nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"rfc2217://127.0.0.1:{port}"


def test_an_unreachable_hub_host_shows_and_local_ports_keep_flashing(site: Site,
                                                                       rig: Rig) -> None:
    dead = closed_url()
    site.set("ports", "remote", [dead])
    ports = site.cli("ports")
    assert ports.code == EXIT_OK, ports
    assert f"{dead}  (hub host unreachable: 127.0.0.1:" in ports.stdout, ports
    boards = [rig.plug(chip="esp32") for _ in range(2)]
    result = site.run(len(boards))
    assert result.code == EXIT_OK, str(result)
    assert f"hub {dead}: down (127.0.0.1:" in result.stdout, result
    rows = site.rows_by_port()
    assert sorted(rows) == sorted(b.port for b in boards), rows
    assert {row["result"] for row in rows.values()} == {"done"}, rows


def test_boards_over_rfc2217_are_done_and_their_connections_stay_open(site: Site,
                                                                       rig: Rig) -> None:
    boards = [rig.plug(chip="esp32") for _ in range(2)]
    relays = [Relay(b.pty) for b in boards]
    try:
        site.set("ports", "watch", [str(site.hub / "none-*")])
        site.set("ports", "remote", [r.url for r in relays])
        site.set("ports", "slots", {f'"{relays[0].url}"': "H1", f'"{relays[1].url}"': "H2"})
        station = Background(site)
        try:
            done = {station.wait_line(" done in ", timeout=60).split()[1] for _ in boards}
            # the station holds each connection after its job: the relay still serves it
            held = [bool(r._clients) for r in relays]
        finally:
            result = station.stop()
        assert result.code == EXIT_OK, str(result)
        assert done == {"H1", "H2"}, result
        assert held == [True, True], result
        rows = site.rows_by_port()
        assert sorted(rows) == sorted(r.url for r in relays), rows
        assert {row["result"] for row in rows.values()} == {"done"}, rows
        # one presence probe, one connection for the job, held since: never reopened
        assert [r.connections for r in relays] == [2, 2]
    finally:
        for relay in relays:
            relay.close()


def test_a_hub_host_dropping_mid_flash_ends_that_board_removed_only(site: Site) -> None:
    # real line rate and flash timing: the flash lasts long enough to be cut
    with Rig(site.hub, seed=12) as rig:
        boards = [rig.plug(chip="esp32") for _ in range(2)]
        relays = [Relay(b.pty) for b in boards]
        try:
            site.set("ports", "watch", [str(site.hub / "none-*")])
            site.set("ports", "remote", [r.url for r in relays])
            site.set("ports", "slots", {f'"{relays[0].url}"': "H1",
                                        f'"{relays[1].url}"': "H2"})
            station = Background(site)
            try:
                station.wait_line(" H1 ", " flash bootloader 0/", timeout=60)
                relays[0].close()  # the hub host goes away
                removed = station.wait_line(" H1 ", " removed during ", timeout=60)
                station.wait_line(" H2 ", " done in ", timeout=60)
            finally:
                result = station.stop()
        finally:
            for relay in relays:
                relay.close()
    assert result.code == EXIT_OK, str(result)
    assert "removed during flash" in removed, result
    rows = site.rows_by_port()
    assert rows[relays[0].url]["result"] == "removed", rows
    assert rows[relays[1].url]["result"] == "done", rows
    assert f"hub {relays[0].url}: down" in result.stdout, result  # and seen as down since


def test_boards_over_rfc2217_boot_what_they_were_given_and_a_missing_marker_fails(
        site: Site) -> None:
    with Rig(site.hub, seed=13, throttle=False, flash_timing=False, rfc2217_base=0) as rig:
        good = [rig.plug(chip="esp32", app_line="SELFTEST: PASS") for _ in range(2)]
        bad = rig.plug(chip="esp32", app_line="SELFTEST: FAIL (adc out of range)")
        boards = [*good, bad]
        urls = [b.rfc2217 for b in boards]
        site.set("ports", "watch", [str(site.hub / "none-*")])
        site.set("ports", "remote", urls)
        site.set("verify", "boot", "app").set("verify", "marker", "SELFTEST: PASS")
        site.set("verify", "boot_timeout", 3.0)  # the failing board waits for it in vain
        result = site.run(len(boards))
    assert result.code == EXIT_BOARDS_FAILED, str(result)
    rows = site.rows_by_port()
    for board in good:
        row = rows[board.rfc2217]
        assert (row["result"], row["boot"]) == ("done", "ok"), row
        assert (row["booted_project"], row["booted_version"]) == ("station-demo-esp32",
                                                                  "1.0.0"), row
        assert "app_init: ELF file SHA256:" in row["boot_log"], row
    row = rows[bad.rfc2217]
    assert (row["result"], row["failed_stage"], row["boot"]) == ("failed", "boot", "failed")
    assert "expected the marker /SELFTEST: PASS/" in row["error"], row
    assert "SELFTEST: FAIL (adc out of range)" in row["error"], row
    assert "SELFTEST: FAIL (adc out of range)" in row["boot_log"], row


def test_a_partition_table_pointing_elsewhere_verifies_then_fails_the_boot_check(
        site: Site) -> None:
    point_the_table_elsewhere(site)
    with Rig(site.hub, seed=14, throttle=False, flash_timing=False, rfc2217_base=0) as rig:
        board = rig.plug(chip="esp32")
        site.set("ports", "watch", [str(site.hub / "none-*")])
        site.set("ports", "remote", [board.rfc2217])
        site.set("verify", "boot", "app").set("verify", "boot_timeout", 3.0)
        result = site.run(1)
    assert result.code == EXIT_BOARDS_FAILED, str(result)
    row = site.rows_by_port()[board.rfc2217]
    assert (row["result"], row["failed_stage"], row["boot"]) == ("failed", "boot", "failed")
    assert "verify" in row["timings"], row  # the MD5s matched: the flash is as written
    assert 'expected "Loaded app from partition at offset 0x20000"' in row["error"], row
    # the board's own words, quoted: its bootloader found nothing at our table's app offset
    assert "No bootable app partitions in the partition table" in row["error"], row
    assert "image at 0x20000 has invalid magic byte" in row["boot_log"], row


def test_a_board_without_auto_reset_asks_for_boot_en_and_finishes_once_pressed(
        site: Site) -> None:
    with Rig(site.hub, seed=15, throttle=False, flash_timing=False, rfc2217_base=0) as rig:
        board = rig.plug(chip="esp32", reset_circuit="none")
        site.set("ports", "watch", [str(site.hub / "none-*")])
        site.set("ports", "remote", [board.rfc2217])
        site.set("ports", "buttons_timeout", 60)
        assert board.rfc2217 is not None
        result = done_after_buttons(site, board.rfc2217, lambda: rig.press_boot_en(board))
    assert result.code == EXIT_OK, str(result)
    assert site.rows_by_port()[board.rfc2217]["result"] == "done"


@pytest.mark.parallel
def test_sixteen_boards_over_rfc2217_boot_the_app_and_stay_done(site: Site) -> None:
    with Rig(site.hub, seed=16, throttle=False, flash_timing=False, rfc2217_base=0) as rig:
        boards = [rig.plug(chip="esp32", app_line="SELFTEST: PASS") for _ in range(16)]
        sixteen_boot_and_stay_done(site, rig, boards, [str(b.rfc2217) for b in boards])
