"""What an app built with esp_secure_cert_mgr prints at start about its credentials.

An app that reads its credentials with Espressif's esp_secure_cert_mgr and says so on its
console, as the component's example does (espressif/esp_secure_cert_mgr
`examples/esp_secure_cert_app/main/app_main.c`, `test_read_existing_data`; its README's
"Example Output"): the device certificate and the CA certificate (`Device Cert (PEM):`,
`Length: N`), then with the Digital Signature peripheral `Successfully obtained the ds
context`, `The value of rsa length is 2048`, `The value of efuse key id is 5`, a signature
made by the DS peripheral and verified with the certificate's key (`Ciphertext validated
succcessfully`, the example's spelling), or without DS `Private Key (PEM):` and the
key checked against the certificate; and last `Successfully obtained and verified the
contents of esp_secure_cert partition`, or `Failed to obtain and verify the contents of
the esp_secure_cert partition` (ESP_LOGE) when anything failed. The component's own lines
come first (`srcs/esp_secure_cert_read.c` `esp_secure_cert_get_partition`: `Pre-provisioned
partition information:`, `partition format: CUST_FLASH_TLV, partition name:
esp_secure_cert`; `srcs/esp_secure_cert_tlv_read.c`: `Partition not found.`).

Which apps: an image carrying the example's final format string (ESP-IDF compiles log
format strings into the app's DROM), as a build with the component and that code would.
The PEM bodies the example prints after each `Length:` line are left out (the station
keeps the console's last lines in its ledger; a private key printed there would leak
into it). Which branch (DS or not) follows the partition's content, where a real app is
built for one; a DS app on a partition without DS data prints the DS failure the same.

The DS peripheral as the chip runs it (ESP-IDF `components/esp_hw_support/esp_ds.c`,
the TRM's Digital Signature chapter; the arithmetic esp-secure-cert-tool's
`configure_ds.calculate_rsa_ds_params` inverts): the key block named by DS_CONTEXT's key
id must have the purpose HMAC_DOWN_DIGITAL_SIGNATURE; AES-256 key = HMAC-SHA256(that
block, 32 x 0xFF); AES-CBC over the ciphertext gives Y | M | Rb (each the chip's largest
RSA size), an MD (SHA-256 over Y | M | Rb | M' | length | IV) and M', length; a wrong MD
is ESP_ERR_HW_CRYPTO_DS_INVALID_DIGEST. The signature is Z = X^Y mod M.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from esp_secure_cert import configure_ds, tlv_parser

APP_USES = b"Successfully obtained and verified the contents of esp_secure_cert partition"
"""The example's last format string: in an app's image when it reads its credentials."""
TAG = "esp_secure_cert_app"
LABEL = "esp_secure_cert"
CA_CERT, DEV_CERT, PRIV_KEY, DS_DATA, DS_CONTEXT = 0, 1, 2, 3, 4
DS_PURPOSE = "HMAC_DOWN_DIGITAL_SIGNATURE"
KEY_BLOCK0 = 4  # BLOCK_KEY0 is eFuse block 4 on every chip with DS


class Log(Protocol):
    def i(self, tag: str, text: str, level: str = "I") -> None: ...

    def e(self, tag: str, text: str) -> None: ...


class DsError(Exception):
    """The DS peripheral refuses (its ESP-IDF error name)."""


def read_tlvs(image: bytes) -> dict[int, bytes]:
    """The partition's TLVs as esp-secure-cert-tool's parser reads them (CRC checked);
    reading stops at the first that is not a TLV, as esp_secure_cert_mgr's does."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 16 <= len(image):
        header, size = tlv_parser.parse_tlv_header(image, offset)
        if header["magic"] != tlv_parser.ESP_SECURE_CERT_TLV_MAGIC:
            break
        total = tlv_parser.get_tlv_total_length(header)
        if offset + total > len(image):
            break
        footer, _ = tlv_parser.parse_tlv_footer(image, offset + total - 4)
        ok, _ = tlv_parser.verify_tlv_integrity(header, image[offset:offset + total], footer)
        if not ok:
            break
        found.setdefault(header["type"], image[offset + size:offset + size + header["length"]])
        offset += total
    return found


