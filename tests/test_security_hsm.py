"""Secure boot v2 signing through a real PKCS#11 token (issue 20): a SoftHSM2 token made in
the test's folder (SOFTHSM2_CONF), an RSA-3072 key generated inside it; `station run`
signs the images with espsecure's HSM path at start and locks boards with the token's
key digest; a token that refuses the PIN stops the station at start, naming the key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from station.daemon import EXIT_CONFIG, EXIT_OK
from tests.securekit import efuse_file, mac_of, make_line, tool, virt_summary

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LIB = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "hsm-pin-Qx7w"  # not a run of digits: job ids and timestamps never contain it
KEYGEN = """
import sys, pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
lib = pkcs11.lib(sys.argv[1])
with lib.get_token(token_label="station").open(rw=True, user_pin=sys.argv[2]) as s:
    pub, _ = s.generate_keypair(pkcs11.KeyType.RSA, 3072, label="sb", store=True)
    n = int.from_bytes(pub[pkcs11.Attribute.MODULUS], "big")
    e = int.from_bytes(pub[pkcs11.Attribute.PUBLIC_EXPONENT], "big")
sys.stdout.buffer.write(rsa.RSAPublicNumbers(e, n).public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
"""


@dataclass
class Token:
    env: dict[str, str]  # SOFTHSM2_CONF
    slot: int
    public_pem: Path  # the generated key's public part, as the token gives it

    def config(self, path: Path, credentials: str = "env:STATION_HSM_PIN") -> Path:
        path.write_text(f"[hsm_config]\npkcs11_lib = {LIB}\ncredentials = {credentials}\n"
                        f"slot = {self.slot}\nlabel = sb\nlabel_pubkey = sb\n")
        path.chmod(0o600)
        return path


@pytest.fixture
def token(tmp_path: Path) -> Token:
    if not LIB.is_file() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (Debian: apt-get install softhsm2; .ci/run "
                    "installs it)")
    pytest.importorskip("pkcs11", reason="python-pkcs11: pip install 'esptool[hsm]'")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    made = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "station",
                           "--pin", PIN, "--so-pin", "93810"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    slot = int(re.search(r"reassigned to slot (\d+)", made.stdout)[1])  # type: ignore[index]
    key = subprocess.run([sys.executable, "-c", KEYGEN, str(LIB), PIN], env=env,
                         capture_output=True, timeout=120, check=False)
    assert key.returncode == 0, key.stderr.decode()
    public = tmp_path / "sb-public.pem"
    public.write_bytes(key.stdout)
    return Token(env={"SOFTHSM2_CONF": str(conf)}, slot=slot, public_pem=public)


def test_images_signed_in_the_hsm_lock_boards(tmp_path: Path, token: Token) -> None:
    chips = ("esp32c3", "esp32s3")
    line = make_line(tmp_path, chips=chips)
    line.security = {"flash_encryption": "release", "secure_boot": "v2",
                     "hsm_config": str(token.config(tmp_path / "hsm.ini")), "lockdown": True}
    line.env.update(token.env, STATION_HSM_PIN=PIN)
    with line.rig() as rig:
        boards = [rig.plug(chip=chip) for chip in chips for _ in range(2)]
        result = line.run(len(boards))
        files = {b.mac: efuse_file(rig, b) for b in boards}
    assert result.code == EXIT_OK, str(result)

    digest_file = tmp_path / "digest.bin"
    made = tool("espsecure", "digest-sbv2-public-key", "--keyfile", str(token.public_pem),
                "--output", str(digest_file))
    assert made.returncode == 0, made.stdout
    digest = digest_file.read_bytes().hex()
    rows = {r["mac"]: r for r in line.ledger()}
    for board in boards:
        row = rows[mac_of(board)]
        assert (row["result"], row["boot"], row["lockdown"]) == ("done", "ok", 1), row
        assert row["security"] == "flash encryption release (host key), secure boot v2 " \
                                  "(HSM), lock-down", row
        assert row["signing_digest"] == digest, row  # the token's key, burned
        fuses = virt_summary(board.chip, files[board.mac], tmp_path / "s.json")
        assert fuses["KEY_PURPOSE_1"]["value"] == "SECURE_BOOT_DIGEST0"
        assert fuses["SECURE_BOOT_EN"]["value"] is True
    signed = list((line.state / "signed").glob("*.bin"))
    assert len(signed) == 2 * len(chips)  # bootloader and app per chip, signed once
    for image in signed:  # every signature checks against the token's public key
        checked = tool("espsecure", "verify-signature", "--version", "2", "--keyfile",
                       str(token.public_pem), str(image))
        assert checked.returncode == 0 and "verification successful" in checked.stdout.lower(), \
            checked.stdout
    logs = result.stdout + result.stderr + (line.state / "station.log").read_text() + \
        (line.state / "events.jsonl").read_text()
    assert PIN not in logs


def test_an_hsm_that_refuses_the_pin_stops_the_station_at_start(tmp_path: Path,
                                                                token: Token) -> None:
    line = make_line(tmp_path, chips=("esp32c3",))
    line.security = {"flash_encryption": "release", "secure_boot": "v2",
                     "hsm_config": str(token.config(tmp_path / "hsm.ini")), "lockdown": True}
    line.env.update(token.env, STATION_HSM_PIN="0000")
    with line.rig() as rig:
        board = rig.plug(chip="esp32c3")
        result = line.cli("run", "--headless", "--exit-after", "1", timeout=120)
        flash = rig.flash(board)
    assert result.code == EXIT_CONFIG, str(result)
    said = result.complaint()
    assert ": security.hsm_config: " in said and "hsm.ini" in said and "PinIncorrect" in said, \
        said
    assert "0000" not in result.stdout + result.stderr
    assert flash.count(0xFF) == len(flash)  # nothing written: refused before any board

    unset = make_line(tmp_path / "unset", chips=("esp32c3",))
    unset.security = dict(line.security)
    unset.env.update(token.env)  # STATION_HSM_PIN not set
    result = unset.cli("check")
    assert result.code == EXIT_CONFIG and "STATION_HSM_PIN is not set" in result.complaint(), \
        result
