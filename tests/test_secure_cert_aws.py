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
state). All but the AWS side are tests/dskit.py's `run_ds_line`, which the local CA's
16-board line (tests/test_secure_cert.py) shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from benchmarks.soak_aws import POLICY, REGION
from station.config import FirmwareSection
from station.daemon import EXIT_OK
from station.flash import load_firmware
from station.identity import CRASH_ENV, read_secure_cert
from station.identity.ds import DsData
from station.sim import Rig
from station.sim.efuse import EfuseArray, efuse_path
from tests.dskit import (
    DS_CHIPS,
    builds_fixture,
    rig_fixture,
    run_ds_line,
    security_steps,
)
from tests.registrar.awsproxy import AwsProxy, moto_server, reset_moto
from tests.securekit import decrypt_with_fuses, device_line, efuse_file
from tests.stationkit import aws_client, aws_env, aws_registrar
from tests.test_ds import chip_decrypts
from tests.test_secure_cert import write_config
from tests.test_station import Line

pytestmark = pytest.mark.timeout(300)

CSR = 'key_source = "csr"\nmax_attempts = 10\n'


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def proxy(moto_url: str) -> Iterator[AwsProxy]:
    reset_moto(moto_url)
    with AwsProxy(moto_url, from_csr=True) as p:
        yield p


builds = builds_fixture("fw-ds-aws", DS_CHIPS)
rig = rig_fixture(2104)


@pytest.mark.long(cpu=True)  # 16 boards at once
def test_sixteen_ds_boards_register_with_aws_iot_by_csr(
        tmp_path: Path, rig: Rig, proxy: AwsProxy, builds: dict[str, Path]) -> None:
    """The whole flow on a line of 16 boards, S3, C3 and C6 mixed, in parallel; and on
    AWS's side, per board: the CSR verifies and carries the key of the board's DS
    ciphertext, AWS's certificate is ACTIVE on its thing and is the one in the partition."""
    chips = [DS_CHIPS[i % 3] for i in range(16)]
    config = write_config(tmp_path, builds, name="ds-aws-line", credentials="ds = true\n",
                          registrar=aws_registrar(proxy.url, CSR))
    boards = run_ds_line(tmp_path, rig, config, builds, chips, env=aws_env(tmp_path))
    csrs = {x509.load_pem_x509_csr(c.encode()).public_key().public_numbers().n: c  # type: ignore[union-attr]
            for c in proxy.csrs}
    assert len(csrs) == len(chips) == proxy.calls["CreateCertificateFromCsr"]
    with aws_client(proxy.url) as aws:
        active = aws.active()
        for board in boards:
            thing, cid = board.job["thing_name"], board.job["certificate_id"]
            assert cid in active and aws.principals(thing) == [cid]
            assert aws.certificate_pem(cid) == board.cert_pem  # AWS's certificate, as issued
            assert board.n in csrs  # the CSR was signed with it (the proxy verified it)


def _once(line: Line, env: dict[str, str]) -> int:
    line.start("--exit-after", "1", env=env)
    return line.finish()


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
                          credentials="ds = true\n", registrar=aws_registrar(proxy.url, CSR))
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


def test_a_device_key_aws_board_killed_after_its_verified_plaintext_has_one_certificate(
        tmp_path: Path, proxy: AwsProxy) -> None:
    """key = "device" on a DS line registered with AWS IoT by CSR, with the flash's real
    timing: SIGKILL once the plaintext (the partition with AWS's certificate) is
    verified. The restarted station's connect does not wake the chip (first_boot_guard.py),
    nothing is written again and no new CSR is sent; its own reset runs the first boot.
    The board ends done with one HMAC key, one flash-encryption key and one certificate,
    ACTIVE on its thing: the one in its partition."""
    line = device_line(tmp_path, chips=("esp32c3",), secure_cert=True)
    line.extra = {"registrar": {"kind": "aws-iot"},
                  "registrar.aws": {"region": REGION, "endpoint_url": proxy.url,
                                    "policy_name": "station-device",
                                    "policy_document": str(POLICY), "key_source": "csr",
                                    "max_attempts": 10},
                  "credentials": {"out_dir": "certs_out", "format": "esp_secure_cert",
                                  "ds": True}}
    env = aws_env(tmp_path)
    with Rig(line.hub, seed=43, throttle=False, flash_timing=True,
             pty_lines=line.root / "pty-lines.sock") as rig:
        board = rig.plug(chip="esp32c3")
        assert line.run(1, env={**env, CRASH_ENV: "security:plaintext:after"}).code == -9
        again = line.run(1, env=env)
        flash, files = rig.flash(board), efuse_file(rig, board)
    assert again.code == EXIT_OK, again
    last = line.ledger()[-1]
    assert (last["result"], last["boot"]) == ("done", "ok"), last
    assert not {"flash", "verify"} & set(last["timings"]), last["timings"]
    efuses = EfuseArray("esp32c3", files)
    assert len(efuses.blocks_with_purpose("XTS_AES_128_KEY")) == 1
    assert len(efuses.blocks_with_purpose("HMAC_DOWN_DIGITAL_SIGNATURE")) == 1
    assert len(proxy.csrs) == 1 == proxy.calls["CreateCertificateFromCsr"]
    part = load_firmware(FirmwareSection(chip="esp32c3", flasher_args=line.builds["esp32c3"],
                                         images=())).partition("esp_secure_cert")
    stored = flash[part.offset:part.end]
    plain = decrypt_with_fuses("esp32c3", files, stored, part.offset, tmp_path)
    cert = {t.name: t for t in read_secure_cert(plain)}["DEV_CERT"].text()
    with aws_client(proxy.url) as aws:
        assert list(aws.active()) == [last["certificate_id"]]
        assert aws.principals(last["thing_name"]) == [last["certificate_id"]]
        assert aws.certificate_pem(last["certificate_id"]) == cert
