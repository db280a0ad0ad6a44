"""escrow_public_key (issue 20): each board's host-made flash-encryption key is kept only
wrapped (RSA-OAEP) to the escrow's public key, 0600 in the board's 0700 certs_out
folder; whoever holds the private key unwraps it and decrypts a returned unit's flash
dump with `espsecure decrypt-flash-data`."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from station.daemon import EXIT_CONFIG, EXIT_OK
from tests.securekit import burned_key_file, decrypt, mac_of, make_line

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
CHIPS = ("esp32c3", "esp32")
APP_AT = 0x10000


def test_the_key_is_escrowed_wrapped_and_opens_the_flash_dump(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    public = tmp_path / "escrow.pub.pem"
    public.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    line = make_line(tmp_path, chips=CHIPS)
    line.security["escrow_public_key"] = str(public)
    line.extra["credentials"] = {"out_dir": "certs_out"}
    result, boards, flashes, files = line.plug_and_run([c for c in CHIPS for _ in range(2)])
    assert result.code == EXIT_OK, str(result)
    rows = line.rows()
    everything = b""
    for path in (tmp_path / "certs_out").rglob("*"):
        everything += path.read_bytes() if path.is_file() else b""
    for board in boards:
        row = rows[mac_of(board)]
        assert row["result"] == "done", row
        folder = tmp_path / "certs_out" / row["thing_name"]
        escrow = folder / "flash_encryption_key.escrow.json"
        assert stat.S_IMODE(escrow.stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        kept = json.loads(escrow.read_text())
        assert (kept["mac"], kept["scheme"], kept["fingerprint"]) == \
            (mac_of(board), "RSA-OAEP-SHA256", row["key_fingerprint"]), kept
        key = private.decrypt(base64.b64decode(kept["wrapped_key"]), padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
        burned = burned_key_file(board.chip, files[board.mac], tmp_path / "burned.key")
        assert key == burned.read_bytes()  # the key in the chip's fuses, and no other
        assert key not in everything and key.hex().encode() not in everything
        # failure analysis: the unwrapped key turns the dump back into the app
        (tmp_path / "unwrapped.key").write_bytes(key)
        app = (line.builds[board.chip].parent / "app.bin").read_bytes()
        stored = flashes[board.mac][APP_AT:APP_AT + len(app) + (-len(app) % 16)]
        assert stored[:len(app)] != app
        plain = decrypt(board.chip, tmp_path / "unwrapped.key", stored, APP_AT, tmp_path)
        assert plain[:len(app)] == app, board.chip
    log = (line.state / "station.log").read_text() + (line.state / "events.jsonl").read_text()
    assert "wrapped_key" not in log


def test_an_escrow_key_that_cannot_wrap_is_refused(tmp_path: Path) -> None:
    line = make_line(tmp_path, chips=("esp32c3",))
    small = tmp_path / "small.pem"
    small.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=1024)
                      .public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat
                                                 .SubjectPublicKeyInfo))
    line.security["escrow_public_key"] = str(small)
    result = line.cli("check")
    assert result.code == EXIT_CONFIG, str(result)
    assert ": security.escrow_public_key: " in result.complaint() and "RSA-1024" in \
        result.complaint(), result
    line.security["escrow_public_key"] = "missing.pem"
    result = line.cli("check")
    assert "missing.pem: no such file" in result.complaint(), result
