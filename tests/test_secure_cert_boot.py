"""The boot check of an app that reads its credentials with esp_secure_cert_mgr (issue 21).

The demo build's app carries the format string of esp_secure_cert_mgr's example app
(`examples/esp_secure_cert_app/main/app_main.c`), so the virtual app tells at start what
that app tells (station/sim/secure_cert_app.py): its certificates, with DS the context and
a signature the DS peripheral made with the key in its eFuses, and last whether it read
and verified the partition. The real `station run` with `[verify] boot = "app"` must pass
the boards that got their credentials, and fail a board whose partition stayed empty,
quoting the app's own error line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from station.config import FirmwareSection
from station.daemon import EXIT_OK
from station.flash import load_firmware
from station.sim import Rig
from station.sim.pty_lines import relay_env
from tests.test_secure_cert import ds_builds, write_config, write_ds_config  # noqa: F401
from tests.test_station import Line

pytestmark = pytest.mark.timeout(300)

OK = "esp_secure_cert_app: Successfully obtained and verified the contents of " \
     "esp_secure_cert partition"
FAILED = "esp_secure_cert_app: Failed to obtain and verify the contents of the " \
         "esp_secure_cert partition"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    # reset lines on the ptys (the boot check resets the board into its app)
    rig = Rig(tmp_path / "rig", seed=2105, throttle=False, flash_timing=False,
              pty_lines=tmp_path / "pty-lines.sock")
    yield rig
    rig.close()


def run(tmp_path: Path, rig: Rig, config: Path, chips: tuple[str, ...],
        builds: dict[str, Path]) -> tuple[int, Line]:
    bundle = load_firmware(FirmwareSection(chip=chips[0], flasher_args=builds[chips[0]],
                                           images=()))
    line = Line(root=tmp_path, rig=rig, config=config, bundle=bundle)
    line.start("--exit-after", str(len(chips)), env=relay_env(tmp_path / "pty-lines.sock"))
    for i, chip in enumerate(chips):
        rig.plug(chip=chip, index=i)
    try:
        return line.wait(), line
    finally:
        if line.proc is not None and line.proc.poll() is None:
            line.proc.kill()


def test_the_app_reads_its_credentials_at_the_boot_check(
        tmp_path: Path, rig: Rig, ds_builds: dict[str, Path]) -> None:  # noqa: F811
    """DS boards (S3, C3) and an ESP32 with a plain key on one line: each app finds its
    partition, and the DS boards' apps sign with the HMAC key the station burned."""
    config = write_ds_config(tmp_path, ds_builds, '[verify]\nboot = "app"\n')
    code, line = run(tmp_path, rig, config, ("esp32s3", "esp32c3", "esp32"), ds_builds)
    assert code == EXIT_OK, line.output()[-3000:]
    for job in line.jobs():
        assert (job["result"], job["boot"]) == ("done", "ok"), job
        assert OK in job["boot_log"], job["boot_log"]
        if job["chip"] == "esp32":
            assert "Ciphertext validated" not in job["boot_log"]
        else:
            assert "esp_secure_cert_app: Ciphertext validated succcessfully" in \
                job["boot_log"], job["boot_log"]
    assert "PRIVATE KEY" not in line.output()


def test_an_app_without_its_credentials_fails_the_boot_check(
        tmp_path: Path, rig: Rig, ds_builds: dict[str, Path]) -> None:  # noqa: F811
    """A line that writes no credentials ([registrar] kind = "none") under an app that
    reads them: the partition stays erased, the app says so, the boot check fails."""
    config = write_config(tmp_path, {"esp32c3": ds_builds["esp32c3"]}, name="no-creds",
                          registrar='[registrar]\nkind = "none"\n',
                          credentials='[verify]\nboot = "app"\n')
    code, line = run(tmp_path, rig, config, ("esp32c3",), ds_builds)
    assert code != EXIT_OK, line.output()[-3000:]
    [job] = line.jobs()
    assert (job["result"], job["failed_stage"], job["boot"]) == ("failed", "boot",
                                                                "failed"), job
    assert "boot check: expected the app to read its esp_secure_cert partition" in \
        job["error"], job["error"]
    assert FAILED in job["error"], job["error"]
    assert "esp_secure_cert_app: Failed to obtain flash address of device cert" in \
        job["boot_log"], job["boot_log"]
