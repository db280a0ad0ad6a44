"""Device-generated key: the bootloader encrypts the flash in place on first boot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import serial

from station.sim import Faults, Rig
from station.sim.boot_security import boot_story
from station.sim.chips import chip_spec
from station.sim.device_key import ALLOW_ENC, Step
from station.sim.flash import Flash, FlashTiming

from . import secure_images as si
from .efusekit import espsecure, summary
from .test_boot_security import efuses_of

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def read_until(port: serial.Serial, text: str) -> str:
    """The console up to and including ``text`` ("" if it never came: the port's
    timeout ran out first)."""
    got = port.read_until(text.encode()).decode(errors="replace")
    return got if got.endswith(text) else ""


def dev_bootloader(chip: str) -> bytes:
    """A development-mode build: encryption on, UART bootloader encryption allowed."""
    return si.bootloader(chip, fe=True, extra=(ALLOW_ENC,))


def plain_flash(chip: str, app: bytes) -> Flash:
    flash = Flash(0x400000, FlashTiming(enabled=False))
    flash.data[:] = si.flash_image({chip_spec(chip).bootloader_offset: dev_bootloader(chip),
                                    si.TABLE_AT: si.table(), si.APP_AT: app})
    return flash


def run_steps(steps: list[Step], until: str | None = None) -> None:
    """What the chip's time would do: every step's work, in order; with ``until``, a
    reset lands while the step of that name is under way (its work undone)."""
    for step in steps:
        if step.what == until:
            return
        if step.action is not None:
            step.action()
    assert until is None, f"no step {until!r} in {[s.what for s in steps]}"


@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_first_boot_generates_the_key_and_encrypts_in_place(tmp_path: Path, chip: str) -> None:
    spec = chip_spec(chip)
    efuses = efuses_of(chip)
    app = si.app(chip, fe=True)
    flash = plain_flash(chip, app)
    first = boot_story(spec, efuses, flash, "SELFTEST: PASS")
    assert not first.ok and first.steps
    story = first.text + "".join(f"{line}\r\n" for s in first.steps for line in s.lines)
    assert first.text.rstrip().endswith("boot: Checking flash encryption...")
    for line in ("efuse: Batch mode of writing fields is enabled",
                 "flash_encrypt: Generating new flash encryption key...",
                 "flash_encrypt: Disable JTAG...",
                 "efuse: Batch mode. Prepared fields are committed",
                 "flash_encrypt: bootloader encrypted successfully",
                 "flash_encrypt: partition table encrypted and loaded successfully",
                 "flash_encrypt: Encrypting partition 1 at offset 0xd000 (length 0x2000)...",
                 "flash_encrypt: Done encrypting",
                 "flash_encrypt: Flash encryption completed",
                 "boot: Resetting with flash encryption enabled..."):
        assert line in story, line
    if chip == "esp32":
        assert "flash_encrypt: Setting CRYPT_CONFIG efuse to 0xF" in story
    else:
        assert "efuse: Writing EFUSE_BLK_KEY0 with purpose 4" in story
        assert "W (" in story and "flash_encrypt: Not disabling UART bootloader encryption" \
            in story
    assert "Encrypting partition 0 " not in story  # nvs: not flagged encrypted
    app_len = -(-len(app) // 0x1000) * 0x1000
    assert f"Encrypting partition 3 at offset 0x10000 (length 0x{len(app):x})..." in story
    run_steps(first.steps)

    second = boot_story(spec, efuses, flash, "SELFTEST: PASS")
    assert second.ok and not second.steps, second.text
    left = 3 if chip == "esp32" else 1
    assert f"flash encryption is enabled ({left} plaintext flashes left)" in second.text
    assert second.text.endswith("SELFTEST: PASS\r\n")
    # the flash now holds ciphertext of the app under the chip's own key
    stored = bytes(flash.data[si.APP_AT:si.APP_AT + app_len])
    assert stored[:len(app)] != app
    key = tmp_path / "key.bin"
    key.write_bytes(efuses.block_bytes(1 if chip == "esp32" else 4)[::-1])
    (tmp_path / "c.bin").write_bytes(stored)
    scheme = ["--flash-crypt-conf", "0xF"] if chip == "esp32" else ["--aes-xts"]
    assert espsecure("decrypt-flash-data", *scheme, "--keyfile", str(key), "--address",
                     hex(si.APP_AT), "--output", str(tmp_path / "p.bin"),
                     str(tmp_path / "c.bin")).returncode == 0
    assert (tmp_path / "p.bin").read_bytes()[:len(app)] == app
    assert not efuses.readable(1 if chip == "esp32" else 4)


def test_a_reset_during_encryption(tmp_path: Path) -> None:
    """ESP-IDF's load_image comment: a reset before the bootloader's turn and the next
    boot starts over with the key it burned; once the bootloader's first sector is
    ciphertext, the ROM reads noise with encryption still off."""
    spec = chip_spec("esp32c3")
    efuses = efuses_of("esp32c3")
    app = si.app("esp32c3", fe=True)
    flash = plain_flash("esp32c3", app)
    first = boot_story(spec, efuses, flash)
    assert first.steps[0].what == "burn" and first.steps[0].seconds > 0.002
    run_steps(first.steps, until="erase 0x0")  # key burned, reset before any sector
    again = boot_story(spec, efuses, flash)
    story = again.text + "".join(f"{line}\r\n" for s in again.steps for line in s.lines)
    assert "Using pre-loaded flash encryption key in efuse" in story
    assert "Generating new flash encryption key" not in story
    assert efuses.crypt_cnt == 0 and not efuses.readable(4)

    # caught between a sector's erase and its write: that sector is left erased
    run_steps(again.steps, until=f"write {si.APP_AT:#x}")
    assert bytes(flash.data[si.APP_AT:si.APP_AT + 0x1000]) == b"\xff" * 0x1000
    assert bytes(flash.data[si.APP_AT + 0x1000:si.APP_AT + 0x2000]) == app[0x1000:0x2000]
    bricked = boot_story(spec, efuses, flash)  # the bootloader is ciphertext, counter 0
    assert not bricked.ok and not bricked.steps
    assert "invalid header: 0x" in bricked.text and "2nd stage" not in bricked.text


def test_a_board_encrypts_itself_on_first_boot(tmp_path: Path) -> None:
    """On a board: the work takes the flash's time, the chip resets, the app runs."""
    with Rig(tmp_path / "hub", seed=9, throttle=False, flash_timing=True) as rig:
        board = rig.plug(chip="esp32c6", rfc2217_port=0, app_line="SELFTEST: PASS")
        app = si.app("esp32c6", fe=True)
        data = rig.board(board).flash.data
        data[:] = si.flash_image({0: dev_bootloader("esp32c6"), si.TABLE_AT: si.table(),
                                  si.APP_AT: app})
        sectors = -(-len(app) // 0x1000)
        with serial.Serial(board.port, 115200, timeout=30) as port:
            rig.press_en(board)
            assert read_until(port, f"Encrypting partition 3 at offset 0x10000 (length "
                              f"0x{len(app):x})...")
            start = time.monotonic()
            assert read_until(port, "Done encrypting")
            took = time.monotonic() - start
            rest = read_until(port, "SELFTEST: PASS\r\n")
        rig.press_boot_en(board)
        efuses = summary(board.port, tmp_path / "s.json")
    # 45 ms erase + 16 x 0.7 ms program + read per 4 KB sector (flash.py)
    assert took >= sectors * 0.056 * 0.95, took
    assert "flash_encrypt: Flash encryption completed" in rest
    assert "rst:0x3 (RTC_SW_SYS_RST)" in rest  # bootloader_reset() after enabling
    assert "flash encryption is enabled (1 plaintext flashes left)" in rest
    assert efuses["SPI_BOOT_CRYPT_CNT"]["value"] == "Enable"
    assert efuses["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
    assert efuses["BLOCK_KEY0"]["readable"] is False


def test_a_board_reset_during_first_boot_encryption(tmp_path: Path) -> None:
    """EN pressed on a board while its bootloader encrypts the flash: once before the
    first sector (the next boot starts over with the burned key), once during the app
    partition (the bootloader is ciphertext with encryption off: the ROM boot-loops).
    The flash is slowed down so a press from this thread lands inside the window."""
    with Rig(tmp_path / "hub", seed=9, throttle=False, flash_timing=True) as rig:
        board = rig.plug(chip="esp32c6", rfc2217_port=0, app_line="SELFTEST: PASS",
                         faults=Faults(slow_flash=8))
        data = rig.board(board).flash.data
        data[:] = si.flash_image({0: dev_bootloader("esp32c6"), si.TABLE_AT: si.table(),
                                  si.APP_AT: si.app("esp32c6", fe=True)})
        efuses = rig.board(board).efuses
        with serial.Serial(board.port, 115200, timeout=30) as port:
            rig.press_en(board)
            assert read_until(port, "Generating new flash encryption key...")
            # the bootloader's segments are logged after the key burn, before its
            # first sector (about 0.36 s of erase at this flash speed)
            assert read_until(port, "Batch mode. Prepared fields are committed")
            assert read_until(port, "esp_image: segment 0: ")
            rig.press_en(board)
            restart = read_until(port, "Encrypting partition 3 at offset 0x10000")
            assert "Using pre-loaded flash encryption key in efuse" in restart
            assert "Generating new flash encryption key" not in restart
            rig.press_en(board)
            bricked = read_until(port, "invalid header: 0x")
        assert efuses.crypt_cnt == 0 and not efuses.readable(4)
    assert bricked.endswith("invalid header: 0x")
