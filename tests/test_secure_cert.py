"""[credentials] format = "esp_secure_cert" (issue 21): the credentials in Espressif's
esp_secure_cert partition, made by esp-secure-cert-tool, instead of NVS.

The real `station run` with the local CA on virtual boards of two chips; each board's flash
dump is read back at the esp_secure_cert partition's offset and parsed twice: with the
station's reader (esp_secure_cert_mgr's TLV format, `docs/format.md`) and with the tool's
own parser functions (`esp_secure_cert.tlv_parser`: header, CRC check). The partition must
hold exactly the device certificate certs_out has, the CA's certificate and the private
key, and the NVS partition must stay erased.

With `ds = true` (S3, C3, C6): the key exists only as DS ciphertext for the board's HMAC
key, on a mixed line, on a line of 16 boards (tests/dskit.py holds the checks it shares
with the AWS IoT line), and across a station killed around the HMAC key's burn.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from esp_secure_cert import tlv_parser

from station.config import FirmwareSection
from station.daemon import EXIT_OK
from station.flash import FirmwareBundle, load_firmware
from station.identity import read_secure_cert
from station.sim import Rig
from tests.dskit import (
    DS_CHIPS,
    builds_fixture,
    every_file,
    rig_fixture,
    run_ds_line,
    security_steps,
)
from tests.pgkit import PASSWORD, central_db, pg, pg_env  # noqa: F401  (fixtures)
from tests.test_station import Line

pytestmark = pytest.mark.timeout(300)

CHIPS = ("esp32", "esp32s3")
builds = builds_fixture("fw", CHIPS)
rig = rig_fixture(21)

LOCAL_CA = '[registrar]\nkind = "local-ca"\n[registrar.local_ca]\ndir = "ca"\n'


def write_config(root: Path, builds: dict[str, Path], *, name: str = "secure-cert-line",
                 entry: dict[str, str] | None = None, credentials: str = "",
                 registrar: str = LOCAL_CA) -> Path:
    """A line writing esp_secure_cert partitions (the local CA's unless `registrar` says
    otherwise); `entry` adds a line to one chip's [[firmware]] entry, `credentials` lines
    to [credentials]."""
    entries = "".join(f'[[firmware]]\nchip = "{chip}"\nflasher_args = {json.dumps(str(p))}\n'
                      + (entry or {}).get(chip, "") + "\n" for chip, p in builds.items())
    config = root / "station.toml"
    config.write_text(f"""\
[station]
name = "{name}"
state_dir = "state"
[ports]
watch = ["{root / 'rig' / 'pci-*'}"]
rescan_interval = 0.2
{entries}[identity]
thing_name = "t-{{mac}}"
{registrar}[credentials]
out_dir = "certs_out"
format = "esp_secure_cert"
{credentials}""")
    return config


def tool_parse(image: bytes) -> dict[int, bytes]:
    """The partition as esp-secure-cert-tool's parser reads it: type -> data, every CRC
    checked with its `verify_tlv_integrity`."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset < len(image):
        header, size = tlv_parser.parse_tlv_header(image, offset)
        if header["magic"] != tlv_parser.ESP_SECURE_CERT_TLV_MAGIC:
            break
        total = tlv_parser.get_tlv_total_length(header)
        footer, _ = tlv_parser.parse_tlv_footer(image, offset + total - 4)
        ok, _ = tlv_parser.verify_tlv_integrity(header, image[offset:offset + total], footer)
        assert ok, f"CRC of the TLV at 0x{offset:x}"
        found[header["type"]] = image[offset + size:offset + size + header["length"]]
        offset += total
    return found


def same_key(a: str, b: str) -> bool:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ka, kb = load_pem_private_key(a.encode(), None), load_pem_private_key(b.encode(), None)
    return bool(ka.private_numbers() == kb.private_numbers())  # type: ignore[union-attr]


