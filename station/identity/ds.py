"""The private key as Digital Signature ciphertext (`[credentials] ds = true`).

The DS peripheral (ESP32-S2/S3/C3/C5/C6/H2/P4) signs with an RSA key it decrypts inside
the chip: the key's parameters are AES-256-CBC ciphertext under a key the chip derives
from an HMAC key burned into an eFuse key block with purpose HMAC_DOWN_DIGITAL_SIGNATURE
(read-protected: software never sees it). The host makes that ciphertext once, knowing
both keys, and then forgets both. Espressif's esp-secure-cert-tool does the arithmetic
(`configure_ds.calculate_rsa_ds_params`: Y, M, Rb, M', length, an MD over them and the IV,
encrypted with AES key = HMAC-SHA256(hmac_key, 32 x 0xFF)) and lays out the partition
(`tlv_format.generate_partition_ds`: DEV_CERT, CA_CERT, DS_DATA = rsa_len/32-1 u32 + IV +
ciphertext, DS_CONTEXT = 4 reserved bytes, key id u8, pad u8, rsa_len u16).

Why it looks like this: the tool reads keys from file names and `sys.exit`s on a bad
one. The key goes through a pipe (`securecert.pipe_path`), never a file, and this module
checks what the tool would exit on (an RSA key, a size the chip takes) before calling it.
`DsData` is what certs_out keeps instead of the key: usable only by the one chip whose
eFuse holds the HMAC key, so it is safe on disk and lets an interrupted board be finished
without any key in the clear.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from esp_secure_cert import configure_ds, tlv_format

from station.errors import CredentialsError
from station.identity.securecert import TOOL_SIZE, pipe_path

configure_ds.print = lambda *args, **kwargs: None  # the tool's progress lines: not on stdout

DS_KEY_BITS = 2048
"""The RSA size the station makes for DS boards: every DS chip takes it (the tool's
`supported_key_size_rsa`), and AWS IoT accepts it."""
HMAC_PURPOSE = "HMAC_DOWN_DIGITAL_SIGNATURE"


def new_ds_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=DS_KEY_BITS)


def hmac_fingerprint(hmac_key: bytes) -> str:
    """What the journal and certs_out say of an HMAC key: a hash, never the key."""
    return hashlib.sha256(b"station-ds-hmac:" + hmac_key).hexdigest()[:16]


@dataclass(frozen=True)
class DsData:
    """The DS parameters of one board: ciphertext, IV, RSA size, key block."""

    ciphertext: bytes
    iv: bytes
    rsa_bits: int
    key_id: int  # BLOCK_KEYn -> n
    hmac_fingerprint: str

    def to_json(self) -> bytes:
        return (json.dumps({"ciphertext": self.ciphertext.hex(), "iv": self.iv.hex(),
                            "rsa_bits": self.rsa_bits, "key_id": self.key_id,
                            "hmac_fingerprint": self.hmac_fingerprint},
                           indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DsData:
        d = json.loads(raw)
        return cls(ciphertext=bytes.fromhex(d["ciphertext"]), iv=bytes.fromhex(d["iv"]),
                   rsa_bits=int(d["rsa_bits"]), key_id=int(d["key_id"]),
                   hmac_fingerprint=str(d["hmac_fingerprint"]))


def wrap_key(private_key_pem: str, hmac_key: bytes, chip: str, key_id: int) -> DsData:
    """The RSA key as this chip's DS ciphertext under `hmac_key` (the tool's arithmetic)."""
    key = load_pem_private_key(private_key_pem.encode(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialsError("ds = true needs an RSA key; the registrar made "
                               f"{type(key).__name__}")
    sizes = configure_ds.supported_key_size_rsa.get(chip)
    if sizes is None or key.key_size not in sizes:
        raise CredentialsError(f"{chip} has no RSA-{key.key_size} Digital Signature "
                               f"(sizes: {sizes})")
    if len(hmac_key) != 32:
        raise CredentialsError("an HMAC key is 32 bytes")
    with pipe_path(private_key_pem.encode()) as path:
        c, iv, bits = configure_ds.calculate_rsa_ds_params(path, None, hmac_key, chip)
    return DsData(ciphertext=bytes(c), iv=bytes(iv), rsa_bits=int(bits), key_id=key_id,
                  hmac_fingerprint=hmac_fingerprint(hmac_key))


def ds_partition(certificate_pem: str, ca_pem: str | None, ds: DsData, size: int) -> bytes:
    """The esp_secure_cert partition with DS data: no private key in it."""
    if size < TOOL_SIZE:
        raise CredentialsError(f"the esp_secure_cert partition is 0x{size:x} bytes; the "
                               f"tool writes 0x{TOOL_SIZE:x}")
    with tempfile.TemporaryDirectory(prefix="station-secure-cert-") as folder:
        where = Path(folder)
        (where / "device.pem").write_text(certificate_pem)
        ca = None
        if ca_pem:
            (where / "ca.pem").write_text(ca_pem)
            ca = str(where / "ca.pem")
        out = where / "esp_secure_cert.bin"
        try:
            tlv_format.generate_partition_rsa_ds(ds.ciphertext, ds.iv, ds.key_id, ds.rsa_bits,
                                                 str(where / "device.pem"), ca, str(out))
        except (ValueError, OSError) as e:
            raise CredentialsError(f"esp-secure-cert-tool could not make the partition: "
                                   f"{e}") from None
        image = out.read_bytes()
    return image + b"\xff" * (size - len(image))
