"""DS ciphertext (issue 21): what esp-secure-cert-tool makes, decrypted on the test side
as the chip's DS peripheral does, with the HMAC key.

The chip (ESP-IDF `components/esp_security/src/esp_ds.c`, the TRM's "Digital Signature"
chapter; the tool's `configure_ds.calculate_rsa_ds_params` is the host half): AES-256-CBC
with key HMAC-SHA256(hmac_key, 32 x 0xFF) and the IV, giving Y || M || Rb || MD ||
M' || length || 8 x 0x08 (each number little-endian, padded to the chip's largest RSA
size); the chip refuses to sign when MD != SHA256(Y || M || Rb || M' || length || IV)
(ESP_ERR_HW_CRYPTO_DS_INVALID_DIGEST): that is how a wrong HMAC key shows.
"""

from __future__ import annotations

import datetime
import os
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from station.identity import read_secure_cert
from station.identity.ds import DsData, ds_partition, new_ds_key, wrap_key
from station.identity.registrar.keys import private_key_pem
from station.sim.secure_cert_app import DsError, ds_decrypt


def self_signed(key: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t-ds")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class WrongKey(AssertionError):
    pass


def chip_decrypts(ds: DsData, hmac_key: bytes, chip: str) -> tuple[int, int]:
    """(d, n) as the chip recovers them (the virtual chip's DS peripheral,
    station/sim/secure_cert_app.py); WrongKey where the chip's digest check fails."""
    try:
        d, n, words = ds_decrypt(chip, hmac_key, ds.iv, ds.ciphertext)
    except DsError as e:
        raise WrongKey(f"MD mismatch: the chip reports {e}") from None
    assert words == ds.rsa_bits // 32 - 1
    return d, n


@pytest.mark.parametrize("chip", ["esp32s3", "esp32c3", "esp32c6"])
def test_the_ds_ciphertext_holds_the_key_only_for_its_hmac_key(chip: str) -> None:
    key = new_ds_key()
    hmac_key = os.urandom(32)
    ds = wrap_key(private_key_pem(key), hmac_key, chip, key_id=5)
    d, n = chip_decrypts(ds, hmac_key, chip)
    numbers = key.private_numbers()
    assert (d, n) == (numbers.d, numbers.public_numbers.n)
    message = 0x1234567890ABCDEF
    assert pow(pow(message, d, n), numbers.public_numbers.e, n) == message  # it signs
    with pytest.raises(WrongKey):
        chip_decrypts(ds, os.urandom(32), chip)


def test_the_ds_partition_has_no_private_key() -> None:
    key = new_ds_key()
    ds = wrap_key(private_key_pem(key), os.urandom(32), "esp32s3", key_id=3)
    image = ds_partition(self_signed(key), None, ds, 0x2000)
    tlvs = {t.name: t for t in read_secure_cert(image)}
    assert sorted(tlvs) == ["DEV_CERT", "DS_CONTEXT", "DS_DATA"]
    assert tlvs["DS_DATA"].data == struct.pack("<i", 2048 // 32 - 1) + ds.iv + ds.ciphertext
    # DS_CONTEXT: 4 reserved bytes, the key id, one pad byte, the RSA length
    assert tlvs["DS_CONTEXT"].data == struct.pack("<IBBH", 0, 3, 0, 2048)
    assert DsData.from_json(ds.to_json()) == ds
