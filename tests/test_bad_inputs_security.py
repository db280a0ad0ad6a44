"""The bad-input matrix, part 4: [security]. A config that would brick boards or leave
them open is refused at start (`station check`, exit 2), one line naming file, key and
fix; docs/bad-inputs.md lists the cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from station.daemon import EXIT_CONFIG
from station.demo import make_demo_firmware
from tests.securekit import SecureLine, make_line, signing_key

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> SecureLine:
    return make_line(tmp_path_factory.mktemp("bad-security"), chips=("esp32c3",))


def _line(built: SecureLine, tmp_path: Path, **security: object) -> SecureLine:
    line = SecureLine(tmp_path, dict(built.builds), built.key)
    line.security = {"flash_encryption": "release", "secure_boot": "v2",
                     "signing_key": str(built.key), "lockdown": True, **security}
    line.security = {k: v for k, v in line.security.items() if v is not None}
    return line


CASES = [
    ({"signing_key": "missing.pem"}, "security.signing_key: ", "missing.pem: no such file"),
    ({"xts_aes": 256}, "security: ", "esp32c3 has no XTS_AES_256_KEY key purpose"),
    ({"flash_encryption": "development"}, "security.lockdown: ",
     "lock-down burns the release-mode eFuses"),
    ({"lockdown": False}, "security.flash_encryption: ", "\"release\" without lockdown"),
    ({"signing_key": None}, "security.signing_key: ", "secure_boot = \"v2\" needs the "
                                                       "signing key"),
    ({"sign_images": False}, "security.sign_images: ", "is not signed (no signature sector)"),
]


@pytest.mark.parametrize(("change", "key", "words"), CASES)
def test_a_security_config_that_would_brick_or_leave_boards_open_is_refused(
        built: SecureLine, tmp_path: Path, change: dict[str, object], key: str,
        words: str) -> None:
    line = _line(built, tmp_path, **change)
    result = line.cli("check")
    assert result.code == EXIT_CONFIG, str(result)
    line_out = result.complaint()
    # the config's keys name station.toml; image problems name the build's file
    assert f": {key}" in line_out and words in line_out, line_out


def test_an_unreadable_or_wrong_signing_key_is_refused(built: SecureLine,
                                                       tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    result = _line(built, tmp_path, signing_key=str(junk)).cli("check")
    assert result.code == EXIT_CONFIG and "not an unencrypted PEM private key" in \
        result.complaint(), result
    if os.geteuid() != 0:
        junk.chmod(0)
        result = _line(built, tmp_path, signing_key=str(junk)).cli("check")
        assert "cannot be read" in result.complaint(), result


def test_a_build_without_the_features_is_refused(built: SecureLine, tmp_path: Path) -> None:
    plain = make_demo_firmware(tmp_path / "plain", chip="esp32c3", app_size=0x8000)
    line = _line(built, tmp_path)
    line.builds = {"esp32c3": plain}
    result = line.cli("check")
    assert result.code == EXIT_CONFIG, str(result)
    assert "is not built for flash encryption" in result.complaint()


def test_esp32_secure_boot_needs_a_bootloader_for_v3(tmp_path: Path) -> None:
    old = make_demo_firmware(tmp_path / "old", chip="esp32", app_size=0x8000)
    line = SecureLine(tmp_path, {"esp32": old}, signing_key(tmp_path / "sb.pem"))
    line.security = {"secure_boot": "v2", "signing_key": "sb.pem"}
    result = line.cli("check")
    assert result.code == EXIT_CONFIG
    assert "is not built for secure boot v2" in result.complaint()


LOCAL_CA = {"registrar": {"kind": "local-ca"}, "registrar.local_ca": {"dir": "ca"}}


def test_nvs_credentials_on_an_encrypted_line_need_an_nvs_keys_partition(
        built: SecureLine, tmp_path: Path) -> None:
    """Plain NVS would leave the private key readable on a locked board: a table
    without the partition NVS encryption keeps its keys in is refused, naming it."""
    line = _line(built, tmp_path)
    line.extra = dict(LOCAL_CA)
    result = line.cli("check")
    assert result.code == EXIT_CONFIG, result
    complaint = result.complaint()
    assert ": security.flash_encryption: " in complaint, complaint
    assert f"the partition table of {built.builds['esp32c3']} has no nvs_keys partition" \
        in complaint, complaint
    assert "\"nvs_key, data, nvs_keys, , 0x1000, encrypted\"" in complaint, complaint

