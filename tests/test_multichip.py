"""One station, firmware for several chips (`[[firmware]]`), a mixed rig (issue #9).

The real `station run` on 16 virtual boards of 8 different ESP32-family chips plus one
board of a chip the station has no firmware for. Every board must end with its own
chip's images at that chip's bootloader offset (0x1000, 0x2000 or 0x0, from esptool's
target classes), and the odd board must fail naming the chips the station has, with
its flash untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from station import chips
from station.config import FirmwareSection
from station.daemon import EXIT_BOARDS_FAILED
from station.demo import make_demo_firmware
from station.flash import FirmwareBundle, load_firmware
from station.identity import read_nvs
from station.sim import Rig
from tests.test_station import Line

pytestmark = pytest.mark.timeout(300)

CHIPS = ("esp32", "esp32s2", "esp32s3", "esp32c3", "esp32c6", "esp32c5", "esp32h2", "esp32p4")
NO_FIRMWARE = "esp32c2"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fw")
    return {chip: make_demo_firmware(root / chip, chip=chip, app_size=0x4000, seed=i)
            for i, chip in enumerate(CHIPS)}


def write_config(root: Path, builds: dict[str, Path], name: str = "mixed-line",
                 ports: str = "", thing: str = "t-{mac}", more: str = "") -> Path:
    """A station.toml for a rig in root/rig with one [[firmware]] entry per chip built;
    `ports`: more [ports] lines; `more`: more tables at the end."""
    entries = "".join(f'[[firmware]]\nchip = "{chip}"\nflasher_args = {json.dumps(str(p))}\n\n'
                      for chip, p in builds.items())
    config = root / "station.toml"
    config.write_text(f"""\
[station]
name = "{name}"
state_dir = "state"
[ports]
watch = ["{root / 'rig' / 'pci-*'}"]
rescan_interval = 0.2
{ports}{entries}[identity]
thing_name = "{thing}"
[registrar]
kind = "local-ca"
[registrar.local_ca]
dir = "ca"
[credentials]
out_dir = "certs_out"
{more}""")
    return config


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "rig", seed=91, throttle=False, flash_timing=False)
    yield rig
    rig.close()


def test_a_mixed_rig_gets_each_chip_its_own_firmware(tmp_path: Path, rig: Rig,
                                                     builds: dict[str, Path]) -> None:
    config = write_config(tmp_path, builds)
    bundles: dict[str, FirmwareBundle] = {
        chip: load_firmware(FirmwareSection(chip=chip, flasher_args=p, images=()))
        for chip, p in builds.items()}
    line = Line(root=tmp_path, rig=rig, config=config, bundle=bundles["esp32"])
    line.start("--exit-after", "17")
    boards = [rig.plug(chip=CHIPS[i % len(CHIPS)], index=i) for i in range(16)]
    odd = rig.plug(chip=NO_FIRMWARE, index=16)
    assert line.finish() == EXIT_BOARDS_FAILED, line.output()[-3000:]
    jobs = {j["mac"]: j for j in line.jobs()}
    assert len(jobs) == 17
    for board in boards:
        job = jobs[board.mac.replace(":", "")]
        assert (job["result"], job["chip"]) == ("done", board.chip), job
        bundle = bundles[board.chip]
        assert job["firmware_hash"] == bundle.sha256  # picked by chip, as the ledger says
        flash = rig.flash(board)
        boot = bundle.regions[0]
        assert boot.name == "bootloader"
        assert boot.offset == chips.facts(board.chip).bootloader_offset
        for region in bundle.regions:
            assert flash[region.offset:region.end] == region.data, (board.chip, region.name)
        part = bundle.partition("nvs")
        nvs = read_nvs(flash[part.offset:part.offset + part.size])["station"]
        assert nvs["thing_name"] == job["thing_name"]
    (job,) = [j for j in jobs.values() if j["result"] != "done"]
    assert job["mac"] == odd.mac.replace(":", ""), job
    assert (job["result"], job["failed_stage"]) == ("failed", "identify"), job
    assert job["error"] == (f"board is an {NO_FIRMWARE} but this station has firmware only "
                            f"for {', '.join(CHIPS)}; plug a matching board or add a "
                            f"[[firmware]] entry for {NO_FIRMWARE}")
    assert rig.flash(odd) == b"\xff" * len(rig.flash(odd))  # nothing written
    assert not (tmp_path / "certs_out" / job["thing_name"]).exists()  # nor registered


def test_station_check_names_every_firmware_and_its_credentials_partition(
        tmp_path: Path, builds: dict[str, Path]) -> None:
    config = write_config(tmp_path, builds)
    run = subprocess.run([sys.executable, "-m", "station", "check", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    firmware = [line for line in lines if line.startswith("firmware ")]
    assert [line.split()[1] for line in firmware] == list(CHIPS)
    for chip in CHIPS:
        offset = chips.facts(chip).bootloader_offset
        assert any(f"0x{offset:06x} bootloader" in line for line in lines), chip
        assert any(f"of the {chip} firmware" in line for line in lines), chip
    assert f"would flash {', '.join(CHIPS)} boards" in run.stdout
