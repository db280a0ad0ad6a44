"""Who signs the images for secure boot v2: a key file, or a PKCS#11 token (an HSM).

Both go through espsecure (`sign_data --version 2`, with `--hsm --hsm-config` for a
token: python-pkcs11, `esptool[hsm]`), so the signature block is exactly what the
bootloader checks. With a token the private key never leaves it: the station asks it
for the public key (its digest is what each board's eFuses get) and for one signature
per image at start. espsecure reports a token's refusal (a wrong PIN, no such key) by
printing `ERROR:` and calling `sys.exit`; that is turned here into the station's
refusal at start, naming the config key and what the token said.

The PIN: espsecure reads `credentials` from the [hsm_config] file and prompts on the
terminal without it, which a daemon has not. The station takes `credentials =
env:NAME` (the PIN from its environment, as the registry's secrets) or a PIN in the
file, and refuses a file without it.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import espsecure  # type: ignore[import-untyped]
from esptool.util import FatalError

from station.errors import FirmwareError

T = TypeVar("T")
ENV = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
HSM_SECTION = "hsm_config"
HSM_OPTIONS = ("pkcs11_lib", "slot", "label")
PKCS11_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:?")
"""espsecure prints a token's refusal as `<class 'pkcs11.exceptions.PinIncorrect'>:`."""


class SignError(Exception):
    """espsecure or the token refused; the text is what they said."""


def _espsecure(call: Callable[[], T]) -> T:
    """Run an espsecure call quietly; its FatalError or sys.exit as SignError."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return call()
    except (FatalError, SystemExit) as e:
        said = [PKCS11_CLASS.sub(r"\1", line.removeprefix("ERROR:")).strip(" :")
                for line in out.getvalue().splitlines() if line.startswith("ERROR")]
        if isinstance(e, FatalError):
            said.insert(0, str(e))
        raise SignError("; ".join(s for s in said if s) or type(e).__name__) from None


@dataclass(frozen=True)
class Signer:
    """Signs and checks images; `public_pem` is what the eFuse digest is made from."""

    what: str  # "sb.pem", "the HSM key 'sb' (hsm.ini)": for messages
    key: str  # the config key to name in a refusal: security.signing_key / hsm_config
    public_pem: bytes
    _sign: Callable[[Path, Path], None]

    @property
    def digest(self) -> str:
        """SHA-256 of the public key as secure boot v2 burns it (hex)."""
        return bytes(espsecure._digest_sbv2_public_key(io.BytesIO(self.public_pem))).hex()

    def sign(self, src: Path, out: Path) -> None:
        """Sign `src` into `out`; SignError if the key or token refuses."""
        self._sign(src, out)

    def verify(self, data: bytes) -> None:
        """SignError unless `data` carries a valid signature by this key."""
        _espsecure(lambda: espsecure.verify_signature_v2(
            False, None, io.BytesIO(self.public_pem), io.BytesIO(data)))


def file_signer(path: Path) -> Signer:
    """A PEM signing key (checked by config/security.py)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key: Any = load_pem_private_key(path.read_bytes(), password=None)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(src: Path, out: Path) -> None:
        with src.open("rb") as data, path.open("rb") as keyfile:
            _espsecure(lambda: espsecure.sign_data("2", [keyfile], str(out), False, False,
                                                   None, [], [], data))
    return Signer(what=path.name, key="security.signing_key", public_pem=public, _sign=sign)


def hsm_settings(path: Path) -> configparser.ConfigParser:
    """The [hsm_config] file as espsecure reads it, with the PIN resolved; ValueError
    names what is wrong (missing section or option, an unset variable, no PIN)."""
    config = configparser.ConfigParser()
    try:
        config.read_string(path.read_text())
    except configparser.Error as e:
        raise ValueError(f"not an espsecure HSM config ({' '.join(str(e).split())})") from None
    if not config.has_section(HSM_SECTION):
        raise ValueError(f"no [{HSM_SECTION}] section (espsecure's HSM config format)")
    missing = [o for o in HSM_OPTIONS if not config.has_option(HSM_SECTION, o)]
    if missing:
        raise ValueError(f"[{HSM_SECTION}] lacks {', '.join(missing)}")
    section = config[HSM_SECTION]
    if not Path(section["pkcs11_lib"]).is_file():
        raise ValueError(f"pkcs11_lib {section['pkcs11_lib']}: no such file (SoftHSM2: "
                         "/usr/lib/softhsm/libsofthsm2.so)")
    pin = section.get("credentials")
    if pin is None:
        raise ValueError("no credentials (the token's PIN): espsecure would prompt for it on "
                         "a terminal the station has not; set credentials = env:NAME and "
                         "the PIN in that environment variable")
    env = ENV.match(pin.strip())
    if env:
        value = os.environ.get(env[1])
        if not value:
            raise ValueError(f"credentials = env:{env[1]}, but {env[1]} is not set in the "
                             "station's environment")
        section["credentials"] = value
    return config


def hsm_signer(path: Path) -> Signer:
    """A key in a PKCS#11 token: its public key read now (a wrong PIN is refused here)."""
    config = hsm_settings(path)
    label = config[HSM_SECTION]["label"]

    def settings() -> io.StringIO:
        text = io.StringIO()
        config.write(text)
        text.seek(0)
        return text

    hsm = _hsm_module()
    [pem_file] = _espsecure(lambda: espsecure.extract_pubkey_from_hsm(
        hsm.read_hsm_config(settings())))
    public = pem_file.read()

    def sign(src: Path, out: Path) -> None:
        with src.open("rb") as data:
            _espsecure(lambda: espsecure.sign_data("2", [], str(out), False, True, settings(),
                                                   [], [], data))
    return Signer(what=f"the HSM key '{label}' ({path.name})", key="security.hsm_config",
                  public_pem=public, _sign=sign)


def _hsm_module() -> Any:
    """espsecure's HSM support needs python-pkcs11 (`esptool[hsm]`)."""
    try:
        import espsecure.esp_hsm_sign as hsm  # type: ignore[import-untyped]
    except ImportError as e:
        raise SignError(str(e)) from None
    return hsm


def signer_for(signing_key: Path | None, hsm_config: Path | None, where: str) -> Signer:
    """The configured signer; FirmwareError names the key and what the token said."""
    try:
        if hsm_config is not None:
            return hsm_signer(hsm_config)
        assert signing_key is not None
        return file_signer(signing_key)
    except (SignError, ValueError) as e:
        key = "security.hsm_config" if hsm_config is not None else "security.signing_key"
        path = hsm_config if hsm_config is not None else signing_key
        hint = "; the token refused the PIN given as credentials (check it: a token locks " \
            "its user PIN after too many wrong ones)" if "PinIncorrect" in str(e) else ""
        raise FirmwareError(where, key, f"{path}: {e}{hint}") from None
