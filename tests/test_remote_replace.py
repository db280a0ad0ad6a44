"""A hub port whose board failed at connect is still watched (issue 10).

esptool closes the port after a failed connect, so no connection to a failed remote
board is left for the far end to close: the station must watch the URL itself, or the
operator's replacement board at the same hub port is never taken. Real `station run`,
real esptool, virtual boards on their RFC 2217 faces.
"""

from __future__ import annotations

import time

import pytest

from station.daemon import EXIT_OK
from station.sim import Faults, Rig
from tests.test_bad_inputs import Background, Site

pytestmark = pytest.mark.timeout(180)


def until(station: Background, *needles: str, timeout: float) -> str:
    """The next line with every needle, within `timeout` overall (wait_line's own timeout
    is per line, and a looping station never stops printing)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line with {needles} in {timeout:g}s: {station.seen}")
        line = station.wait_line(timeout=left)
        if all(n in line for n in needles):
            return line


def test_boards_that_failed_at_connect_are_replaced_and_the_new_ones_are_done(
        site: Site) -> None:
    with Rig(site.hub, seed=51, throttle=False, flash_timing=False, rfc2217_base=0) as rig:
        # one never answers a SYNC; one has no auto-reset circuit and nobody presses
        # BOOT + EN for it: both fail at connect, and esptool closes their ports
        mute = rig.plug(chip="esp32", faults=Faults(mute=True))
        manual = rig.plug(chip="esp32", reset_circuit="none")
        urls = [mute.rfc2217, manual.rfc2217]
        assert None not in urls
        site.set("ports", "watch", [str(site.hub / "none-*")])
        site.set("ports", "remote", urls)
        site.set("ports", "slots", {f'"{urls[0]}"': "H1", f'"{urls[1]}"': "H2"})
        site.set("ports", "buttons_timeout", 1.0)
        site.set("worker", "retries", 0)
        station = Background(site)
        try:
            failed = {line.split()[1]: line for line in
                      (until(station, " failed at connect", timeout=60) for _ in urls)}
            fresh = []
            for board in (mute, manual):  # the operator swaps each at the hub host
                unplugged = time.monotonic()
                rig.unplug(board)
                until(station, f"hub {board.rfc2217}: probing (connection closed)",
                      timeout=30)
                seen = time.monotonic() - unplugged
                assert board.rfc2217 is not None
                fresh.append(rig.plug(chip="esp32",
                                      rfc2217_port=int(board.rfc2217.rsplit(":", 1)[1])))
                print(f"{board.rfc2217}: the unplug seen in {seen:.2f} s")
            plugged = time.monotonic()
            done = {until(station, " done in ", timeout=60).split()[1] for _ in fresh}
            print(f"both replacements done {time.monotonic() - plugged:.2f} s after the last plug")
        finally:
            result = station.stop()
    assert result.code == EXIT_OK, str(result)
    assert done == {"H1", "H2"}, result
    assert "no answer from an ESP bootloader" in failed["H1"], failed
    assert "nobody pressed BOOT + EN within 1 s" in failed["H2"], failed
    assert [b.rfc2217 for b in fresh] == urls
    jobs = sorted(site.ledger(), key=lambda j: (urls.index(j["port"]), j["started"]))
    assert [(j["port"], j["mac"], j["result"], j["failed_stage"]) for j in jobs] == [
        (urls[0], None, "failed", "connect"),  # the failed board's record is kept
        (urls[0], fresh[0].mac.replace(":", ""), "done", None),
        (urls[1], None, "failed", "connect"),
        (urls[1], fresh[1].mac.replace(":", ""), "done", None)], jobs
