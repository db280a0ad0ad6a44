"""Virtual eFuses: the real espefuse (CLI and library) burns and reads virtual boards.

Every board's eFuse window is espefuse's own ``EmulateEfuseController`` for its chip;
these tests drive espefuse over the board's pty and check what a user would check:
the summary, a burned key read back protected, refusals in espefuse's own words, and
the eFuses surviving a replug and being readable with ``espefuse --virt``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from station.sim import CHIP_NAMES, Rig
from station.sim.efuse import EfuseArray, efuse_path

from .conftest import esptool
from .efusekit import espefuse, espsecure, summary, virt_summary
from .test_cli import read_events, sim_process

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _identity(port: str) -> tuple[str, str]:
    """(revision, MAC) as esptool prints them."""
    out = esptool(port, "chip-id").output
    rev = re.search(r"Chip type:.*\(revision (v\d+\.\d+)\)", out)
    mac = re.search(r"BASE MAC:\s+([0-9a-f:]{17})", out) or re.search(
        r"MAC:\s+([0-9a-f:]{17})\n", out)
    assert rev and mac, out
    return rev.group(1), mac.group(1)


@pytest.mark.parametrize(("chip", "revision"), [
    ("esp32", None), ("esp32", "v1.0"), ("esp32s3", None), ("esp32c3", None),
    ("esp32c6", None),
])
def test_summary_agrees_with_esptool(fast_rig: Rig, tmp_path: Path, chip: str,
                                     revision: str | None) -> None:
    """espefuse reads the MAC and revision esptool reports: one eFuse block, one truth."""
    board = fast_rig.plug(chip=chip, revision=revision)
    efuses = summary(board.port, tmp_path / "summary.json")
    rev, mac = _identity(board.port)
    assert rev == (revision or rev)
    wafer = f"v{efuses['WAFER_VERSION_MAJOR']['value']}.{efuses['WAFER_VERSION_MINOR']['value']}"
    assert wafer == rev
    assert efuses["MAC"]["value"].split()[0] == mac == board.mac
    assert "OK" in efuses["MAC"]["value"]  # "(OK)"; ESP32: "(CRC 0x.. OK)"


@pytest.mark.parametrize("chip", CHIP_NAMES)
def test_every_chip_burns_over_its_port_into_its_efuse_file(tmp_path: Path, chip: str) -> None:
    """Each chip the sim offers (esptool has an emulator for all of them): espefuse
    reads and burns it over its pty, and ``espefuse --virt --path-efuse-file`` reads
    the board's file after the run."""
    key = tmp_path / "key.bin"
    key.write_bytes(os.urandom(32))
    block = "BLOCK1" if chip == "esp32" else "BLOCK_KEY0"
    with Rig(tmp_path / "hub", seed=3, throttle=False, flash_timing=False) as rig:
        board = rig.plug(chip=chip)
        assert summary(board.port, tmp_path / "pty.json")["MAC"]["value"].split()[0] \
            == board.mac
        if chip == "esp32":
            burn = espefuse(board.port, "burn-key", "flash_encryption", str(key),
                            "--no-protect-key")
        else:
            burn = espefuse(board.port, "burn-key", block, str(key), "USER",
                            "--no-read-protect")
        assert burn.returncode == 0, burn.output
    path = efuse_path(tmp_path / "hub", bytes.fromhex(board.mac.replace(":", "")))
    efuses = virt_summary(chip, path, tmp_path / "virt.json")
    assert efuses["MAC"]["value"].split()[0] == board.mac
    stored = bytes.fromhex(efuses[block]["value"].replace(" ", ""))
    assert stored in (key.read_bytes(), key.read_bytes()[::-1])  # ESP32: reversed


