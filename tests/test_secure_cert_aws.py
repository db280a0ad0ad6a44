"""[credentials] ds = true with AWS IoT (issue 21): the CSR flow with the key never in the
clear, on a line of 16 boards (ESP32-S3, -C3 and -C6 mixed), and a station killed right
before and right after a board's HMAC key burn.

The real `station run` registers DS boards with AWS IoT on a moto server, through the test
proxy that answers CreateCertificateFromCsr as AWS does, with a certificate for the CSR's
own key (moto's carries a key of its own, MOTO-NOTES #1) and keeps every CSR it is sent.
Per board the test holds the station to what a user would check: the CSR verifies and
carries the key the board's DS ciphertext decrypts to (with the HMAC key read from the
board's eFuses, as the chip would); AWS's certificate is in the partition, ACTIVE and on
its thing; certs_out keeps the certificate, the public key and the ciphertext, no private
key; and no private or HMAC key is in any file the station wrote (logs, ledger, certs_out,
state).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from station.config import FirmwareSection
from station.daemon import EXIT_OK
from station.demo import make_demo_firmware
from station.flash import FirmwareBundle, load_firmware
from station.identity import CRASH_ENV, read_secure_cert
from station.identity.ds import DsData
from station.sim import Rig
from station.sim.efuse import EfuseArray, efuse_path
from tests.registrar.awsproxy import AwsProxy, moto_server, reset_moto
from tests.stationkit import POLICY, REGION, aws_client, aws_env
from tests.test_ds import chip_decrypts
from tests.test_secure_cert import every_file, security_steps, write_config
from tests.test_station import Line

pytestmark = pytest.mark.timeout(300)

DS_CHIPS = ("esp32s3", "esp32c3", "esp32c6")


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def proxy(moto_url: str) -> Iterator[AwsProxy]:
    reset_moto(moto_url)
    with AwsProxy(moto_url, from_csr=True) as p:
        yield p


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fw-ds-aws")
    return {chip: make_demo_firmware(root / chip, chip=chip, app_size=0x4000, seed=i,
                                     secure_cert=True)
            for i, chip in enumerate(DS_CHIPS)}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "rig", seed=2104, throttle=False, flash_timing=False)
    yield rig
    rig.close()


def aws_registrar(endpoint: str) -> str:
    return f"""[registrar]
