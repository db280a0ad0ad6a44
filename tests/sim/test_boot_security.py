"""The boot story on a locked chip: flash read through the eFuse key, secure boot v2.

The eFuses are a board's own (:class:`EfuseArray`), burned with espefuse's library
(``init_commands(esp=...)`` takes the emulator object directly, as ``--virt`` does);
images are signed and encrypted with espsecure's CLI; the story is read from flash.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from station.sim.boot_security import boot_story
from station.sim.chips import chip_spec
from station.sim.efuse import EfuseArray

from . import secure_images as si

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MAC = bytes.fromhex("240ac4123456")


def efuses_of(chip: str) -> EfuseArray:
    return EfuseArray(chip, seed=chip_spec(chip).registers(MAC))


def burn(efuses: EfuseArray, **actions: Any) -> None:
    """espefuse's library on the board's own eFuse emulator, batch mode."""
    import espefuse

    cmds = espefuse.init_commands(esp=efuses.ctrl, do_not_confirm=True, batch_mode=True)
    for name, args in actions.items():
        getattr(cmds, name)(*args)
    assert cmds.burn_all(check_batch_mode=True)


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[dict[str, Path]]:
    fe = tmp_path / "fe.bin"
    fe.write_bytes(os.urandom(32))
    yield {"fe": fe, "sb": si.signing_key(tmp_path / "sb.pem"),
           "other": si.signing_key(tmp_path / "other.pem")}


def enable_encryption(chip: str, efuses: EfuseArray, key: Path, cnt: int = 1) -> None:
    with open(key, "rb") as f:
        if chip == "esp32":
            burn(efuses, burn_key=(["flash_encryption"], [f]),
                 burn_efuse=({"FLASH_CRYPT_CONFIG": 0xF, "FLASH_CRYPT_CNT": cnt},))
        else:
            burn(efuses, burn_key=(["BLOCK_KEY0"], [f], ["XTS_AES_128_KEY"]),
                 burn_efuse=({"SPI_BOOT_CRYPT_CNT": cnt},))


def enable_secure_boot(chip: str, efuses: EfuseArray, pem: Path) -> None:
    with open(pem, "rb") as f:
        if chip == "esp32":
            burn(efuses, burn_key_digest=(f,), burn_efuse=({"ABS_DONE_1": 1},))
        else:
            burn(efuses, burn_key_digest=(["BLOCK_KEY1"], [f], ["SECURE_BOOT_DIGEST0"]),
                 burn_efuse=({"SECURE_BOOT_EN": 1},))


def encrypted_flash(chip: str, key: Path, tmp: Path, boot: bytes, app: bytes) -> bytes:
    boot_at = chip_spec(chip).bootloader_offset
    return si.flash_image({
        boot_at: si.encrypt(boot, key, boot_at, chip, tmp),
        si.TABLE_AT: si.encrypt(si.table(), key, si.TABLE_AT, chip, tmp),
        si.APP_AT: si.encrypt(app, key, si.APP_AT, chip, tmp)})


@pytest.mark.parametrize("chip", ["esp32", "esp32s3", "esp32c3"])
def test_encrypted_images_boot_through_the_key(tmp_path: Path, keys: dict[str, Path],
                                               chip: str) -> None:
    efuses = efuses_of(chip)
    enable_encryption(chip, efuses, keys["fe"])
    flash = encrypted_flash(chip, keys["fe"], tmp_path, si.bootloader(chip, fe=True),
                            si.app(chip, fe=True))
    text, ok, _ = boot_story(chip_spec(chip), efuses, flash, "SELFTEST: PASS")
    left = 3 if chip == "esp32" else 1  # (7 - 1) / 2 and (3 - 1) / 2
    assert ok, text
    assert "boot: Checking flash encryption...\r\n" in text
    assert f"flash_encrypt: flash encryption is enabled ({left} plaintext flashes left)" in text
    assert "W (" in text and "flash_encrypt: Flash encryption mode is DEVELOPMENT (not secure)" \
        in text
    assert "Project name:     locked" in text and text.endswith("SELFTEST: PASS\r\n")

    # the same images in plaintext on the encrypted chip are noise to the ROM
    plain = si.flash_image({chip_spec(chip).bootloader_offset: si.bootloader(chip, fe=True),
                            si.TABLE_AT: si.table(), si.APP_AT: si.app(chip)})
    text, ok, _ = boot_story(chip_spec(chip), efuses, plain)
    assert not ok and "invalid header: 0x" in text and "2nd stage" not in text


def test_release_mode(tmp_path: Path, keys: dict[str, Path]) -> None:
    efuses = efuses_of("esp32s3")
    enable_encryption("esp32s3", efuses, keys["fe"], cnt=7)
    burn(efuses, burn_efuse=({"DIS_DOWNLOAD_MANUAL_ENCRYPT": 1, "DIS_DOWNLOAD_ICACHE": 1,
                              "DIS_DOWNLOAD_DCACHE": 1},))
    flash = encrypted_flash("esp32s3", keys["fe"], tmp_path,
                            si.bootloader("esp32s3", fe=True), si.app("esp32s3", fe=True))
    text, ok, _ = boot_story(chip_spec("esp32s3"), efuses, flash)
    assert ok, text
    assert "flash encryption is enabled (0 plaintext flashes left)" in text
    assert "I (" in text and "flash_encrypt: Flash encryption mode is RELEASE" in text


@pytest.mark.parametrize("chip", ["esp32", "esp32s3", "esp32c6"])
def test_secure_boot_v2_good_and_bad_signatures(tmp_path: Path, keys: dict[str, Path],
                                                chip: str) -> None:
    spec = chip_spec(chip)
    efuses = efuses_of(chip)
    enable_secure_boot(chip, efuses, keys["sb"])
    boot = si.sign(si.bootloader(chip, sb=True), keys["sb"], tmp_path)
    good = si.sign(si.app(chip), keys["sb"], tmp_path)
    text, ok, _ = boot_story(spec, efuses, si.flash_image({
        spec.bootloader_offset: boot, si.TABLE_AT: si.table(), si.APP_AT: good}))
    assert ok, text
    if chip != "esp32":
        assert "Valid secure boot key blocks: 0\r\nsecure boot verification succeeded\r\n" in text
    for line in ("esp_image: Verifying image signature...",
                 "secure_boot_v2: Verifying with RSA-PSS...",
                 "secure_boot_v2: Signature verified successfully!",
                 "secure_boot_v2: enabling secure boot v2...",
                 "secure_boot_v2: secure boot v2 is already enabled, continuing.."):
        assert line in text

    # an app signed with another key: no app
    bad = si.sign(si.app(chip), keys["other"], tmp_path)
    text, ok, _ = boot_story(spec, efuses, si.flash_image({
        spec.bootloader_offset: boot, si.TABLE_AT: si.table(), si.APP_AT: bad}))
    assert not ok
    assert "E (" in text and "secure_boot_v2: Secure Boot V2 verification failed." in text
    assert "esp_image: Secure boot signature verification failed" in text
    assert "esp_image: image valid, signature bad" in text
    assert "boot: Factory app partition is not bootable" in text
    assert "Loaded app" not in text


def test_unsigned_images_on_a_secure_boot_chip(tmp_path: Path, keys: dict[str, Path]) -> None:
    spec = chip_spec("esp32s3")
    efuses = efuses_of("esp32s3")
    enable_secure_boot("esp32s3", efuses, keys["sb"])
    boot = si.sign(si.bootloader("esp32s3", sb=True), keys["sb"], tmp_path)
    text, ok, _ = boot_story(spec, efuses, si.flash_image({
        0: boot, si.TABLE_AT: si.table(), si.APP_AT: si.app("esp32s3")}))
    assert not ok
    assert "secure_boot_v2: No signature block generated for valid scheme" in text
    assert "RSA signing scheme selected but no signature block for the selected scheme" in text

    # an unsigned bootloader stops in the ROM (esp-idf#15959's words)
    text, ok, _ = boot_story(spec, efuses, si.flash_image({
        0: si.bootloader("esp32s3", sb=True), si.TABLE_AT: si.table(),
        si.APP_AT: si.sign(si.app("esp32s3"), keys["sb"], tmp_path)}))
    assert not ok
    assert "No signature block magic byte found at signature sector (found 0xff not 0xe7). " \
           "Image not V2 signed?\r\nsecure boot verification failed\r\nets_main.c 329\r\n" in text
    assert "2nd stage" not in text


def test_revoked_digest_is_not_trusted(tmp_path: Path, keys: dict[str, Path]) -> None:
    spec = chip_spec("esp32c3")
    efuses = efuses_of("esp32c3")
    enable_secure_boot("esp32c3", efuses, keys["sb"])
    burn(efuses, burn_efuse=({"SECURE_BOOT_KEY_REVOKE0": 1},))
    boot = si.sign(si.bootloader("esp32c3", sb=True), keys["sb"], tmp_path)
    text, ok, _ = boot_story(spec, efuses, si.flash_image({
        0: boot, si.TABLE_AT: si.table(),
        si.APP_AT: si.sign(si.app("esp32c3"), keys["sb"], tmp_path)}))
    assert not ok
    assert "Valid secure boot key blocks: \r\nsecure boot verification failed" in text


def test_a_board_locked_with_the_real_tools_boots_its_encrypted_images(
        tmp_path: Path, keys: dict[str, Path]) -> None:
    """espefuse burns the key, esptool --encrypt writes, EN boots through the key."""
    import serial

    from station.sim import Rig

    from .conftest import esptool
    from .efusekit import espefuse

    with Rig(tmp_path / "hub", seed=5, throttle=False, flash_timing=False) as rig:
        board = rig.plug(chip="esp32c3", rfc2217_port=0, app_line="SELFTEST: PASS")
        rig.press_boot_en(board)
        burn = espefuse(board.port, "--before", "no-reset", "burn-key", "BLOCK_KEY0",
                        str(keys["fe"]), "XTS_AES_128_KEY",
                        "burn-efuse", "SPI_BOOT_CRYPT_CNT", "1")
        assert burn.returncode == 0, burn.output
        files = {0x0: si.bootloader("esp32c3", fe=True), si.TABLE_AT: si.table(),
                 si.APP_AT: si.app("esp32c3", fe=True)}
        args = []
        for offset, data in files.items():
            (tmp_path / f"{offset:x}.bin").write_bytes(data)
            args += [hex(offset), str(tmp_path / f"{offset:x}.bin")]
        write = esptool(board.port, "--before", "no-reset", "--after", "no-reset",
                        "write-flash", "--encrypt", *args)
        assert write.returncode == 0, write.output
        with serial.Serial(board.port, 115200, timeout=10) as port:
            rig.press_en(board)
            story = port.read_until(b"SELFTEST: PASS\r\n").decode()
    assert "flash_encrypt: flash encryption is enabled (1 plaintext flashes left)" in story
    assert "flash_encrypt: Flash encryption mode is DEVELOPMENT (not secure)" in story
    assert story.endswith("SELFTEST: PASS\r\n")
