"""Flash encryption as the chip does it, checked with esptool and espsecure.

A key burned with espefuse, the crypt counter set: ``esptool write-flash --encrypt``
stores ciphertext that ``esptool read-flash`` returns as it is and
``espsecure decrypt-flash-data`` with the same key file turns back into the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from esptool.targets import CHIP_DEFS

from station.sim import Rig

from .conftest import esptool
from .efusekit import espefuse, espsecure

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

APP_AT = 0x10000


def _enable(port: str, chip: str, key: Path, keylen: int = 32) -> None:
    """Burn a host-generated key and switch encryption on (development mode)."""
    key.write_bytes(os.urandom(keylen))
    if chip == "esp32":
        args = ["burn-key", "flash_encryption", str(key),
                "burn-efuse", "FLASH_CRYPT_CONFIG", "0xF", "FLASH_CRYPT_CNT", "1"]
    else:
        purpose = "XTS_AES_256_KEY" if keylen == 64 else "XTS_AES_128_KEY"
        args = ["burn-key", "BLOCK_KEY0", str(key), purpose,
                "burn-efuse", "SPI_BOOT_CRYPT_CNT", "1"]
    burn = espefuse(port, *args)
    assert burn.returncode == 0, burn.output


def _read_back(port: str, tmp_path: Path, size: int) -> Path:
    out = tmp_path / "read.bin"
    read = esptool(port, "read-flash", hex(APP_AT), hex(size), str(out))
    assert read.returncode == 0, read.output
    return out


def _decrypt(chip: str, key: Path, cipher: Path, tmp_path: Path) -> bytes:
    plain = tmp_path / "plain.bin"
    scheme = ["--flash-crypt-conf", "0xF"] if chip == "esp32" else ["--aes-xts"]
    result = espsecure("decrypt-flash-data", *scheme, "--keyfile", str(key), "--address",
                       hex(APP_AT), "--output", str(plain), str(cipher))
    assert result.returncode == 0, result.output
    return plain.read_bytes()


@pytest.mark.parametrize(("chip", "keylen"), [
    ("esp32", 32), ("esp32s3", 32), ("esp32s3", 64), ("esp32c3", 32), ("esp32c6", 32),
])
def test_encrypted_write_reads_back_as_ciphertext(fast_rig: Rig, tmp_path: Path, chip: str,
                                                  keylen: int) -> None:
    board = fast_rig.plug(chip=chip)
    key = tmp_path / "key.bin"
    _enable(board.port, chip, key, keylen)
    app = tmp_path / "app.bin"
    # not a multiple of 16 (esptool pads encrypted images) and partly compressible,
    # so the stub's inflated pieces do not fall on block boundaries
    app.write_bytes(os.urandom(40_000) + bytes(30_000) + os.urandom(30_001))
    write = esptool(board.port, "write-flash", "--encrypt", hex(APP_AT), str(app))
    assert write.returncode == 0, write.output
    assert "Cannot verify written data if encrypted" in write.output
    padded = -(-app.stat().st_size // 32) * 32
    cipher = _read_back(board.port, tmp_path, padded)
    stored = cipher.read_bytes()
    assert stored[:1000] != app.read_bytes()[:1000]
    assert _decrypt(chip, key, cipher, tmp_path)[:app.stat().st_size] == app.read_bytes()
    # and what the host would have encrypted itself is exactly what the chip stored
    host = tmp_path / "host.bin"
    scheme = ["--flash-crypt-conf", "0xF"] if chip == "esp32" else ["--aes-xts"]
    plain = tmp_path / "plain-padded.bin"
    plain.write_bytes(app.read_bytes().ljust(-(-app.stat().st_size // 16) * 16, b"\xff"))
    assert espsecure("encrypt-flash-data", *scheme, "--keyfile", str(key), "--address",
                     hex(APP_AT), "--output", str(host), str(plain)).returncode == 0
    assert stored[:host.stat().st_size] == host.read_bytes()


def test_plaintext_writes_are_stored_as_given(fast_rig: Rig, tmp_path: Path) -> None:
    board = fast_rig.plug(chip="esp32c3")
    _enable(board.port, "esp32c3", tmp_path / "key.bin")
    app = tmp_path / "app.bin"
    app.write_bytes(os.urandom(0x2000))
    assert esptool(board.port, "write-flash", hex(APP_AT), str(app)).returncode == 0
    assert _read_back(board.port, tmp_path, 0x2000).read_bytes() == app.read_bytes()


def test_manual_encrypt_disabled_refuses_encrypted_writes(fast_rig: Rig, tmp_path: Path) -> None:
    board = fast_rig.plug(chip="esp32s3")
    _enable(board.port, "esp32s3", tmp_path / "key.bin")
    assert espefuse(board.port, "burn-efuse", "DIS_DOWNLOAD_MANUAL_ENCRYPT",
                    "1").returncode == 0
    app = tmp_path / "app.bin"
    app.write_bytes(os.urandom(0x1000))
    before = fast_rig.flash(board)[APP_AT:APP_AT + 0x1000]
    # esptool reads the eFuse and refuses on its own (cmds.write_flash) ...
    refused = esptool(board.port, "write-flash", "--encrypt", hex(APP_AT), str(app))
    assert refused.returncode == 2
    assert "This chip has encrypt functionality in UART download mode disabled." \
        in refused.output
    # ... and so does the chip, asked anyway: the ROM at FLASH_BEGIN (esptool#952) ...
    esp = CHIP_DEFS["esp32s3"](board.port)
    try:
        esp.connect("no_reset")
        with pytest.raises(Exception, match="0164: Invalid parameter"):
            esp.flash_begin(0x1000, APP_AT, encrypted_write=True)
        # ... and the stub at the first data block
        stub = esp.run_stub()
        stub.flash_begin(0x1000, APP_AT, encrypted_write=True)
        with pytest.raises(Exception, match="Failed SPI operation"):
            stub.flash_block(app.read_bytes(), 0, encrypted=True)
    finally:
        esp._port.close()
    assert fast_rig.flash(board)[APP_AT:APP_AT + 0x1000] == before
    # plaintext over an encrypted, manual-encrypt-disabled chip: esptool warns and stops
    plain = esptool(board.port, "write-flash", hex(APP_AT), str(app))
    assert plain.returncode == 2
    assert "Detected flash encryption enabled and download manual encrypt disabled." \
        in plain.output


def test_release_mode_in_secure_download_refuses_encrypted_writes(fast_rig: Rig,
                                                                  tmp_path: Path) -> None:
    """Secure download mode hides the eFuses from esptool: the ROM refuses instead."""
    board = fast_rig.plug(chip="esp32s3")
    _enable(board.port, "esp32s3", tmp_path / "key.bin")
    assert espefuse(board.port, "burn-efuse", "DIS_DOWNLOAD_MANUAL_ENCRYPT", "1",
                    "ENABLE_SECURITY_DOWNLOAD", "1").returncode == 0
    app = tmp_path / "app.bin"
    app.write_bytes(os.urandom(0x1000))
    write = esptool(board.port, "write-flash", "--encrypt", hex(APP_AT), str(app))
    assert write.returncode == 2
    assert "Failed to enter flash download mode (result was 0164: Invalid parameter)" \
        in write.output