def test_bits_only_go_from_0_to_1() -> None:
    """What the controller does when asked to program a 0 over a 1 (espefuse refuses
    first: "New value contains some bits that cannot be cleared"): the bit stays."""
    efuses = EfuseArray("esp32c3")
    regs = efuses.ctrl.REGS
    block0 = efuses.ctrl.Blocks.get(efuses.ctrl.Blocks.BLOCKS[0])
    for pattern in (0b01 << 8, 0b10 << 8):
        efuses.write(block0.wr_addr + 4, pattern)
        efuses.write(regs.EFUSE_CONF_REG, regs.EFUSE_WRITE_OP_CODE)
        efuses.write(regs.EFUSE_CMD_REG, regs.EFUSE_PGM_CMD)
        efuses.busy_until = 0.0  # (the programming time is test_efuse_timing's)
    assert efuses.read(block0.rd_addr + 4) >> 8 & 0b11 == 0b11


def test_burned_key_reads_back_protected_and_a_second_key_is_refused(
        fast_rig: Rig, tmp_path: Path) -> None:
    board = fast_rig.plug(chip="esp32s3")
    key, other = tmp_path / "key.bin", tmp_path / "other.bin"
    key.write_bytes(os.urandom(32))
    other.write_bytes(os.urandom(32))
    burn = espefuse(board.port, "burn-key", "BLOCK_KEY0", str(key), "XTS_AES_128_KEY")
    assert burn.returncode == 0, burn.output
    assert "Disabling read to key block" in burn.output
    efuses = summary(board.port, tmp_path / "after.json")
    assert efuses["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
    assert efuses["BLOCK_KEY0"]["readable"] is False
    assert set(efuses["BLOCK_KEY0"]["value"].replace(" ", "")) <= {"0", "?", "-", "/"}
    # the silicon keeps the key: the bits the crypto block sees are the key file's
    assert fast_rig.board(board).efuses.block_bytes(4) == key.read_bytes()[::-1]

    again = espefuse(board.port, "burn-key", "BLOCK_KEY0", str(other), "XTS_AES_128_KEY")
    assert again.returncode == 2
    assert "BLOCK_KEY0 is read-protected" in again.output
    forced = espefuse(board.port, "burn-key", "BLOCK_KEY0", str(other), "XTS_AES_128_KEY",
                      "--force-write-always")
    assert fast_rig.board(board).efuses.block_bytes(4) == key.read_bytes()[::-1], forced.output


def test_rs_block_refuses_different_data(fast_rig: Rig, tmp_path: Path) -> None:
    board = fast_rig.plug(chip="esp32c3")
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(bytes(range(32)))
    second.write_bytes(bytes(range(1, 33)))
    assert espefuse(board.port, "burn-block-data", "BLOCK_USR_DATA",
                    str(first)).returncode == 0
    same = espefuse(board.port, "burn-block-data", "BLOCK_USR_DATA", str(first))
    assert same.returncode == 0 and "already written the same value" in same.output
    different = espefuse(board.port, "burn-block-data", "BLOCK_USR_DATA", str(second))
    assert different.returncode == 2
    assert "Burn into BLOCK_USR_DATA is forbidden (RS coding scheme does not allow this)" \
        in different.output


def test_protect_commands_and_batch_mode(fast_rig: Rig, tmp_path: Path) -> None:
    """Chained burn commands run as one batch; WR_DIS then stops a later burn."""
    board = fast_rig.plug(chip="esp32c6")
    digest = tmp_path / "digest.bin"
    digest.write_bytes(os.urandom(32))
    batch = espefuse(board.port, "burn-efuse", "DIS_USB_JTAG", "1",
                     "burn-key", "BLOCK_KEY1", str(digest), "HMAC_UP",
                     "burn-key", "BLOCK_KEY3", str(digest), "HMAC_DOWN_ALL",
                     "--no-read-protect")
    assert batch.returncode == 0, batch.output
    assert "Batch mode is enabled" in batch.output
    assert summary(board.port, tmp_path / "b.json")["BLOCK_KEY3"]["readable"] is True
    protect = espefuse(board.port, "read-protect-efuse", "BLOCK_KEY3")
    assert protect.returncode == 0, protect.output
    efuses = summary(board.port, tmp_path / "s.json")
    assert efuses["DIS_USB_JTAG"]["value"] is True
    assert efuses["BLOCK_KEY3"]["readable"] is False
    assert efuses["KEY_PURPOSE_1"]["value"] == "HMAC_UP"
    # (espefuse 5.6 fails write-protect-efuse inside a chain: "Found repeated ['S', '_']
    # in the name list", the name taken as a string; so it runs on its own here)
    assert espefuse(board.port, "burn-efuse", "WDT_DELAY_SEL", "1").returncode == 0
    protect = espefuse(board.port, "write-protect-efuse", "WDT_DELAY_SEL")
    assert protect.returncode == 0, protect.output
    assert summary(board.port, tmp_path / "wp.json")["WDT_DELAY_SEL"]["writeable"] is False
    blocked = espefuse(board.port, "burn-efuse", "WDT_DELAY_SEL", "3")
    assert blocked.returncode == 2
    assert "WDT_DELAY_SEL is write-protected. Burn is not possible." in blocked.output


def test_efuses_survive_replug_and_persist_and_are_read_by_espefuse_virt(
        tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    with Rig(hub, seed=11, throttle=False, flash_timing=False) as rig:
        board = rig.plug(chip="esp32")
        assert espefuse(board.port, "burn-efuse", "JTAG_DISABLE", "1").returncode == 0
        board = rig.replug(board)
        assert summary(board.port, tmp_path / "replug.json")["JTAG_DISABLE"]["value"] is True
    path = efuse_path(hub, bytes.fromhex(board.mac.replace(":", "")))
    assert virt_summary("esp32", path, tmp_path / "virt.json")["JTAG_DISABLE"]["value"] is True
    # a new rig on the same directory and seed, persisting: the same board, eFuses kept
    with Rig(hub, seed=11, throttle=False, flash_timing=False, persist=True) as rig:
        again = rig.plug(chip="esp32")
        assert again.mac == board.mac
        assert summary(again.port, tmp_path / "rerun.json")["JTAG_DISABLE"]["value"] is True
    # not persisting: the same MAC is a new chip, its file written anew
    with Rig(hub, seed=11, throttle=False, flash_timing=False) as rig:
        fresh = rig.plug(chip="esp32")
        assert fresh.mac == board.mac
        assert summary(fresh.port, tmp_path / "new.json")["JTAG_DISABLE"]["value"] is False
    assert virt_summary("esp32", path, tmp_path / "v2.json")["JTAG_DISABLE"]["value"] is False


def test_station_sim_persist_keeps_flash_and_efuses_across_runs(tmp_path: Path) -> None:
    """``station sim --persist``: the second run's board holds the first run's key (still
    read-protected, the silicon's copy in efuse-<mac>.keys) and flash."""
    hub, key = tmp_path / "hub", tmp_path / "key.bin"
    key.write_bytes(os.urandom(32))
    app = tmp_path / "app.bin"
    app.write_bytes(os.urandom(0x1000))
    args = ("--boards", "1", "--dir", str(hub), "--chip", "esp32c3", "--seed", "4",
            "--no-throttle", "--no-flash-timing")

    def run(*extra: str, burn: bool = False) -> dict[str, Any]:
        with sim_process(*args, *extra) as proc:
            assert proc.stdout is not None
            [plugged] = read_events(proc.stdout, 1)
            if burn:
                result = espefuse(plugged["port"], "burn-key", "BLOCK_KEY0", str(key),
                                  "XTS_AES_128_KEY")
                assert result.returncode == 0, result.output
                assert esptool(plugged["port"], "write-flash", "0x10000",
                               str(app)).returncode == 0
            efuses = summary(plugged["port"], tmp_path / "s.json")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        mac = plugged["mac"].replace(":", "")
        efuses["flash"] = (hub / f"flash-{mac}.bin").read_bytes()[0x10000:0x11000]
        efuses["keys"] = (hub / f"efuse-{mac}.keys").exists()
        return efuses

    first = run(burn=True)
    kept = run("--persist")
    assert kept["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
    assert kept["BLOCK_KEY0"]["readable"] is False and kept["keys"]
    assert kept["flash"] == first["flash"] == app.read_bytes()
    new = run()
    assert new["KEY_PURPOSE_0"]["value"] == "USER" and not new["keys"]
    assert new["flash"] == b"\xff" * 0x1000


def test_library_api_burns_over_the_port(fast_rig: Rig, tmp_path: Path) -> None:
    """``espefuse.init_commands(port=...)``: the scripting API, batch mode, a digest."""
    import espefuse as espefuse_lib

    board = fast_rig.plug(chip="esp32s3")
    key = tmp_path / "sb.pem"
    result = espsecure("generate-signing-key", "--version", "2", "--scheme", "rsa3072",
                            str(key))
    assert result.returncode == 0, result.output
    with espefuse_lib.init_commands(port=board.port, before="no-reset",
                                    do_not_confirm=True, batch_mode=True) as cmds:
        cmds.burn_efuse({"SECURE_BOOT_EN": 1})
        with open(key, "rb") as f:
            cmds.burn_key_digest(["BLOCK_KEY2"], [f], ["SECURE_BOOT_DIGEST0"])
        assert cmds.burn_all(check_batch_mode=True)
    efuses = summary(board.port, tmp_path / "lib.json")
    assert efuses["SECURE_BOOT_EN"]["value"] is True
    assert efuses["KEY_PURPOSE_2"]["value"] == "SECURE_BOOT_DIGEST0"
    assert efuses["BLOCK_KEY2"]["readable"] is True  # digests stay readable


def test_library_api_on_the_stations_own_loader(fast_rig: Rig, tmp_path: Path) -> None:
    """``espefuse.init_commands(esp=...)`` with an esptool loader the caller connected
    (the station's session): burns in batch mode, the JSON summary, and the same
    connection goes on answering (espefuse leaves a port it did not open alone)."""
    import espefuse as espefuse_lib
    from esptool.cmds import detect_chip

    board = fast_rig.plug(chip="esp32c6")
    key = tmp_path / "key.bin"
    key.write_bytes(os.urandom(32))
    out = tmp_path / "summary.json"
    esp = detect_chip(board.port, connect_mode="no-reset", connect_attempts=1)
    try:
        with espefuse_lib.init_commands(esp=esp, do_not_confirm=True,
                                        batch_mode=True) as cmds:
            with open(key, "rb") as f:
                cmds.burn_key(["BLOCK_KEY0"], [f], ["XTS_AES_128_KEY"])
            cmds.burn_efuse({"SPI_BOOT_CRYPT_CNT": 1, "DIS_DOWNLOAD_MANUAL_ENCRYPT": 1})
            assert cmds.burn_all(check_batch_mode=True)
            with open(out, "w") as f:
                cmds.summary(format="json", file=f)
        # esptool keeps the connect-time answer: a caller that burned asks afresh
        assert esp.get_security_info()["flash_crypt_cnt"] == 0
        info = esp.get_security_info(cache=False)
        assert info["flash_crypt_cnt"] == 1 and info["key_purposes"][0] == 4
        assert ":".join(f"{b:02x}" for b in esp.read_mac()) == board.mac
    finally:
        esp._port.close()
    efuses = json.loads(out.read_text())
    assert efuses["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
    assert efuses["BLOCK_KEY0"]["readable"] is False
    assert efuses["DIS_DOWNLOAD_MANUAL_ENCRYPT"]["value"] is True


@pytest.mark.parametrize(("chip", "revision"), [("esp32s3", None), ("esp32", "v3.0"),
                                                ("esp32", "v1.0")])
def test_burn_key_digest_on_the_cli(fast_rig: Rig, tmp_path: Path, chip: str,
                                    revision: str | None) -> None:
    """``espefuse burn-key-digest``: the SHA-256 of the public key, as espsecure makes
    it, in a readable, write-protected block; an ESP32 older than v3.0 has no secure
    boot v2 and espefuse refuses in its own words."""
    board = fast_rig.plug(chip=chip, revision=revision)
    pem, digest = tmp_path / "sb.pem", tmp_path / "digest.bin"
    assert espsecure("generate-signing-key", "--version", "2", "--scheme", "rsa3072",
                     str(pem)).returncode == 0
    assert espsecure("digest-sbv2-public-key", "--keyfile", str(pem), "--output",
                     str(digest)).returncode == 0
    if chip == "esp32":
        burn = espefuse(board.port, "burn-key-digest", str(pem))
        block = "BLOCK2"
    else:
        burn = espefuse(board.port, "burn-key-digest", "BLOCK_KEY1", str(pem),
                        "SECURE_BOOT_DIGEST0")
        block = "BLOCK_KEY1"
    if revision == "v1.0":
        assert burn.returncode == 2
        assert "Incorrect chip revision for Secure boot v2. Detected: v1.0. Expected: " \
               ">= v3.0" in burn.output
        return
    assert burn.returncode == 0, burn.output
    efuses = summary(board.port, tmp_path / "s.json")
    assert efuses[block]["readable"] is True and efuses[block]["writeable"] is False
    assert bytes.fromhex(efuses[block]["value"].replace(" ", "")) == digest.read_bytes()


@pytest.mark.parametrize("chip", ["esp32s3", "esp32s2"])
def test_security_info_comes_from_the_efuses(fast_rig: Rig, tmp_path: Path, chip: str) -> None:
    """GET_SECURITY_INFO answers what is burned: flags, crypt count, key purposes."""
    board = fast_rig.plug(chip=chip)
    key = tmp_path / "hmac.bin"
    key.write_bytes(os.urandom(32))
    burn = espefuse(board.port, "burn-efuse", "SPI_BOOT_CRYPT_CNT", "1",
                    "DIS_DOWNLOAD_ICACHE", "1", "SECURE_BOOT_KEY_REVOKE1", "1",
                    "SECURE_BOOT_EN", "1", "burn-key", "BLOCK_KEY2", str(key), "HMAC_UP")
    assert burn.returncode == 0, burn.output
    out = esptool(board.port, "get-security-info").output
    # bit 10 DIS_DOWNLOAD_ICACHE, bit 4 SECURE_BOOT_KEY_REVOKE1, bit 0 SECURE_BOOT_EN
    # (loader.get_security_info)
    assert "Flags: 0x00000411" in out, out
    assert "Secure Boot: Enabled" in out
    # esptool starts its stub on an S3 with secure boot through the ROM's flash-read
    # pointer (loader.run_stub), which the board follows
    assert "Stub flasher running." in out
    assert "Key Purposes: (0, 0, 8, 0, 0, 0, 0)" in out
    assert "Flash Encryption: Enabled" in out
    assert "SPI Boot Crypt Count (SPI_BOOT_CRYPT_CNT): 0x1" in out
    assert ("Chip ID: 9" in out) == (chip == "esp32s3")  # the S2's reply has no chip id


def test_boards_of_one_chip_keep_their_own_efuses_and_plug_without_reparsing(
        fast_rig: Rig, tmp_path: Path) -> None:
    """The eFuse table is parsed once per chip (issue #23: 40-140 ms of the rig's CPU per
    plug stalled every board on the hub): each board still has eFuses of its own."""
    first, second = fast_rig.plug(chip="esp32s3"), fast_rig.plug(chip="esp32s3")
    key = tmp_path / "key.bin"
    key.write_bytes(os.urandom(32))
    burn = espefuse(first.port, "burn-key", "BLOCK_KEY0", str(key), "XTS_AES_128_KEY")
    assert burn.returncode == 0, burn.output
    assert summary(first.port, tmp_path / "a.json")["BLOCK_KEY0"]["readable"] is False
    other = summary(second.port, tmp_path / "b.json")
    assert other["KEY_PURPOSE_0"]["value"] == "USER"
    assert other["BLOCK_KEY0"]["readable"] is True
    # A new board's eFuses cost the rig milliseconds of CPU, not a YAML parse (~0.1 s).
    started = time.process_time()
    for _ in range(8):
        EfuseArray("esp32s3")
    assert time.process_time() - started < 0.3
