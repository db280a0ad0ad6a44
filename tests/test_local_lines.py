"""Local USB-UART bridges with reset lines: the boot check and BOOT + EN on the station's
own ports (issue 10).

A pty has no DTR/RTS; a bridge's driver has. The station runs unchanged, started with
the rig's pty lines (`station.sim.pty_lines.relay_env`), so the modem-line ioctls its
esptool makes on a local port reach each board's auto-reset circuit: esptool's
UnixTightReset on a local port, then the boot story at 115200 on the same port.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from station.daemon import EXIT_BOARDS_FAILED, EXIT_OK
from station.sim import Rig
from station.sim.pty_lines import relay_env
from tests.test_bad_inputs import Firmware, Site, done_after_buttons

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def site(tmp_path: Path, firmware: Firmware) -> Site:
    site = Site(tmp_path, firmware)
    site.env = relay_env(site.root / "pty-lines.sock", site.env)
    return site


def wired_rig(site: Site, seed: int) -> Rig:
    return Rig(site.hub, seed=seed, throttle=False, flash_timing=False,
               pty_lines=site.root / "pty-lines.sock")


def test_local_bridges_reset_by_their_lines_boot_what_they_were_given(site: Site) -> None:
    with wired_rig(site, seed=31) as rig:
        # 1 uF wakes inside esptool's 50 ms GPIO0 hold; 10 uF needs its second attempt's
        # 0.55 s (esptool alternates the two delays on local ports)
        boards = [rig.plug(chip="esp32", en_cap_uf=cap, app_line="SELFTEST: PASS")
                  for cap in (1.0, 1.0, 10.0, 10.0)]
        site.set("verify", "boot", "app").set("verify", "marker", "SELFTEST: PASS")
        result = site.run(len(boards))
        modes = [rig.boot_modes(b) for b in boards]
    assert result.code == EXIT_OK, str(result)
    rows = site.rows_by_port()
    for board, latched in zip(boards, modes, strict=True):
        row = rows[board.port]
        assert (row["result"], row["boot"], row["booted_project"], row["booted_version"]) \
            == ("done", "ok", "station-demo-esp32", "1.0.0"), row
        # power-on, esptool's resets until download mode, the hard reset into the app
        assert "download" in latched and latched[-1] == "flash", latched
    assert modes[0].count("flash") < modes[2].count("flash"), modes  # the slow EN's miss


def test_a_local_board_without_auto_reset_fails_at_connect_by_default(site: Site) -> None:
    with wired_rig(site, seed=32) as rig:
        board = rig.plug(chip="esp32", reset_circuit="none")
        result = site.run(1)
    assert result.code == EXIT_BOARDS_FAILED, str(result)
    row = site.rows_by_port()[board.port]
    assert (row["result"], row["failed_stage"]) == ("failed", "connect"), row
    assert "press BOOT + EN" not in result.stdout, result


def test_a_line_of_boards_without_auto_reset_asks_for_buttons_on_local_ports(
        site: Site) -> None:
    with wired_rig(site, seed=33) as rig:
        board = rig.plug(chip="esp32", reset_circuit="none", en_cap_uf=1.0)
        site.set("ports", "ask_buttons", "all").set("ports", "buttons_timeout", 60)
        result = done_after_buttons(site, board.port, lambda: rig.press_boot_en(board))
    assert result.code == EXIT_OK, str(result)
    assert site.rows_by_port()[board.port]["result"] == "done"
