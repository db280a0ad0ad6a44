"""The [security] section: flash encryption, secure boot v2 and lock-down, off by default.

What can be checked without the firmware is checked here (values, combinations, the
signing key); what needs the images (signatures, the bootloader built for the features,
the ESP32 revision the bootloader asks for) is checked at start by station/security,
before any board is touched. A mistake here costs boards: every refusal names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from station.config._table import Table

FlashEncryption = Literal["off", "development", "release"]
KeySource = Literal["host", "device"]
SecureBoot = Literal["off", "v2"]
XTS_BITS = (128, 256)


@dataclass(frozen=True)
class SecuritySection:
    """[security]: what each board leaves the line with (station/security)."""

    flash_encryption: FlashEncryption = "off"
    key: KeySource = "host"
    """host: a fresh key per board made on the station; device: the bootloader makes it."""
    xts_aes: int = 128
    """AES-XTS key size on chips with AES-XTS: 128 (XTS_AES_128_KEY) or 256 (two blocks)."""
    secure_boot: SecureBoot = "off"
    signing_key: Path | None = None
    """The secure boot v2 signing key (PEM, RSA-3072 or ECDSA); images unsigned at start
    are signed with it, signed ones are checked against it."""
    hsm_config: Path | None = None
    """Instead of signing_key: espsecure's [hsm_config] file for a PKCS#11 token (an HSM;
    SoftHSM2 in tests) that holds the signing key; the key never leaves the token."""
    escrow_public_key: Path | None = None
    """key = "host": each board's key is kept only wrapped to this RSA public key (RSA-OAEP),
    in the board's certs_out folder, for failure analysis of returned units."""
    sign_images: bool = True
    """False: the images must come signed (by the build); an unsigned one is refused."""
    lockdown: bool = False

    @property
    def enabled(self) -> bool:
        return self.flash_encryption != "off" or self.secure_boot != "off" or self.lockdown


def security_section(t: Table) -> SecuritySection:
    fe = cast(FlashEncryption, t.choice("flash_encryption", ("off", "development", "release"),
                                        "off"))
    key = cast(KeySource, t.choice("key", ("host", "device"), "host"))
    xts = t.get("xts_aes", int, 128)
    if xts not in XTS_BITS:
        raise t.error("xts_aes", f"must be 128 or 256, not {xts}")
    sb = cast(SecureBoot, t.choice("secure_boot", ("off", "v2"), "off"))
    signing_key = t.path("signing_key", Path()) if "signing_key" in t.data else None
    hsm_config = t.path("hsm_config", Path()) if "hsm_config" in t.data else None
    escrow = t.path("escrow_public_key", Path()) if "escrow_public_key" in t.data else None
    sign_images = t.get("sign_images", bool, True)
    lockdown = t.get("lockdown", bool, False)
    t.done()
    if lockdown and fe == "development":
        raise t.error("lockdown", "lock-down burns the release-mode eFuses, which development "
                      "mode exists to leave open: set flash_encryption = \"release\" or "
                      "lockdown = false")
    if key == "device" and (lockdown or sb != "off"):
        raise t.error("key", "\"device\": the bootloader makes the key and encrypts on first "
                      "boot, and burns the release-mode eFuses itself (a build for release "
                      "mode); this station does not add secure boot or its own lock-down "
                      "to it: set secure_boot = \"off\" and lockdown = false, or key = "
                      "\"host\"")
    if fe == "release" and not lockdown and key == "host":
        raise t.error("flash_encryption", "\"release\" without lockdown = true leaves the "
                      "download mode able to read and write plaintext (the app reports "
                      "DEVELOPMENT mode): set lockdown = true, or use \"development\"")
    if key == "device" and fe == "off":
        raise t.error("key", "\"device\" is a flash-encryption key source: set "
                      "flash_encryption too")
    if escrow is not None:
        if fe == "off" or key != "host":
            raise t.error("escrow_public_key", "escrows the host-made flash-encryption key: "
                          "needs flash_encryption on and key = \"host\"")
        _check_readable(t, "escrow_public_key", escrow)
        _check_escrow_key(t, escrow)
    if xts != 128 and fe == "off":
        raise t.error("xts_aes", "a flash-encryption key size: set flash_encryption too")
    if sb == "v2":
        if signing_key is not None and hsm_config is not None:
            raise t.error("hsm_config", "given with signing_key: the images are signed by "
                          "one or the other; remove one")
        if hsm_config is not None:
            _check_readable(t, "hsm_config", hsm_config)
        elif signing_key is None:
            raise t.error("signing_key", "secure_boot = \"v2\" needs the signing key "
                          "(espsecure generate-signing-key --version 2 --scheme rsa3072 KEY)"
                          ", or hsm_config for a key in an HSM")
        else:
            _check_signing_key(t, signing_key)
    elif signing_key is not None or hsm_config is not None:
        name = "signing_key" if signing_key is not None else "hsm_config"
        raise t.error(name, "given but secure_boot is \"off\": set secure_boot = "
                      "\"v2\" or remove the key")
    return SecuritySection(flash_encryption=fe, key=key, xts_aes=xts, secure_boot=sb,
                           signing_key=signing_key, hsm_config=hsm_config,
                           escrow_public_key=escrow,
                           sign_images=sign_images, lockdown=lockdown)


def _check_readable(t: Table, name: str, path: Path) -> None:
    if not path.is_file():
        raise t.error(name, f"{path}: no such file")
    try:
        path.read_bytes()
    except OSError as e:
        raise t.error(name, f"{path}: cannot be read ({e.strerror})") from None


def _check_signing_key(t: Table, path: Path) -> None:
    """The key must be there, readable, private and of a scheme secure boot v2 takes."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if not path.is_file():
        raise t.error("signing_key", f"{path}: no such file")
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise t.error("signing_key", f"{path}: cannot be read ({e.strerror})") from None
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise t.error("signing_key", f"{path}: not an unencrypted PEM private key ({e}); "
                      "make one with espsecure generate-signing-key --version 2 "
                      "--scheme rsa3072") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size != 3072:
            raise t.error("signing_key", f"{path}: RSA-{key.key_size}; secure boot v2 "
                          "takes RSA-3072 only")
        return
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in (
            "secp192r1", "secp256r1", "secp384r1"):
        return
    raise t.error("signing_key", f"{path}: {type(key).__name__} is not a secure boot v2 "
                  "scheme (RSA-3072, ECDSA P-192/P-256/P-384)")


def _check_escrow_key(t: Table, path: Path) -> None:
    """An RSA public key of 2048 bits or more (RSA-OAEP wraps the 32- or 64-byte key)."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError) as e:
        raise t.error("escrow_public_key", f"{path}: not a PEM public key ({e}); export "
                      "one with openssl rsa -pubout") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        what = f"RSA-{key.key_size}" if isinstance(key, rsa.RSAPublicKey) else \
            type(key).__name__
        raise t.error("escrow_public_key", f"{path}: {what}; the escrow takes an RSA public "
                      "key of 2048 bits or more (RSA-OAEP)")
