"""A line writing esp_secure_cert partitions (issue 21), for the secure-cert tests: the
builds and rig fixtures, and the whole DS flow on a line of boards
checked the way a user would (`run_ds_line`), whichever registrar certifies the keys.

Why one kit: the local CA and AWS IoT lines make the same partitions and must pass the
same checks (each board done, its partition parsed, no private key anywhere, the DS
ciphertext decrypting with the board's eFuse HMAC key to the certificate's key); only
what the registrar itself holds (AWS's certificates, the CSRs) is checked by its module.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from station.config import FirmwareSection
from station.daemon import EXIT_OK
from station.demo import make_demo_firmware
from station.flash import FirmwareBundle, load_firmware
from station.identity import read_secure_cert
from station.identity.ds import DsData
from station.sim import Rig
from station.sim.efuse import EfuseArray, efuse_path
from tests.test_ds import chip_decrypts
from tests.test_station import Line

DS_CHIPS = ("esp32s3", "esp32c3", "esp32c6")


def builds_fixture(folder: str, chips: tuple[str, ...]
                   ) -> Callable[[pytest.TempPathFactory], dict[str, Path]]:
    """A module fixture: small demo builds with an esp_secure_cert partition, chip ->
    flasher_args.json, made once per module."""
    @pytest.fixture(scope="module")
    def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        root = tmp_path_factory.mktemp(folder)
        return {chip: make_demo_firmware(root / chip, chip=chip, app_size=0x4000, seed=i,
                                         secure_cert=True)
                for i, chip in enumerate(chips)}
    return builds


def rig_fixture(seed: int) -> Callable[[Path], Iterator[Rig]]:
    """A test's fixture: an unthrottled rig (no flash timing) in tmp_path/rig."""
    @pytest.fixture
    def rig(tmp_path: Path) -> Iterator[Rig]:
        with Rig(tmp_path / "rig", seed=seed, throttle=False, flash_timing=False) as rig:
            yield rig
    return rig


def security_steps(state: Path, mac: str) -> list[dict[str, str]]:
    conn = sqlite3.connect(f"{(state / 'ledger.sqlite3').resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM security WHERE mac = ? "
                                              "ORDER BY rowid", (mac,))]
    finally:
        conn.close()


def every_file(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


def public_n(pem: bytes) -> int:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(pem).public_numbers().n  # type: ignore[union-attr]


@dataclass(frozen=True)
class DsBoard:
    """One board of a DS line once checked: its ledger row, the certificate in its
    partition and the RSA modulus its DS ciphertext decrypts to."""

    job: dict[str, Any]
    cert_pem: str
    n: int


def run_ds_line(tmp_path: Path, rig: Rig, config: Path, builds: dict[str, Path],
                chips: list[str], *, env: dict[str, str] | None = None,
                ca: Path | None = None) -> list[DsBoard]:
    """`station run` (`config`: `ds = true` for `builds`) on boards of `chips` plugged at
    once, then per board:
    done; certs_out holds the certificate, the public key and the ciphertext, no private
    key; the partition (the station's reader) holds the certificate, the CA's (`ca`, the
    local CA's certificate, when the registrar puts one there) and the DS data and
    context, no key; the HMAC key is in BLOCK_KEY5, read-protected, journaled once, and
    the ciphertext decrypts with it (as the chip would) to the certificate's key. Last,
    no private or HMAC key is in any file under tmp_path but the boards' eFuse files."""
    bundles: dict[str, FirmwareBundle] = {
        chip: load_firmware(FirmwareSection(chip=chip, flasher_args=p, images=()))
        for chip, p in builds.items()}
    line = Line(root=tmp_path, rig=rig, config=config, bundle=bundles[chips[0]])
    line.start("--exit-after", str(len(chips)), env=env)
    boards = [rig.plug(chip=chip, index=i) for i, chip in enumerate(chips)]
    assert line.finish() == EXIT_OK, line.output()[-3000:]
    jobs = {j["mac"]: j for j in line.jobs()}
    secrets: list[bytes] = []
    checked: list[DsBoard] = []
    expected = sorted(["DEV_CERT", "DS_CONTEXT", "DS_DATA"] + (["CA_CERT"] if ca else []))
    for board in boards:
        mac = board.mac.replace(":", "")
        job = jobs[mac]
        assert job["result"] == "done", job
        assert (job["credentials"], job["efuse_key_block"]) == ("esp_secure_cert",
                                                                 "BLOCK_KEY5"), job
        folder = tmp_path / "certs_out" / job["thing_name"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "certificate.pem.crt", "ds_data.json", "public.pem.key", "registration.json"]
        cert_pem = (folder / "certificate.pem.crt").read_text()

        part = bundles[board.chip].partition("esp_secure_cert")
        tlvs = {t.name: t for t in read_secure_cert(rig.flash(board)[part.offset:part.end])}
        assert sorted(tlvs) == expected  # no key
        assert tlvs["DEV_CERT"].text() == cert_pem
        if ca is not None:
            assert tlvs["CA_CERT"].text() == ca.read_text()
        assert tlvs["DS_CONTEXT"].data == struct.pack("<IBBH", 0, 5, 0, 2048)

        efuses = EfuseArray(board.chip, efuse_path(rig.directory, bytes.fromhex(mac)))
        assert efuses.blocks_with_purpose("HMAC_DOWN_DIGITAL_SIGNATURE") == [9]
        assert not efuses.readable(9)
        hmac_key = efuses.block_bytes(9)
        data = tlvs["DS_DATA"].data
        saved = DsData.from_json((folder / "ds_data.json").read_bytes())
        assert DsData(ciphertext=data[20:], iv=data[4:20], rsa_bits=2048, key_id=5,
                      hmac_fingerprint=saved.hmac_fingerprint) == saved
        d, n = chip_decrypts(saved, hmac_key, board.chip)
        # one key: the certificate's, certs_out's public key, the ciphertext's
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        assert n == cert.public_key().public_numbers().n  # type: ignore[union-attr]
        assert n == public_n((folder / "public.pem.key").read_bytes())
        secrets += [hmac_key, hmac_key.hex().encode(), d.to_bytes(256, "big"),
                    d.to_bytes(256, "little"), f"{d:x}".encode()]
        steps = [(s["step"], s["phase"]) for s in security_steps(line.state, mac)]
        assert steps[:2] == [("ds_key", "before"), ("ds_key", "after")]
        checked.append(DsBoard(job=job, cert_pem=cert_pem, n=n))
    for path in every_file(tmp_path):
        if path.is_relative_to(rig.directory) and path.name.startswith("efuse-"):
            continue  # the chip's fuses: where the HMAC key belongs
        content = path.read_bytes()
        ca_key = ca is not None and path.is_relative_to(ca.parent)  # the CA's own key
        assert ca_key or b"PRIVATE KEY" not in content, path
        for secret in secrets:
            assert secret not in content, f"a key in the clear in {path}"
    return checked