def ds_decrypt(chip: str, hmac_key: bytes, iv: bytes,
               ciphertext: bytes) -> tuple[int, int, int]:
    """(Y, M, length): the private exponent, the modulus and the length word (RSA bits /
    32 - 1) the DS peripheral recovers."""
    width = max(configure_ds.supported_key_size_rsa[chip]) // 8
    aes = hmac.new(hmac_key, b"\xff" * 32, hashlib.sha256).digest()
    dec = Cipher(algorithms.AES(aes), modes.CBC(iv)).decryptor()
    p = dec.update(ciphertext) + dec.finalize()
    y, m, rb = p[:width], p[width:2 * width], p[2 * width:3 * width]
    md, tail = p[3 * width:3 * width + 32], p[3 * width + 32:3 * width + 40]
    if hashlib.sha256(y + m + rb + tail + iv).digest() != md:
        raise DsError("ESP_ERR_HW_CRYPTO_DS_INVALID_DIGEST")
    return int.from_bytes(y, "little"), int.from_bytes(m, "little"), \
        struct.unpack("<II", tail)[1]


def _ds_signs(chip: str, efuses: Any, tlvs: dict[int, bytes], cert: x509.Certificate) -> bool:
    data, context = tlvs[DS_DATA], tlvs[DS_CONTEXT]
    _, key_id, _, _bits = struct.unpack_from("<IBBH", context)
    block = KEY_BLOCK0 + key_id
    if efuses is None or block not in efuses.blocks_with_purpose(DS_PURPOSE):
        raise DsError("ESP_ERR_HW_CRYPTO_DS_HMAC_FAIL")
    d, n, _ = ds_decrypt(chip, efuses.block_bytes(block), data[4:20], data[20:])
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    public = key.public_numbers()
    x = int.from_bytes(hashlib.sha256(b"esp_secure_cert_app").digest(), "big")
    return bool(public.n == n and pow(pow(x, d, n), public.e, n) == x)


def app_lines(log: Log, chip: str, app: bytes, table: Sequence[Any], flash: bytes,
              efuses: Any) -> None:
    """The app's credential lines, if it is built with esp_secure_cert_mgr."""
    if APP_USES not in app:
        return
    part = next((p for p in table if p.label == LABEL), None)
    tlvs = read_tlvs(flash[part.offset:part.offset + part.size]) if part else {}
    if part is None:
        log.e("esp_secure_cert_tlv", "Partition not found.")
    elif tlvs:
        log.i("esp_secure_cert", "Pre-provisioned partition information:")
        log.i("esp_secure_cert", f"partition format: CUST_FLASH_TLV, partition name: {LABEL}")
    ok = DEV_CERT in tlvs
    for kind, name, what in ((DEV_CERT, "Device Cert", "device cert"),
                             (CA_CERT, "CA Cert", "ca_cert")):
        if kind in tlvs:
            log.i(TAG, f"{name} (PEM): \nLength: {len(tlvs[kind])}")
        else:
            log.e(TAG, f"Failed to obtain flash address of {what}")
    cert = None
    if ok:
        try:
            cert = x509.load_pem_x509_certificate(tlvs[DEV_CERT].rstrip(b"\0"))
        except ValueError:
            ok = False
    if DS_DATA in tlvs and DS_CONTEXT in tlvs:
        _, key_id, _, bits = struct.unpack_from("<IBBH", tlvs[DS_CONTEXT])
        log.i(TAG, "Successfully obtained the ds context")
        log.i(TAG, f"The value of rsa length is {bits}")
        log.i(TAG, f"The value of efuse key id is {key_id}")
        try:
            ok = ok and cert is not None and _ds_signs(chip, efuses, tlvs, cert)
        except DsError as e:
            log.e(TAG, f"Failed to sign the data with rsa key, returned {e}")
            ok = False
        if ok:
            log.i(TAG, "Ciphertext validated succcessfully")
        else:
            log.e(TAG, "Failed to validate ciphertext")
    elif PRIV_KEY in tlvs:
        log.i(TAG, f"Private Key (PEM): \nLength: {len(tlvs[PRIV_KEY])}")
        ok = ok and cert is not None and _key_matches(tlvs[PRIV_KEY], cert)
        if not ok:
            log.e(TAG, "Failed to validate the private key and device certificate")
    else:
        log.e(TAG, "Failed to obtain flash address of private_key")
        ok = False
    if ok:
        log.i(TAG, "Successfully obtained and verified the contents of esp_secure_cert "
              "partition")
    else:
        log.e(TAG, "Failed to obtain and verify the contents of the esp_secure_cert partition")


def _key_matches(pem: bytes, cert: x509.Certificate) -> bool:
    try:
        key = serialization.load_pem_private_key(pem.rstrip(b"\0"), None)
    except (ValueError, TypeError):
        return False
    return bool(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) ==
        cert.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo))
