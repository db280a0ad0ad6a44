"""A board's credentials as Espressif's `esp_secure_cert` partition, made by Espressif's own
esp-secure-cert-tool (PyPI `esp-secure-cert-tool` 2.6.1, espressif/esp_secure_cert_mgr
`tools/`), and a reader of that partition for tests and audits.

Why the tool's library and not its CLI: `configure_esp_secure_cert.py` writes into a fixed
`./esp_secure_cert_data/` folder and takes the key as a file; sixteen boards at once would
need a folder and a key file each. Its library functions (`tlv_format.
generate_partition_no_ds`, `generate_partition_ds`) take paths too, so each board gets a
private 0700 folder that lives only while its partition is made, and the private key
reaches the tool through a pipe (`/dev/fd/N`), never a file. The library `print`s
progress lines (lengths, never key bytes) on stdout, where the live table draws: its
module-level `print` is replaced by a no-op, which silences it alone, from any thread.

The format (esp_secure_cert_mgr `docs/format.md`, `esp_secure_cert_tlv_config.h`): a
series of TLVs from the partition's start, each

    header 12 B   magic u32 0xBA5EBA11, flags u8, reserved 3 B, type u8, subtype u8,
                  length u16
    data          `length` bytes, zero-padded to a multiple of 16
    footer 4 B    crc32 (zlib's, seed 0xffffffff) of header + padded data

ended by erased flash (0xFF). Types: CA_CERT 0, DEV_CERT 1, PRIV_KEY 2, DS_DATA 3,
DS_CONTEXT 4. PEM data carries its NUL terminator, as the tool writes it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from esp_secure_cert import tlv_format

from station.config import BoardCredentials
from station.errors import CredentialsError
from station.identity.credentials import nvs_region
from station.parts import DeviceCredentials, Region

CredentialsImage = Callable[[DeviceCredentials, int, int, str, bytes | None], Region]

tlv_format.print = lambda *args, **kwargs: None  # progress lines on the live table's stdout

TLV_MAGIC = 0xBA5EBA11
TLV_HEADER = struct.Struct("<IB3xBBH")
CA_CERT, DEV_CERT, PRIV_KEY, DS_DATA, DS_CONTEXT = 0, 1, 2, 3, 4
TYPE_NAMES = {CA_CERT: "CA_CERT", DEV_CERT: "DEV_CERT", PRIV_KEY: "PRIV_KEY",
              DS_DATA: "DS_DATA", DS_CONTEXT: "DS_CONTEXT"}
TOOL_SIZE = 0x2000
"""The tool lays every partition out in 0x2000 bytes (tlv_format.py)."""


class SecureCertFormatError(ValueError):
    """The image is not an esp_secure_cert TLV partition (or a TLV in it is damaged)."""


@dataclass(frozen=True)
class Tlv:
    type: int
    flags: int
    subtype: int
    data: bytes

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    def text(self) -> str:
        """A PEM TLV's text without its NUL."""
        return self.data.rstrip(b"\0").decode()


def read_secure_cert(image: bytes) -> list[Tlv]:
    """Every TLV of an esp_secure_cert partition image, in order; a bad CRC is an error
    (esp_secure_cert_mgr refuses such a TLV too)."""
    out: list[Tlv] = []
    offset = 0
    while offset + TLV_HEADER.size <= len(image):
        magic, flags, tlv_type, subtype, length = TLV_HEADER.unpack_from(image, offset)
        if magic != TLV_MAGIC:
            break  # erased flash (or the end of what was written)
        padded = length + (-length % 16)
        end = offset + TLV_HEADER.size + padded
        if end + 4 > len(image):
            raise SecureCertFormatError(f"TLV at 0x{offset:x} runs past the partition")
        (crc,) = struct.unpack_from("<I", image, end)
        if crc != zlib.crc32(image[offset:end], 0xFFFFFFFF) & 0xFFFFFFFF:
            raise SecureCertFormatError(f"TLV {TYPE_NAMES.get(tlv_type, tlv_type)} at "
                                        f"0x{offset:x}: bad CRC")
        data = image[offset + TLV_HEADER.size:offset + TLV_HEADER.size + length]
        out.append(Tlv(type=tlv_type, flags=flags, subtype=subtype, data=data))
        offset = end + 4
    if not out:
        raise SecureCertFormatError("no TLV at the start of the partition (magic 0xBA5EBA11)")
    return out


@contextlib.contextmanager
def pipe_path(data: bytes) -> Iterator[str]:
    """A path that reads `data` once, through a pipe: a secret handed to a library that
    wants a file name, without a file."""
    r, w = os.pipe()
    try:
        if len(data) > 60_000:  # a pipe holds 64 KiB before a write would block
            raise CredentialsError("a key this large does not fit a pipe")
        os.write(w, data)
        os.close(w)
        w = -1
        yield f"/dev/fd/{r}"
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def secure_cert_image(creds: DeviceCredentials, size: int) -> bytes:
    """The partition (ds = false): the device certificate, the CA certificate (when the
    registrar has one) and the private key, `size` bytes, the rest erased (0xFF)."""
    if size < TOOL_SIZE:
        raise CredentialsError(f"the esp_secure_cert partition is 0x{size:x} bytes; the "
                               f"tool writes 0x{TOOL_SIZE:x}")
    with tempfile.TemporaryDirectory(prefix="station-secure-cert-") as folder:
        os.chmod(folder, 0o700)
        where = Path(folder)
        (where / "device.pem").write_text(creds.certificate_pem)
        ca = None
        if creds.ca_pem:
            (where / "ca.pem").write_text(creds.ca_pem)
            ca = str(where / "ca.pem")
        out = where / "esp_secure_cert.bin"
        with pipe_path(creds.private_key_pem.encode()) as key_path:
            key = tlv_format.tlv_priv_key_t(
                tlv_format.tlv_priv_key_type_t.ESP_SECURE_CERT_DEFAULT_FORMAT_KEY,
                key_path, None)
            try:
                tlv_format.generate_partition_no_ds(key, str(where / "device.pem"), ca,
                                                    None, str(out))
            except (ValueError, OSError) as e:
                raise CredentialsError(f"esp-secure-cert-tool could not make the "
                                       f"partition: {e}") from None
        image = out.read_bytes()
        out.unlink()  # it holds the key: gone before the folder is
    return image + b"\xff" * (size - len(image))


def secure_cert_region(creds: DeviceCredentials, partition_offset: int, partition_size: int,
                       namespace: str = "", nvs_keys: bytes | None = None) -> Region:
    """The board's esp_secure_cert partition, whole (stale TLVs erased). `namespace` and
    `nvs_keys` are NVS's and unused: the signature matches `nvs_region`'s, the plan calls
    either."""
    del namespace, nvs_keys
    image = secure_cert_image(creds, partition_size)
    return Region.build("esp-secure-cert", partition_offset, image)


def credentials_image(board: BoardCredentials, chip: str) -> CredentialsImage:
    """How a chip's boards get their credentials partition: [credentials] format (or the
    chip's [[firmware]] entry's). The plan (flash/) is handed this, never identity/."""
    del chip
    if board.format == "nvs":
        return nvs_region
    if board.ds:
        return _made_by_the_ds_step
    return secure_cert_region


def _made_by_the_ds_step(creds: DeviceCredentials, offset: int, size: int,
                         namespace: str, nvs_keys: bytes | None = None) -> Region:
    raise CredentialsError("a DS board's partition is made by its DS step (station/dsboard.py)")
