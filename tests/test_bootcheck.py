"""The boot check's judge (station/flash/bootcheck.py) against boot stories as the virtual
boards tell them for each ESP-IDF format (cpu_start: with 16 SHA digits before v5.2,
9 digits in v5.2, app_init: since v5.3), and its failure messages."""

from __future__ import annotations

import re

import pytest

from station.flash import BootCheck
from station.flash.bootcheck import app_description
from station.sim.boot_log import spi_boot
from station.sim.chips import chip_spec
from tests.sim import boot_images as bi


def told(app: bytes, table: bytes | None = None, app_line: str | None = None,
         log_colors: bool = False) -> str:
    flash = bytearray(b"\xff" * 0x200000)
    boot = bi.bootloader(log_colors)
    for offset, data in ((0x1000, boot), (0x8000, table or bi.partition_table()),
                         (0x10000, app)):
        flash[offset:offset + len(data)] = data
    return spi_boot(chip_spec("esp32"), bytes(flash), app_line=app_line)[0]


def check(app: bytes, marker: str | None = None, level: str = "app") -> BootCheck:
    return BootCheck(level=level, app_offset=0x10000, app=app_description("esp32", app),
                     marker=re.compile(marker) if marker else None, timeout=1.0)


@pytest.mark.parametrize("colors", [False, True], ids=["plain", "log-colors"])
@pytest.mark.parametrize("idf", ["v5.1.4", "v5.2.1", "v5.4.1"])
def test_every_idf_format_of_our_app_passes(idf: str, colors: bool) -> None:
    app = bi.app(project="blinky", version="2.0.1", idf=idf, log_colors=colors)
    story = told(app, app_line="SELFTEST: PASS", log_colors=colors)
    assert ("\x1b[0;32mI (" in story) is colors  # a CONFIG_LOG_COLORS=y build's lines
    judge = check(app, marker="SELFTEST: PASS")
    assert judge.complete(story)
    verdict = judge.judge(story)
    assert verdict.ok, verdict
    assert (verdict.project, verdict.version) == ("blinky", "2.0.1")
    assert "SELFTEST: PASS" in verdict.tail
    assert "\x1b" not in verdict.tail


def test_a_colored_failure_is_quoted_without_its_colour_codes() -> None:
    app = bi.app(project="blinky", version="2.0.1", log_colors=True)
    story = told(bi.app(project="blinky", version="1.9.0", log_colors=True), log_colors=True)
    verdict = check(app).judge(story)
    assert verdict.detail == "expected app version '2.0.1'; the board printed '1.9.0'"
    broken = bytearray(app)
    broken[0x400] ^= 0x01
    verdict = check(app).judge(told(bytes(broken), log_colors=True))
    assert "'E (" in verdict.detail and "\x1b" not in verdict.detail + verdict.tail, verdict


def test_another_version_on_the_board_names_both() -> None:
    ours = bi.app(project="blinky", version="2.0.1")
    verdict = check(ours).judge(told(bi.app(project="blinky", version="1.9.0")))
    assert not verdict.ok
    assert verdict.detail == "expected app version '2.0.1'; the board printed '1.9.0'"


def test_a_table_pointing_elsewhere_quotes_the_bootloader() -> None:
    app = bi.app()
    story = told(app, table=bi.partition_table(app_offset=0x20000))
    assert not check(app).complete(story)  # complete at the boot loop's next banner
    assert check(app).complete(story + story)
    verdict = check(app).judge(story)
    assert not verdict.ok
    assert verdict.detail.startswith('expected "Loaded app from partition at offset '
                                     '0x10000"; the board printed'), verdict
    assert "No bootable app partitions" in verdict.detail


def test_rom_level_needs_only_the_bootloader() -> None:
    app = bi.app()
    story = told(app, table=bi.partition_table(app_offset=0x20000))
    assert check(app, level="rom").judge(story).ok
    assert not check(app, level="rom").judge("waiting for download\r\n").ok


def test_a_boot_loop_is_judged_on_its_first_round_and_names_the_first_error() -> None:
    app = bytearray(bi.app())
    app[0x400] ^= 0x01  # a corrupt app: the bootloader gives up on it
    story = told(bytes(app))
    again = story.replace("rst:0x1 (POWERON_RESET)", "rst:0x3 (SW_RESET)")
    judge = check(bytes(app))
    # the capture stops inside the next round's banner, wherever the read ended
    for cut in ("rst:0x3 (", "rst:0x3 (SW_RESET),boot:0x13", again):
        text = story + again[:again.index(cut) + len(cut)]
        assert judge.complete(text)
        verdict = judge.judge(text)
        assert verdict.detail.startswith(
            'expected "Loaded app from partition at offset 0x10000"; the board printed '
            "'E ("), verdict
        assert "esp_image: Checksum failed. Calculated 0x" in verdict.detail, verdict
        assert verdict.detail.endswith(
            ") boot: No bootable app partitions in the partition table'"), verdict
        assert "SW_RESET" not in verdict.tail and "ets Jul" not in verdict.tail[-40:]
        assert verdict.tail.endswith("No bootable app partitions in the partition table")
