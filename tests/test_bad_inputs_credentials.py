"""The bad-input matrix, part 5: [credentials] format, ds and efuse_key_block (issue 21).

Each case runs the real `station check` in a subprocess on a station.toml and a demo build;
the station must stop at start (exit 2) with one line naming the file, the key and the fix,
before any board is touched. docs/bad-inputs.md lists the cases.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from station import chips
from station.daemon import EXIT_CONFIG
from station.demo import make_demo_firmware
from station.demo.firmware import partition_table

pytestmark = pytest.mark.timeout(120)

DS = ", ".join(chips.ds_chips())
POLICY = Path(__file__).parent.parent / "config" / "aws-iot-policy.json"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fw")
    out = {chip: make_demo_firmware(root / chip, chip=chip, app_size=0x4000, secure_cert=True)
           for chip in ("esp32", "esp32s3", "esp32c2")}
    out["plain"] = make_demo_firmware(root / "plain", chip="esp32s3", app_size=0x4000)
    small = make_demo_firmware(root / "small", chip="esp32s3", app_size=0x4000)
    (small.parent / "partition_table" / "partition-table.bin").write_bytes(partition_table(
        [("nvs", 1, 0x02, 0x9000, 0x4000), ("esp_secure_cert", 0x3F, 0, 0xD000, 0x1000),
         ("phy_init", 1, 0x01, 0xF000, 0x1000), ("factory", 0, 0, 0x10000, 0x100000)]))
    out["small"] = small
    return out


def check(tmp_path: Path, firmware: str, credentials: str, registrar: str = "local-ca"
          ) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "station.toml"
    config.write_text(f"""\