def test_the_station_writes_esp_secure_cert_partitions(tmp_path: Path, rig: Rig,
                                                       builds: dict[str, Path]) -> None:
    config = write_config(tmp_path, builds)
    bundles: dict[str, FirmwareBundle] = {
        chip: load_firmware(FirmwareSection(chip=chip, flasher_args=p, images=()))
        for chip, p in builds.items()}
    line = Line(root=tmp_path, rig=rig, config=config, bundle=bundles["esp32"])
    line.start("--exit-after", "4")
    boards = [rig.plug(chip=CHIPS[i % 2], index=i) for i in range(4)]
    assert line.finish() == EXIT_OK, line.output()[-3000:]
    jobs = {j["mac"]: j for j in line.jobs()}
    ca = (tmp_path / "ca" / "ca.crt").read_text()
    for board in boards:
        job = jobs[board.mac.replace(":", "")]
        assert job["result"] == "done", job
        bundle = bundles[board.chip]
        part = bundle.partition("esp_secure_cert")
        assert (part.offset, part.size, part.type) == (0xD000, 0x2000, 0x3F)
        flash = rig.flash(board)
        image = flash[part.offset:part.end]
        folder = tmp_path / "certs_out" / job["thing_name"]
        cert = (folder / "certificate.pem.crt").read_text()
        key = (folder / "private.pem.key").read_text()

        tlvs = {t.name: t for t in read_secure_cert(image)}
        assert sorted(tlvs) == ["CA_CERT", "DEV_CERT", "PRIV_KEY"]
        assert tlvs["DEV_CERT"].text() == cert
        assert tlvs["CA_CERT"].text() == ca
        # the tool re-encodes the key as "traditional OpenSSL" PEM (SEC1 for EC), NUL-ended
        assert same_key(tlvs["PRIV_KEY"].text(), key)
        assert tlvs["PRIV_KEY"].flags == 0  # a plain key, not HMAC- or DS-wrapped
        assert (job["credentials"], job["efuse_key_block"]) == ("esp_secure_cert", None)

        by_tool = tool_parse(image)
        assert by_tool == {0: ca.encode() + b"\0", 1: cert.encode() + b"\0",
                           2: tlvs["PRIV_KEY"].data}
        nvs = bundle.partition("nvs")
        assert flash[nvs.offset:nvs.end] == b"\xff" * nvs.size  # no credentials in NVS
    assert "PRIVATE KEY" not in line.output()


def test_reader_refuses_a_damaged_tlv() -> None:
    from station.identity import SecureCertFormatError

    body = b"x" * 5 + b"\0" * 11
    header = struct.pack("<IB3xBBH", 0xBA5EBA11, 0, 1, 0, 5)
    image = header + body + struct.pack("<I", 0) + b"\xff" * 64
    with pytest.raises(SecureCertFormatError, match="DEV_CERT at 0x0: bad CRC"):
        read_secure_cert(image)
    with pytest.raises(SecureCertFormatError, match="no TLV"):
        read_secure_cert(b"\xff" * 0x2000)


# -- ds = true -------------------------------------------------------------------------

ds_builds = builds_fixture("fw-ds", ("esp32", "esp32s3", "esp32c3"))
"""A mixed line: DS on the S3 and the C3, a plain key on the ESP32 (no DS peripheral)."""
sixteen_builds = builds_fixture("fw-ds16", DS_CHIPS)


def write_ds_config(root: Path, builds: dict[str, Path], more: str = "") -> Path:
    """DS for the S3 and C3 entries; the ESP32 entry (no DS peripheral) keeps a plain key
    in its own esp_secure_cert partition: a mixed line. `more`: sections after
    [credentials]."""
    return write_config(root, builds, name="ds-line", credentials="ds = true\n" + more,
                        entry={"esp32": 'credentials = { format = "esp_secure_cert" }\n'})


