"""[credentials] format = "esp_secure_cert" (issue 21): the credentials in Espressif's
esp_secure_cert partition, made by esp-secure-cert-tool, instead of NVS.

The real `station run` with the local CA on virtual boards of two chips; each board's flash
dump is read back at the esp_secure_cert partition's offset and parsed twice: with the
station's reader (esp_secure_cert_mgr's TLV format, `docs/format.md`) and with the tool's
own parser functions (`esp_secure_cert.tlv_parser`: header, CRC check). The partition must
hold exactly the device certificate certs_out has, the CA's certificate and the private
key, and the NVS partition must stay erased.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from esp_secure_cert import tlv_parser

from station.config import FirmwareSection
from station.daemon import EXIT_OK
from station.demo import make_demo_firmware
from station.flash import FirmwareBundle, load_firmware
from station.identity import read_secure_cert
from station.sim import Rig
from tests.test_station import Line

pytestmark = pytest.mark.timeout(300)

CHIPS = ("esp32", "esp32s3")


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fw")
    return {chip: make_demo_firmware(root / chip, chip=chip, app_size=0x4000, seed=i,
                                     secure_cert=True)
            for i, chip in enumerate(CHIPS)}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "rig", seed=21, throttle=False, flash_timing=False)
    yield rig
    rig.close()


def write_config(root: Path, builds: dict[str, Path]) -> Path:
    entries = "".join(f'[[firmware]]\nchip = "{chip}"\nflasher_args = {json.dumps(str(p))}\n\n'
                      for chip, p in builds.items())
    config = root / "station.toml"
    config.write_text(f"""\
[station]
name = "secure-cert-line"
state_dir = "state"
[ports]
watch = ["{root / 'rig' / 'pci-*'}"]
rescan_interval = 0.2
{entries}[identity]
thing_name = "t-{{mac}}"
[registrar]
kind = "local-ca"
[registrar.local_ca]
dir = "ca"
[credentials]
out_dir = "certs_out"
format = "esp_secure_cert"
""")
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
    try:
        assert line.wait() == EXIT_OK, line.output()[-3000:]
    finally:
        if line.proc is not None and line.proc.poll() is None:
            line.proc.kill()
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