[station]
state_dir = "state"
[ports]
watch = ["{tmp_path / 'rig' / 'pci-*'}"]
{firmware}
[registrar]
kind = "{registrar}"
[registrar.local_ca]
dir = "ca"
[registrar.aws]
key_source = "aws"
policy_document = {json.dumps(str(POLICY))}
[credentials]
{credentials}
""")
    return subprocess.run([sys.executable, "-m", "station", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def one(builds: dict[str, Path], chip: str) -> str:
    return f'[firmware]\nchip = "{chip}"\nflasher_args = {json.dumps(str(builds[chip]))}\n'


def entry(builds: dict[str, Path], chip: str, own: str = "") -> str:
    more = f"credentials = {own}\n" if own else ""
    return (f'[[firmware]]\nchip = "{chip}"\nflasher_args = '
            f'{json.dumps(str(builds[chip]))}\n{more}')


def refused(result: subprocess.CompletedProcess[str], key: str, words: str) -> str:
    assert result.returncode == EXIT_CONFIG, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, before anything else happens
    assert f"station.toml: {key}: " in lines[0] or f": {key}: " in lines[0], lines[0]
    assert words in lines[0], lines[0]
    assert not (Path(result.args[-1]).parent / "state" / "ledger.sqlite3").exists()
    return lines[0]


def test_ds_on_a_chip_without_the_peripheral_names_the_chips_that_have_it(
        tmp_path: Path, builds: dict[str, Path]) -> None:
    for chip in ("esp32", "esp32c2"):
        line = refused(check(tmp_path, one(builds, chip),
                             'format = "esp_secure_cert"\nds = true'),
                       "credentials.ds", f"{chip} has no Digital Signature peripheral "
                                         f"(chips with one: {DS}): set ds = false")
        assert "esp32s3" in line and "esp32c3" in line


def test_a_mixed_line_sets_ds_per_firmware_entry(tmp_path: Path,
                                                 builds: dict[str, Path]) -> None:
    firmware = entry(builds, "esp32") + entry(builds, "esp32s3")
    refused(check(tmp_path, firmware, 'format = "esp_secure_cert"\nds = true'),
            "credentials.ds", "esp32 has no Digital Signature peripheral")
    firmware = entry(builds, "esp32", '{ format = "esp_secure_cert", ds = true }') + \
        entry(builds, "esp32s3")
    refused(check(tmp_path, firmware, 'format = "esp_secure_cert"'),
            "firmware[0].credentials.ds", "esp32 has no Digital Signature peripheral")
    # the fix the first message names: the ESP32 entry keeps a plain key
    firmware = entry(builds, "esp32", '{ format = "esp_secure_cert" }') + \
        entry(builds, "esp32s3")
    ok = check(tmp_path, firmware, 'format = "esp_secure_cert"')
    assert ok.returncode == 0, ok.stderr
    assert "credentials esp_secure_cert partition 'esp_secure_cert' at 0xd000 (8192 B) of " \
           "the esp32 firmware, TLV, private key in it" in ok.stdout


CASES = [
    ('format = "tlv"', "credentials.format",
     "must be one of nvs, esp_secure_cert, not 'tlv'"),
    ("ds = true", "credentials.ds", 'set format = "esp_secure_cert"'),
    ('format = "esp_secure_cert"\nds = true\nefuse_key_block = "BLOCK_KEY7"',
     "credentials.efuse_key_block", "'BLOCK_KEY7' is not an eFuse key block: one of "
                                    "BLOCK_KEY0, BLOCK_KEY1"),
    ('format = "esp_secure_cert"\nefuse_key_block = "BLOCK_KEY4"',
     "credentials.efuse_key_block", "used only with ds = true"),
    ('format = "esp_secure_cert"\npartition = "nvs"', "credentials.partition",
     "esp_secure_cert_mgr finds its partition by the label 'esp_secure_cert'"),
    ('format = "esp_secure_cert"\nds = true\nkeep_private_keys = true',
     "credentials.keep_private_keys", "exists only as the board's DS ciphertext"),
]


@pytest.mark.parametrize(("credentials", "key", "words"), CASES)
def test_a_credentials_mistake_is_refused_at_start(tmp_path: Path, builds: dict[str, Path],
                                                   credentials: str, key: str,
                                                   words: str) -> None:
    refused(check(tmp_path, one(builds, "esp32s3"), credentials), key, words)


def test_ds_needs_the_key_made_on_the_station(tmp_path: Path,
                                              builds: dict[str, Path]) -> None:
    refused(check(tmp_path, one(builds, "esp32s3"), 'format = "esp_secure_cert"\nds = true',
                  registrar="aws-iot"),
            "registrar.aws.key_source", 'set key_source = "csr"')


def test_a_table_without_the_partition_is_refused_naming_the_row_to_add(
        tmp_path: Path, builds: dict[str, Path]) -> None:
    firmware = f'[firmware]\nchip = "esp32s3"\nflasher_args = {json.dumps(str(builds["plain"]))}'
    line = refused(check(tmp_path, firmware, 'format = "esp_secure_cert"'),
                   "credentials.format", "no partition labelled 'esp_secure_cert' "
                                         "(partitions: nvs, phy_init, factory)")
    assert 'add the row "esp_secure_cert, 0x3F, , 0xD000, 0x2000, encrypted" to the ' \
           "build's partitions.csv" in line
    firmware = f'[firmware]\nchip = "esp32s3"\nflasher_args = {json.dumps(str(builds["small"]))}'
    refused(check(tmp_path, firmware, 'format = "esp_secure_cert"'), "credentials.format",
            "the esp_secure_cert partition is 0x1000 bytes; esp-secure-cert-tool writes "
            "0x2000: make it at least that in partitions.csv")


def test_a_key_block_used_for_another_purpose_fails_the_board_untouched(
        tmp_path: Path, builds: dict[str, Path]) -> None:
    """The one case of this file found on the board, not at start: BLOCK_KEY4 of an S3
    already holds a flash-encryption key (burned here by espefuse over the board's port,
    as a earlier line would have). The real `station run` fails the board naming the
    block and its purpose before it writes, burns or registers anything."""
    from station.config import FirmwareSection
    from station.daemon import EXIT_OK
    from station.flash import load_firmware
    from station.sim import Rig
    from tests.securekit import efuse_file, mac_of, tool
    from tests.test_secure_cert import security_steps, write_config
    from tests.test_station import Line

    config = write_config(tmp_path, {"esp32s3": builds["esp32s3"]}, name="block-line",
                          credentials='ds = true\nefuse_key_block = "BLOCK_KEY4"\n')
    bundle = load_firmware(FirmwareSection(chip="esp32s3", flasher_args=builds["esp32s3"],
                                           images=()))
    rig = Rig(tmp_path / "rig", seed=2103, throttle=False, flash_timing=False)
    try:
        board = rig.plug(chip="esp32s3", index=0)
        (tmp_path / "xts.bin").write_bytes(bytes(range(32)))
        burned = tool("espefuse", "--port", board.port, "--chip", "esp32s3",
                      "--do-not-confirm", "burn-key", "BLOCK_KEY4", str(tmp_path / "xts.bin"),
                      "XTS_AES_128_KEY")
        assert burned.returncode == 0, burned.stdout
        flash, fuses = rig.flash(board), efuse_file(rig, board).read_bytes()
        line = Line(root=tmp_path, rig=rig, config=config, bundle=bundle)
        line.start("--exit-after", "1")
        try:
            assert line.wait() != EXIT_OK, line.output()[-3000:]
        finally:
            if line.proc is not None and line.proc.poll() is None:
                line.proc.kill()
        [job] = line.jobs()
        assert (job["result"], job["failed_stage"]) == ("failed", "secure"), job
        assert job["error"] == (f"{mac_of(board)}: BLOCK_KEY4 is already used (purpose "
                                "XTS_AES_128_KEY, read-protected); set [credentials] "
                                "efuse_key_block to a free key block; untouched"), job
        assert rig.flash(board) == flash  # not a byte written
        assert efuse_file(rig, board).read_bytes() == fuses  # not a bit burned
        assert security_steps(line.state, mac_of(board)) == []
        assert not (tmp_path / "certs_out").exists() or \
            not any((tmp_path / "certs_out").iterdir())  # nothing registered
        assert job["credentials"] is None
    finally:
        rig.close()


def test_an_encrypted_line_needs_the_partition_flagged_encrypted(
        tmp_path: Path, builds: dict[str, Path]) -> None:
    """[security] flash encryption covers credentials in an esp_secure_cert partition
    flagged `encrypted` (the station writes it encrypted); NVS without the nvs_keys
    partition NVS encryption needs, or the partition without the flag, would leave the key
    in the clear: refused at start. So is a DS key
    block that the flash-encryption key, burned first, could take."""
    build = make_demo_firmware(tmp_path / "fw", chip="esp32c3", app_size=0x4000,
                               secure=True, secure_cert=True)
    firmware = (f'[firmware]\nchip = "esp32c3"\nflasher_args = {json.dumps(str(build))}\n'
                '[security]\nflash_encryption = "development"\n[verify]\nboot = "app"\n')
    refused(check(tmp_path, firmware, ""), "security.flash_encryption",
            "has no nvs_keys partition: the credentials go to NVS, which flash encryption "
            "does not cover")
    table = build.parent / "partition_table" / "partition-table.bin"
    table.write_bytes(partition_table(
        [("nvs", 1, 0x02, 0x9000, 0x4000), ("esp_secure_cert", 0x3F, 0, 0xD000, 0x2000),
         ("phy_init", 1, 0x01, 0xF000, 0x1000), ("factory", 0, 0, 0x10000, 0x100000)]))
    refused(check(tmp_path, firmware, 'format = "esp_secure_cert"'), "credentials.format",
            "esp32c3: the esp_secure_cert partition is not flagged encrypted, so flash "
            "encryption would leave it in the clear")
    refused(check(tmp_path, firmware, 'format = "esp_secure_cert"\nds = true\n'
                                      'efuse_key_block = "BLOCK_KEY0"'),
            "credentials.efuse_key_block", "esp32c3: the flash-encryption key is burned "
            "before the DS key, into the first free key block from BLOCK_KEY0 (two with "
            'AES-256), so BLOCK_KEY0 may be taken: set efuse_key_block = "BLOCK_KEY5"')