def test_with_ds_the_key_exists_only_as_the_chips_ciphertext(
        tmp_path: Path, rig: Rig, ds_builds: dict[str, Path], central_db: str) -> None:  # noqa: F811
    """... and the ledgers (local, central) and `station board MAC` say which format and
    key block each board has."""
    from cryptography import x509

    from station.identity.ds import DsData
    from station.sim.efuse import EfuseArray, efuse_path
    from tests.test_ds import chip_decrypts

    config = write_ds_config(tmp_path, ds_builds, f'[ledger]\ncentral = "{central_db}"\n')
    bundles = {chip: load_firmware(FirmwareSection(chip=chip, flasher_args=p, images=()))
               for chip, p in ds_builds.items()}
    line = Line(root=tmp_path, rig=rig, config=config, bundle=bundles["esp32s3"])
    line.start("--exit-after", "6", env=pg_env())
    chips = ("esp32s3", "esp32c3", "esp32", "esp32s3", "esp32c3", "esp32")
    boards = [rig.plug(chip=chip, index=i) for i, chip in enumerate(chips)]
    assert line.finish() == EXIT_OK, line.output()[-3000:]
    jobs = {j["mac"]: j for j in line.jobs()}
    secrets: list[bytes] = []  # every private key and HMAC key, in the forms they could take
    for board in boards:
        mac = board.mac.replace(":", "")
        job = jobs[mac]
        assert job["result"] == "done", job
        part = bundles[board.chip].partition("esp_secure_cert")
        image = rig.flash(board)[part.offset:part.end]
        tlvs = {t.name: t for t in read_secure_cert(image)}
        folder = tmp_path / "certs_out" / job["thing_name"]
        cert_pem = (folder / "certificate.pem.crt").read_text()
        assert tlvs["DEV_CERT"].text() == cert_pem
        assert tlvs["CA_CERT"].text() == (tmp_path / "ca" / "ca.crt").read_text()
        if board.chip == "esp32":
            assert "PRIV_KEY" in tlvs and "DS_DATA" not in tlvs
            assert (job["credentials"], job["efuse_key_block"]) == ("esp_secure_cert", None)
            continue
        assert (job["credentials"], job["efuse_key_block"]) == ("esp_secure_cert",
                                                                 "BLOCK_KEY5")
        assert sorted(tlvs) == ["CA_CERT", "DEV_CERT", "DS_CONTEXT", "DS_DATA"]  # no key
        assert tlvs["DS_CONTEXT"].data == struct.pack("<IBBH", 0, 5, 0, 2048)
        assert not (folder / "private.pem.key").exists()
        # the chip's side: the HMAC key in BLOCK_KEY5 (block 9), read-protected, DS purpose
        efuses = EfuseArray(board.chip, efuse_path(rig.directory, bytes.fromhex(mac)))
        assert efuses.blocks_with_purpose("HMAC_DOWN_DIGITAL_SIGNATURE") == [9]
        assert not efuses.readable(9)
        hmac_key = efuses.block_bytes(9)
        saved = DsData.from_json((folder / "ds_data.json").read_bytes())
        data = tlvs["DS_DATA"].data
        on_flash = DsData(ciphertext=data[20:], iv=data[4:20], rsa_bits=2048, key_id=5,
                          hmac_fingerprint=saved.hmac_fingerprint)
        assert on_flash == saved
        d, n = chip_decrypts(on_flash, hmac_key, board.chip)
        public = x509.load_pem_x509_certificate(cert_pem.encode()).public_key()
        assert n == public.public_numbers().n  # type: ignore[union-attr]
        secrets += [hmac_key, hmac_key.hex().encode(), d.to_bytes(256, "big"),
                    d.to_bytes(256, "little"), f"{d:x}".encode()]
        steps = [(s["step"], s["phase"], s["detail"]) for s in security_steps(line.state, mac)]
        assert steps[0] == ("ds_key", "before", "BLOCK_KEY5 HMAC_DOWN_DIGITAL_SIGNATURE")
        assert steps[1][:2] == ("ds_key", "after") and "BLOCK_KEY5" in steps[1][2]
    assert len(secrets) == 4 * 5
    with psycopg.connect(central_db, password=PASSWORD) as conn:
        assert conn.execute("SELECT max(version) FROM station_schema").fetchone() == (7,)
        shipped = dict(conn.execute("SELECT mac, credentials || ' ' || coalesce("
                                    "efuse_key_block, '-') FROM jobs").fetchall())
    for board in boards:
        ds = "BLOCK_KEY5" if board.chip != "esp32" else "-"
        assert shipped[board.mac.replace(":", "")] == f"esp_secure_cert {ds}", shipped
    for board, shown in ((boards[0], "esp_secure_cert, DS key in BLOCK_KEY5"),
                         (boards[2], "esp_secure_cert")):
        out = subprocess.run([sys.executable, "-m", "station", "board", board.mac, "--config",
                              str(config)], capture_output=True, text=True, timeout=60,
                             env={**pg_env(), "COLUMNS": "400"}, check=True).stdout
        assert "credentials" in out and f"│ {shown} │" in out, out
    for path in every_file(tmp_path):
        if path.is_relative_to(rig.directory) and path.name.startswith("efuse-"):
            continue  # the chip's fuses: where the HMAC key belongs
        content = path.read_bytes()
        for secret in secrets:
            assert secret not in content, f"a key in the clear in {path}"