kind = "aws-iot"
[registrar.aws]
region = "{REGION}"
endpoint_url = "{endpoint}"
policy_name = "station-device"
policy_document = "{POLICY}"
key_source = "csr"
max_attempts = 10
"""


def public_n(pem: bytes) -> int:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(pem).public_numbers().n  # type: ignore[union-attr]


def run_ds_line(tmp_path: Path, rig: Rig, proxy: AwsProxy, builds: dict[str, Path],
                chips: list[str]) -> None:
    """`station run` on DS boards of `chips` with AWS IoT, then every check of the module
    docstring on each board."""
    config = write_config(tmp_path, builds, name="ds-aws-line", credentials="ds = true\n",
                          registrar=aws_registrar(proxy.url))
    bundles: dict[str, FirmwareBundle] = {
        chip: load_firmware(FirmwareSection(chip=chip, flasher_args=p, images=()))
        for chip, p in builds.items()}
    line = Line(root=tmp_path, rig=rig, config=config, bundle=bundles[chips[0]])
    line.start("--exit-after", str(len(chips)), env=aws_env(tmp_path))
    boards = [rig.plug(chip=chip, index=i) for i, chip in enumerate(chips)]
    try:
        assert line.wait() == EXIT_OK, line.output()[-3000:]
    finally:
        if line.proc is not None and line.proc.poll() is None:
            line.proc.kill()
    jobs = {j["mac"]: j for j in line.jobs()}
    csrs = {x509.load_pem_x509_csr(c.encode()).public_key().public_numbers().n: c  # type: ignore[union-attr]
            for c in proxy.csrs}
    assert len(csrs) == len(chips) == proxy.calls["CreateCertificateFromCsr"]
    secrets: list[bytes] = []
    with aws_client(proxy.url) as aws:
        active = aws.active()
        for board in boards:
            mac = board.mac.replace(":", "")
            job = jobs[mac]
            assert job["result"] == "done", job
            thing = job["thing_name"]
            folder = tmp_path / "certs_out" / thing
            assert sorted(p.name for p in folder.iterdir()) == [
                "certificate.pem.crt", "ds_data.json", "public.pem.key", "registration.json"]
            cert_pem = (folder / "certificate.pem.crt").read_text()
            cid = job["certificate_id"]
            assert cid in active and aws.principals(thing) == [cid]
            assert aws.certificate_pem(cid) == cert_pem  # AWS's certificate, as issued

            part = bundles[board.chip].partition("esp_secure_cert")
            tlvs = {t.name: t for t in read_secure_cert(rig.flash(board)[part.offset:part.end])}
            assert sorted(tlvs) == ["DEV_CERT", "DS_CONTEXT", "DS_DATA"]  # no key
            assert tlvs["DEV_CERT"].text() == cert_pem
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
            # one key: the CSR's, the certificate's, certs_out's public key, the ciphertext's
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            assert n == cert.public_key().public_numbers().n  # type: ignore[union-attr]
            assert n == public_n((folder / "public.pem.key").read_bytes())
            assert n in csrs  # the CSR was signed with it (the proxy verified the signature)
            secrets += [hmac_key, hmac_key.hex().encode(), d.to_bytes(256, "big"),
                        d.to_bytes(256, "little"), f"{d:x}".encode()]
            steps = [(s["step"], s["phase"]) for s in security_steps(line.state, mac)]
            assert steps[:2] == [("ds_key", "before"), ("ds_key", "after")]
    for path in every_file(tmp_path):
        if path.is_relative_to(rig.directory) and path.name.startswith("efuse-"):
            continue  # the chip's fuses: where the HMAC key belongs
        content = path.read_bytes()
        assert b"PRIVATE KEY" not in content, path
        for secret in secrets:
            assert secret not in content, f"a key in the clear in {path}"


def test_sixteen_ds_boards_register_with_aws_iot_by_csr(
        tmp_path: Path, rig: Rig, proxy: AwsProxy, builds: dict[str, Path]) -> None:
    """The whole flow on a line of 16 boards, S3, C3 and C6 mixed, in parallel."""
    run_ds_line(tmp_path, rig, proxy, builds, [DS_CHIPS[i % 3] for i in range(16)])


def _once(line: Line, env: dict[str, str]) -> int:
    line.start("--exit-after", "1", env=env)
    try:
        return line.wait()
    finally:
        if line.proc is not None and line.proc.poll() is None:
            line.proc.kill()


@pytest.mark.parametrize("point", ["ds_key:after", "ds_key:before"])
def test_a_station_killed_around_the_burn_finishes_the_aws_board_with_one_hmac_key(
        tmp_path: Path, rig: Rig, proxy: AwsProxy, builds: dict[str, Path],
        point: str) -> None:
    """SIGKILL right after the burn: the next run reuses AWS's certificate (certs_out
    holds its public key and the ciphertext) and writes the partition from the saved
    ciphertext. Right before it: the ciphertext is void, the board asks to be plugged
    again, and the next run retires that certificate and makes a new key. Either way one
    HMAC key, the board's certificate ACTIVE on its thing and no other one."""
    config = write_config(tmp_path, {"esp32c3": builds["esp32c3"]}, name="ds-aws-crash",
                          credentials="ds = true\n", registrar=aws_registrar(proxy.url))
    bundle = load_firmware(FirmwareSection(chip="esp32c3", flasher_args=builds["esp32c3"],
                                           images=()))
    line = Line(root=tmp_path, rig=rig, config=config, bundle=bundle)
    board = rig.plug(chip="esp32c3", index=0)
    mac = board.mac.replace(":", "")
    env = aws_env(tmp_path)
    assert _once(line, {**env, CRASH_ENV: point}) == -9, line.output()[-2000:]
    code = _once(line, env)
    if point == "ds_key:before":
        assert code != EXIT_OK
        assert "plug the board again" in line.jobs()[-1]["error"]
        code = _once(line, env)
    assert code == EXIT_OK, line.output()[-3000:]
    job = line.jobs()[-1]
    assert job["result"] == "done", job
    assert len(proxy.csrs) == (1 if point == "ds_key:after" else 2)
    burns = [s for s in security_steps(line.state, mac) if s["phase"] == "after"]
    assert len(burns) == 1, burns
    efuses = EfuseArray("esp32c3", efuse_path(rig.directory, bytes.fromhex(mac)))
    part = bundle.partition("esp_secure_cert")
    tlvs = {t.name: t for t in read_secure_cert(rig.flash(board)[part.offset:part.end])}
    data = tlvs["DS_DATA"].data
    _, n = chip_decrypts(DsData(ciphertext=data[20:], iv=data[4:20], rsa_bits=2048,
                                key_id=5, hmac_fingerprint=""), efuses.block_bytes(9),
                         "esp32c3")
    cert = x509.load_pem_x509_certificate(tlvs["DEV_CERT"].text().encode())
    assert n == cert.public_key().public_numbers().n  # type: ignore[union-attr]
    with aws_client(proxy.url) as aws:
        assert aws.principals(job["thing_name"]) == [job["certificate_id"]]
        assert list(aws.active()) == [job["certificate_id"]]
        assert aws.certificate_pem(job["certificate_id"]) == tlvs["DEV_CERT"].text()
