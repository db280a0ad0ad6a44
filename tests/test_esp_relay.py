"""The station against esptool's own `esp_rfc2217_server` (issue 10).

A line that puts its hubs on small hosts runs esptool's relay there, one process per
port: it swallows the client's DTR/RTS changes and runs esptool's reset sequences on the
hub host, with their own timing. Here each virtual board's pty is served by the real
relay, unchanged, in its own process; the rig gives the ptys the modem lines a bridge's
driver has (`station.sim.pty_lines`), so the relay's resets reach each board's
auto-reset circuit and the boot check runs as on the rig's own RFC 2217 faces.

The boards have Espressif's recommended 1 uF on EN: the relay's tight reset holds GPIO0
low for 50 ms after EN is released (docs/virtual-boards.md, "Relays").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from station.daemon import EXIT_BOARDS_FAILED, EXIT_OK
from station.sim import PluggedBoard, Rig
from tests.remotekit import EspRelay, point_the_table_elsewhere, sixteen_boot_and_stay_done
from tests.test_bad_inputs import Background, Site, done_after_buttons

pytestmark = pytest.mark.timeout(240)

EN_CAP_UF = 1.0


@dataclass
class Relayed:
    """A board and the esp_rfc2217_server serving it."""

    board: PluggedBoard
    relay: EspRelay

    @property
    def url(self) -> str:
        return self.relay.url


class RelayedRig:
    """A rig whose boards are each served by their own esp_rfc2217_server."""

    def __init__(self, site: Site, seed: int, throttle: bool = True,
                 flash_timing: bool = True) -> None:
        self.lines = site.root / "pty-lines.sock"
        self.rig = Rig(site.hub, seed=seed, throttle=throttle, flash_timing=flash_timing,
                       pty_lines=self.lines)
        self.served: list[Relayed] = []
        self.site = site

    def plug(self, *relay_options: str, en_cap_uf: float = EN_CAP_UF,
             app_line: str | None = None, reset_circuit: str = "auto") -> Relayed:
        board = self.rig.plug(chip="esp32", en_cap_uf=en_cap_uf, app_line=app_line,
                              reset_circuit=reset_circuit)
        served = Relayed(board, EspRelay(board.pty, self.lines, *relay_options))
        self.served.append(served)
        return served

    def serve(self) -> None:
        """Point the station at the relays only."""
        self.site.set("ports", "watch", [str(self.site.hub / "none-*")])
        self.site.set("ports", "remote", [s.url for s in self.served])

    def close(self) -> None:
        for served in self.served:
            served.relay.close()
        self.rig.close()


@pytest.fixture
def relayed(site: Site) -> Iterator[RelayedRig]:
    rig = RelayedRig(site, seed=21, throttle=False, flash_timing=False)
    try:
        yield rig
    finally:
        rig.close()


def test_a_board_behind_esptools_relay_boots_what_it_was_given(site: Site,
                                                                relayed: RelayedRig) -> None:
    relay = relayed.plug(app_line="SELFTEST: PASS")
    relayed.serve()
    site.set("verify", "boot", "app").set("verify", "marker", "SELFTEST: PASS")
    result = site.run(1)
    assert result.code == EXIT_OK, (result, relay.relay.output)
    row = site.rows_by_port()[relay.url]
    assert (row["result"], row["boot"]) == ("done", "ok"), row
    assert (row["booted_project"], row["booted_version"]) == ("station-demo-esp32", "1.0.0")



def test_a_missing_self_test_marker_fails_that_board_only_behind_the_relay(
        site: Site, relayed: RelayedRig) -> None:
    good = relayed.plug(app_line="SELFTEST: PASS")
    silent = relayed.plug(app_line="SELFTEST: FAIL (adc out of range)")
    relayed.serve()
    site.set("verify", "boot", "app").set("verify", "marker", "SELFTEST: PASS")
    site.set("verify", "boot_timeout", 3.0)  # the failing board waits for it in vain
    result = site.run(2)
    assert result.code == EXIT_BOARDS_FAILED, str(result)
    rows = site.rows_by_port()
    assert (rows[good.url]["result"], rows[good.url]["boot"]) == ("done", "ok"), rows
    row = rows[silent.url]
    assert (row["result"], row["failed_stage"], row["boot"]) == ("failed", "boot", "failed")
    assert "SELFTEST: FAIL (adc out of range)" in row["error"], row


def test_a_partition_table_pointing_elsewhere_fails_the_boot_check_behind_the_relay(
        site: Site, relayed: RelayedRig) -> None:
    point_the_table_elsewhere(site)
    relay = relayed.plug()
    relayed.serve()
    site.set("verify", "boot", "app").set("verify", "boot_timeout", 3.0)
    result = site.run(1)
    assert result.code == EXIT_BOARDS_FAILED, str(result)
    row = site.rows_by_port()[relay.url]
    assert (row["result"], row["failed_stage"], row["boot"]) == ("failed", "boot", "failed")
    assert "verify" in row["timings"], row  # the MD5s matched: the flash is as written
    assert "No bootable app partitions in the partition table" in row["error"], row


def test_a_board_without_auto_reset_behind_the_relay_finishes_once_pressed(
        site: Site, relayed: RelayedRig) -> None:
    relay = relayed.plug(reset_circuit="none")
    relayed.serve()
    site.set("ports", "buttons_timeout", 60)
    result = done_after_buttons(site, relay.url,
                                lambda: relayed.rig.press_boot_en(relay.board))
    assert result.code == EXIT_OK, str(result)
    assert site.rows_by_port()[relay.url]["result"] == "done"


def test_a_relay_killed_mid_flash_ends_that_board_removed_only(site: Site) -> None:
    # real line rate and flash timing: the flash lasts long enough to be cut
    relayed = RelayedRig(site, seed=22)
    try:
        dropped, kept = relayed.plug(), relayed.plug()
        relayed.serve()
        site.set("ports", "slots", {f'"{dropped.url}"': "H1", f'"{kept.url}"': "H2"})
        station = Background(site)
        try:
            station.wait_line(" H1 ", " flash bootloader 0/", timeout=60)
            dropped.relay.close()  # the hub host's relay goes away
            removed = station.wait_line(" H1 ", " removed during ", timeout=60)
            station.wait_line(" H2 ", " done in ", timeout=90)
        finally:
            result = station.stop()
    finally:
        relayed.close()
    assert result.code == EXIT_OK, str(result)
    assert "removed during flash" in removed, result
    rows = site.rows_by_port()
    assert rows[dropped.url]["result"] == "removed", rows
    assert rows[kept.url]["result"] == "done", rows


@pytest.mark.parallel
def test_sixteen_boards_behind_esptools_relay_boot_the_app_and_stay_done(
        site: Site, relayed: RelayedRig) -> None:
    served = [relayed.plug(app_line="SELFTEST: PASS") for _ in range(16)]
    sixteen_boot_and_stay_done(site, relayed.rig, [s.board for s in served],
                               [s.url for s in served])


def test_station_check_finds_esptools_relay_serving(site: Site, relayed: RelayedRig) -> None:
    relay = relayed.plug()
    relayed.serve()
    result = site.check()
    assert result.code == EXIT_OK, str(result)
    assert f"{relay.url}: ok (RFC 2217 in " in result.stdout, result