def _run(line: Line, env: dict[str, str] | None = None) -> int:
    line.start("--exit-after", "1", env=env)
    return line.finish()


@pytest.mark.parametrize("point", ["ds_key:after", "ds_key:before"])
def test_a_station_killed_around_the_hmac_burn_never_burns_a_second_key(
        tmp_path: Path, rig: Rig, ds_builds: dict[str, Path], point: str) -> None:
    """SIGKILL right after the burn's journal line ("after": the key is in the fuses, the
    partition not yet written) or right before the burn ("before": the ciphertext is
    saved, its HMAC key dies with the process): the board ends done with one HMAC key."""
    from cryptography import x509

    from station.identity.ds import DsData
    from station.sim.efuse import EfuseArray, efuse_path
    from tests.test_ds import chip_decrypts

    config = write_ds_config(tmp_path, {"esp32c3": ds_builds["esp32c3"]})
    bundle = load_firmware(FirmwareSection(chip="esp32c3", flasher_args=ds_builds["esp32c3"],
                                           images=()))
    line = Line(root=tmp_path, rig=rig, config=config, bundle=bundle)
    board = rig.plug(chip="esp32c3", index=0)
    mac = board.mac.replace(":", "")
    assert _run(line, {"STATION_TEST_CRASH_AFTER": point}) == -9, line.output()[-2000:]
    journal = [(s["step"], s["phase"]) for s in security_steps(line.state, mac)]
    assert journal[-1] == tuple(point.split(":")), journal
    code = _run(line)
    if point == "ds_key:before":  # the saved ciphertext is void: cleared, plug again
        assert code != EXIT_OK
        assert "DS ciphertext from an interrupted run whose HMAC key was never burned: " \
               "removed; plug the board again" in line.jobs()[-1]["error"]
        code = _run(line)
    assert code == EXIT_OK, line.output()[-3000:]
    job = line.jobs()[-1]
    assert job["result"] == "done", job
    burns = [s for s in security_steps(line.state, mac) if s["phase"] == "after"]
    assert len(burns) == 1, burns  # one HMAC key, whatever the crash point
    efuses = EfuseArray("esp32c3", efuse_path(rig.directory, bytes.fromhex(mac)))
    assert efuses.blocks_with_purpose("HMAC_DOWN_DIGITAL_SIGNATURE") == [9]
    part = bundle.partition("esp_secure_cert")
    tlvs = {t.name: t for t in read_secure_cert(rig.flash(board)[part.offset:part.end])}
    data = tlvs["DS_DATA"].data
    _, n = chip_decrypts(DsData(ciphertext=data[20:], iv=data[4:20], rsa_bits=2048, key_id=5,
                                hmac_fingerprint=""), efuses.block_bytes(9), "esp32c3")
    cert = x509.load_pem_x509_certificate(tlvs["DEV_CERT"].text().encode())
    assert n == cert.public_key().public_numbers().n  # type: ignore[union-attr]


@pytest.mark.long(cpu=True)  # 16 boards at once
def test_sixteen_ds_boards_get_their_keys_from_the_local_ca(
        tmp_path: Path, rig: Rig, sixteen_builds: dict[str, Path]) -> None:
    """The whole DS flow on a line of 16 boards, S3, C3 and C6 mixed, in parallel, with
    the local CA: the checks of the AWS line (tests/dskit.py `run_ds_line`), and the CA's
    certificate in each partition and the CA's signature on each board's certificate."""
    from cryptography import x509

    ca = tmp_path / "ca" / "ca.crt"
    config = write_config(tmp_path, sixteen_builds, name="ds-local-ca-line",
                          credentials="ds = true\n")
    boards = run_ds_line(tmp_path, rig, config, sixteen_builds,
                         [DS_CHIPS[i % 3] for i in range(16)], ca=ca)
    issuer = x509.load_pem_x509_certificate(ca.read_bytes())
    for board in boards:
        x509.load_pem_x509_certificate(board.cert_pem.encode()).verify_directly_issued_by(
            issuer)
    assert len({board.n for board in boards}) == 16  # a key of its own per board
