"""Key and CSR helpers shared by the registrars (EC P-256, PEM, key comparison)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import NameOID


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKeyTypes) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def public_key_pem(key: PublicKeyTypes) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def same_public_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    return spki(a) == spki(b)


def csr_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, common_name: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def key_pair_matches(private_pem: str, public_pem: str) -> bool:
    """Whether the private key file and the public key file are one pair."""
    try:
        private = serialization.load_pem_private_key(private_pem.encode(), password=None)
        public = serialization.load_pem_public_key(public_pem.encode())
    except (ValueError, TypeError):
        return False
    return same_public_key(private.public_key(), public)


def certificate_key_matches(certificate_pem: str, public_pem: str) -> bool | None:
    """Whether the certificate carries this public key; None if the key types differ.

    None is what moto gives for a CSR certificate (it signs a fresh RSA key of its own,
    see MOTO-NOTES #1); against AWS the types always match and this is True or False.
    """
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
        public = serialization.load_pem_public_key(public_pem.encode())
    except (ValueError, TypeError):
        return False
    if _kind(cert.public_key()) != _kind(public):
        return None
    return same_public_key(cert.public_key(), public)


def _kind(key: PublicKeyTypes) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    return type(key).__name__
