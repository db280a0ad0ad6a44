"""The NVS reader against the ESP-IDF generator: every type, multi-page blobs, limits."""

from __future__ import annotations

import io
import struct

import pytest
from esp_idf_nvs_partition_gen import nvs_partition_gen as gen

from station.errors import CredentialsError
from station.identity import NvsFormatError, nvs_region, read_nvs
from station.identity.credentials import nvs_entries, nvs_image
from station.parts import DeviceCredentials


def generate(size: int, namespaces: dict[str, list[tuple[str, str, object]]]) -> bytes:
    out = io.BytesIO()
    nvs = gen.nvs_open(out, size - 4096, gen.Page.VERSION2)
    for ns, entries in namespaces.items():
        gen.write_entry(nvs, ns, "namespace", "", "")
        for key, encoding, value in entries:
            gen.write_entry(nvs, key, "data", encoding, value)
    gen.nvs_close(nvs)
    return out.getvalue()


def test_round_trip_all_types() -> None:
    big = bytes(range(256)) * 40  # 10240 bytes: spans three pages as BLOB_DATA chunks
    image = generate(0x6000, {
        "first": [("u8", "u8", "200"), ("i8", "i8", "-5"), ("u16", "u16", "60000"),
                  ("i16", "i16", "-30000"), ("u32", "u32", "4000000000"),
                  ("i32", "i32", "-2000000000"), ("u64", "u64", str(2**63)),
                  ("i64", "i64", str(-(2**62))), ("s", "string", "hello"),
                  ("long_string", "string", "x" * 3000)],
        "second": [("blob", "binary", big), ("hex", "hex2bin", "deadbeef"),
                   ("s", "string", "other namespace")],
    })
    assert len(image) == 0x6000
    data = read_nvs(image)
    assert data["first"] == {
        "u8": 200, "i8": -5, "u16": 60000, "i16": -30000, "u32": 4000000000,
        "i32": -2000000000, "u64": 2**63, "i64": -(2**62), "s": "hello",
        "long_string": "x" * 3000,
    }
    assert data["second"] == {"blob": big, "hex": bytes.fromhex("deadbeef"),
                              "s": "other namespace"}


def test_corrupt_entry_is_skipped_and_later_write_wins() -> None:
    image = bytearray(generate(0x3000, {"ns": [("a", "u8", "1"), ("b", "string", "keep")]}))
    # entry 1 is "a" (entry 0 is the namespace): flip a key byte so its CRC fails
    image[64 + 32 + 9] ^= 0xFF
    assert read_nvs(bytes(image)) == {"ns": {"b": "keep"}}


def test_not_an_nvs_image() -> None:
    with pytest.raises(NvsFormatError):
        read_nvs(b"\xff" * 100)
    assert read_nvs(b"\xff" * 0x3000) == {}


def creds(**kw: str) -> DeviceCredentials:
    defaults = dict(thing_name="board-0011223344", certificate_pem="C" * 5000,
                    private_key_pem="-----BEGIN PRIVATE KEY-----\nK\n",
                    public_key_pem="P", endpoint="abc-ats.iot.eu-west-1.amazonaws.com")
    defaults.update(kw)
    return DeviceCredentials(**defaults)  # type: ignore[arg-type]


def test_nvs_region_holds_the_credentials() -> None:
    c = creds(ca_pem="CA PEM")
    region = nvs_region(c, 0x9000, 0x6000, "station")
    assert region.offset == 0x9000 and len(region.data) == 0x6000
    data = read_nvs(region.data)["station"]
    assert data["thing_name"] == c.thing_name
    assert data["endpoint"] == c.endpoint
    assert data["cert"] == c.certificate_pem.encode() + b"\0"  # > 4000 B: a blob
    assert data["priv_key"] == c.private_key_pem.encode() + b"\0"
    assert data["ca"] == b"CA PEM\0"
    assert "ca" not in nvs_entries(creds())


def test_nvs_limits() -> None:
    with pytest.raises(CredentialsError, match="multiple of 4096"):
        nvs_region(creds(), 0x9000, 0x5800, "station")
    with pytest.raises(CredentialsError, match="1 to 15"):
        nvs_region(creds(), 0x9000, 0x6000, "a_namespace_too_long")
    with pytest.raises(CredentialsError, match="at most 4000"):
        nvs_region(creds(endpoint="e" * 4000), 0x9000, 0x6000, "station")
    with pytest.raises(CredentialsError, match="do not fit"):
        nvs_region(creds(certificate_pem="C" * 20000), 0x9000, 0x3000, "station")


def test_image_is_padded_with_empty_pages() -> None:
    image = nvs_image({"k": ("string", "v")}, 0x4000, "ns")
    # the last page is left erased for the firmware's garbage collection
    assert image[0x3000:] == b"\xff" * 0x1000
    assert struct.unpack_from("<I", image, 0)[0] == 0xFFFFFFFE  # first page active
