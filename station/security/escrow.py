"""The host key kept for failure analysis, only wrapped: `escrow_public_key`.

A returned unit's flash can be read (as ciphertext) but its key is read-protected in
eFuse; whoever holds the escrow's private key (never the station) can unwrap the key
and run `espsecure decrypt-flash-data` on the dump. The station writes the wrapped key
before the key is burned, so every key a board carries has its escrow: RSA-OAEP with
SHA-256 (`cryptography`), the key bytes exactly as espsecure reads a key file, in the
board's certs_out folder (0700) as a 0600 JSON file, written atomically. Nothing else
of the key is ever written.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from station.errors import SecurityError

ESCROW_FILE = "flash_encryption_key.escrow.json"
SCHEME = "RSA-OAEP-SHA256"
_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")  # a thing name, never a path out of out_dir


def wrap(public_pem: bytes, key: bytes) -> bytes:
    """RSA-OAEP (SHA-256) of `key` to the escrow's public key (checked at start:
    config/security.py)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    public: Any = load_pem_public_key(public_pem)
    return bytes(public.encrypt(key, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                  algorithm=hashes.SHA256(), label=None)))


def write_escrow(out_dir: Path, thing: str, facts: dict[str, Any], public_pem: bytes,
                 key: bytes) -> Path:
    """certs_out/<thing>/flash_encryption_key.escrow.json (0600 in 0700); SecurityError
    (the board stays untouched) if it cannot be written."""
    if not _NAME.fullmatch(thing):
        raise SecurityError(f"{thing!r} is not a folder name for the key escrow")
    folder = out_dir / thing
    path = folder / ESCROW_FILE
    body = json.dumps({**facts, "scheme": SCHEME, "public_key_sha256": _sha256(public_pem),
                       "wrapped_key": base64.b64encode(wrap(public_pem, key)).decode()},
                      indent=2).encode()
    tmp = folder / f".{ESCROW_FILE}.{os.getpid()}.tmp"
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o600)
        tmp.replace(path)
        dirfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SecurityError(f"cannot write the key escrow {path}: {e.strerror} (check "
                            f"{out_dir}'s permissions and free space); the key is not "
                            "burned") from None
    return path


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
