"""A board's credentials on the station's disk (certs_out/) and on the board (NVS image).

`CredentialStore` keeps, per thing, the seed's three files plus a small JSON record:

    certs_out/<thing>/certificate.pem.crt   the device certificate
    certs_out/<thing>/private.pem.key       the device key (0600; optional once verified)
    certs_out/<thing>/public.pem.key        its public key
    certs_out/<thing>/registration.json     certificate id/ARN, endpoint, thing, MAC, ...

Every file is written with aiofiles (the loop never blocks on disk) and atomically: a
temporary file in the same folder, fsync, rename over the old one, fsync of the folder,
so a crash leaves either the old file or the new one, never half of either. Folders are
0700 and keys 0600. Nothing here logs a key or a certificate.

`nvs_region` turns credentials into the NVS data partition the firmware reads (built
with esp-idf-nvs-partition-gen); see docs/registration.md for the layout.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from station.errors import CredentialsError
from station.parts import DeviceCredentials, Region

log = logging.getLogger("station.credentials")

CERTIFICATE_FILE = "certificate.pem.crt"
PRIVATE_KEY_FILE = "private.pem.key"
PUBLIC_KEY_FILE = "public.pem.key"
RECORD_FILE = "registration.json"
DS_FILE = "ds_data.json"
"""[credentials] ds: the key as the board's DS ciphertext (identity/ds.py), in place of
private.pem.key: usable only by the chip whose eFuse holds the HMAC key."""

_fsync = aiofiles.os.wrap(os.fsync)
_chmod = aiofiles.os.wrap(os.chmod)
_THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_tmp_names = itertools.count()


@dataclass
class RegistrationRecord:
    """registration.json: what the station knows about a thing's certificate.

    `status` is "pending" from the moment the key is on disk until the certificate is
    active, then "active". `history` lists every certificate id the station ever made
    for this thing: that is how a certificate found on the thing is known to be
    station-made (and so may be revoked and replaced).
    """

    thing_name: str
    registrar: str
    status: str = "pending"
    certificate_id: str | None = None
    certificate_arn: str | None = None
    endpoint: str | None = None
    mac: str | None = None
    chip: str | None = None
    key_source: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    private_key_dropped: bool = False
    history: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RegistrationRecord:
        data: dict[str, Any] = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class CredentialStore:
    """certs_out/: one 0700 folder per thing; the worker and the registrars share one."""

    def __init__(self, out_dir: Path | str) -> None:
        self.out_dir = Path(out_dir)

    def __repr__(self) -> str:
        return f"CredentialStore({str(self.out_dir)!r})"

    def folder(self, thing_name: str) -> Path:
        if not _THING_RE.fullmatch(thing_name):  # never let a name walk out of out_dir
            raise CredentialsError(f"{thing_name!r} is not a valid thing name for a folder")
        return self.out_dir / thing_name

    # -- writing -------------------------------------------------------------------

    async def write_key(self, thing_name: str, private_key_pem: str,
                        public_key_pem: str) -> None:
        """The key pair, on disk before any cloud call that could make a certificate."""
        folder = await self._folder(thing_name)
        await self._write(folder / PRIVATE_KEY_FILE, private_key_pem.encode(), secret=True)
        await self._write(folder / PUBLIC_KEY_FILE, public_key_pem.encode(), secret=False)

    async def write_public_key(self, thing_name: str, public_key_pem: str) -> None:
        """A DS board's key pair, of which only the public half ever reaches a disk."""
        folder = await self._folder(thing_name)
        await self._write(folder / PUBLIC_KEY_FILE, public_key_pem.encode(), secret=False)

    async def write_ds(self, thing_name: str, ds_json: bytes) -> None:
        """The DS ciphertext (durable before the HMAC key is burned: identity/ds.py)."""
        folder = await self._folder(thing_name)
        await self._write(folder / DS_FILE, ds_json, secret=True)

    async def read_ds(self, thing_name: str) -> bytes | None:
        return await self._read(self.folder(thing_name) / DS_FILE)

    async def remove_ds(self, thing_name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self.folder(thing_name) / DS_FILE)

    async def write_certificate(self, thing_name: str, certificate_pem: str) -> None:
        folder = await self._folder(thing_name)
        await self._write(folder / CERTIFICATE_FILE, certificate_pem.encode(), secret=False)

    async def write_record(self, record: RegistrationRecord) -> None:
        folder = await self._folder(record.thing_name)
        record.updated_at = time.time()
        await self._write(folder / RECORD_FILE, record.to_json(), secret=False)

    async def save(self, creds: DeviceCredentials, record: RegistrationRecord) -> None:
        """All four files at once (a registrar that makes the key and the certificate together)."""
        await self.write_key(creds.thing_name, creds.private_key_pem, creds.public_key_pem)
        await self.write_certificate(creds.thing_name, creds.certificate_pem)
        await self.write_record(record)

    async def forget_private_key(self, thing_name: str) -> None:
        """Drop the private key once the board holds and verified it (keep_private_keys=false).

        The record notes it, so a later registration of the same board knows the station
        can no longer hand out this certificate and replaces it.
        """
        folder = self.folder(thing_name)
        path = folder / PRIVATE_KEY_FILE
        try:
            await aiofiles.os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CredentialsError(f"cannot remove {path}: {e.strerror}") from None
        record = await self.read_record(thing_name)
        if record is not None:
            record.private_key_dropped = True
            await self.write_record(record)
        await self._fsync_dir(folder)
        log.info("%s: private key removed from the station", thing_name)

    async def remove_certificate(self, thing_name: str) -> None:
        """Forget a certificate that was revoked (its key and record stay for history)."""
        path = self.folder(thing_name) / CERTIFICATE_FILE
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(path)

    # -- reading -------------------------------------------------------------------

    async def read_record(self, thing_name: str) -> RegistrationRecord | None:
        raw = await self._read(self.folder(thing_name) / RECORD_FILE)
        if raw is None:
            return None
        try:
            return RegistrationRecord.from_json(raw)
        except (ValueError, TypeError) as e:
            log.warning("%s: unreadable %s (%s); treated as absent", thing_name, RECORD_FILE, e)
            return None

    async def read_text(self, thing_name: str, name: str) -> str | None:
        raw = await self._read(self.folder(thing_name) / name)
        return raw.decode() if raw is not None else None

    async def read_credentials(self, thing_name: str,
                               private_key: str | None = None) -> DeviceCredentials | None:
        """The stored credentials of a thing, if the station holds all of them.

        ``private_key`` stands in for the key file of a DS board, whose key is never
        stored in the clear: its certs_out folder keeps the certificate and public key.
        """
        record = await self.read_record(thing_name)
        cert = await self.read_text(thing_name, CERTIFICATE_FILE)
        key = private_key if private_key is not None else await self.read_text(
            thing_name, PRIVATE_KEY_FILE)
        public = await self.read_text(thing_name, PUBLIC_KEY_FILE)
        if record is None or cert is None or key is None or public is None:
            return None
        return DeviceCredentials(thing_name=thing_name, certificate_pem=cert,
                                 private_key_pem=key, public_key_pem=public,
                                 endpoint=record.endpoint or "",
                                 certificate_id=record.certificate_id,
                                 certificate_arn=record.certificate_arn)

    # -- the atomic write ------------------------------------------------------------

    async def _folder(self, thing_name: str) -> Path:
        folder = self.folder(thing_name)
        try:
            await aiofiles.os.makedirs(self.out_dir, mode=0o700, exist_ok=True)
            await aiofiles.os.makedirs(folder, mode=0o700, exist_ok=True)
            await _chmod(folder, 0o700)  # makedirs honours the umask; make it exact
        except OSError as e:
            raise CredentialsError(f"cannot create {folder}: {e.strerror} (check the "
                                   f"permissions of {self.out_dir} and free space)") from None
        return folder

    async def _write(self, path: Path, data: bytes, *, secret: bool) -> None:
        mode = 0o600 if secret else 0o644
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_tmp_names)}.tmp")

        def opener(name: str, flags: int) -> int:
            return os.open(name, flags | os.O_EXCL, mode)

        try:
            try:
                async with aiofiles.open(tmp, "wb", opener=opener) as f:
                    await f.write(data)
                    await f.flush()
                    await _fsync(f.fileno())
                await _chmod(tmp, mode)
                await aiofiles.os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    await aiofiles.os.remove(tmp)
                raise
            await self._fsync_dir(path.parent)
        except OSError as e:
            reason = e.strerror or str(e)
            raise CredentialsError(f"cannot write {path}: {reason} (check free space and "
                                   f"the permissions of {path.parent})") from None

    async def _fsync_dir(self, folder: Path) -> None:
        fd = await _open_dir(folder)
        try:
            await _fsync(fd)
        finally:
            os.close(fd)

    async def _read(self, path: Path) -> bytes | None:
        try:
            async with aiofiles.open(path, "rb") as f:
                return await f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CredentialsError(f"cannot read {path}: {e.strerror}") from None


_open_dir: Callable[[Path], Any] = aiofiles.os.wrap(
    lambda p: os.open(p, os.O_RDONLY | os.O_DIRECTORY))


# -- the NVS partition ---------------------------------------------------------------

NVS_KEY_MAX = 15
"""NVS keys and namespaces are at most 15 characters (16 with the NUL)."""
NVS_STRING_MAX = 4000
"""A string entry (and any entry on a V1 partition) holds at most 4000 bytes incl. NUL."""
NVS_PAGE = 4096


def nvs_entries(creds: DeviceCredentials) -> dict[str, tuple[str, str | bytes]]:
    """key -> (NVS encoding, value) of what a board gets.

    thing_name and endpoint are strings (nvs_get_str). The PEMs are blobs (nvs_get_blob)
    because a certificate chain can exceed the 4000-byte string limit; each blob holds
    the PEM text followed by one NUL byte, so the firmware can hand the buffer and its
    length straight to esp-tls / mbedTLS, which want NUL-terminated PEM.
    """
    entries: dict[str, tuple[str, str | bytes]] = {
        "thing_name": ("string", creds.thing_name),
        "endpoint": ("string", creds.endpoint),
        "cert": ("binary", creds.certificate_pem.encode() + b"\0"),
        "priv_key": ("binary", creds.private_key_pem.encode() + b"\0"),
    }
    if creds.ca_pem:
        entries["ca"] = ("binary", creds.ca_pem.encode() + b"\0")
    return entries


NVS_KEYS_SIZE = 64
"""NVS encryption's XTS key pair: the data key then the tweak key, 32 bytes each
(nvs_flash `nvs_sec_cfg_t`; esp-idf-nvs-partition-gen's `generate_key`)."""


def nvs_image(entries: dict[str, tuple[str, str | bytes]], size: int, namespace: str,
              nvs_keys: bytes | None = None) -> bytes:
    """An NVS partition image of `size` bytes with `entries` in `namespace` (format V2).

    `nvs_keys`: NVS encryption (ESP-IDF's flash-encryption-based scheme): every entry is
    XTS-AES ciphertext under these keys, tweaked by its address in the partition, made
    by the generator's own encryption (`nvs_open(..., is_encrypt=True, key=...)`, what
    `nvs_partition_gen.py encrypt --inputkey` runs); page headers and state bitmaps stay
    plain, as nvs_flash reads them."""
    from esp_idf_nvs_partition_gen import nvs_partition_gen as gen

    if size % NVS_PAGE or size < 3 * NVS_PAGE:
        raise CredentialsError(f"an NVS partition must be a multiple of 4096 bytes and at "
                               f"least 0x3000; the partition table gives 0x{size:x}")
    for key in (namespace, *entries):
        if not 1 <= len(key.encode()) <= NVS_KEY_MAX:
            raise CredentialsError(f"NVS key or namespace {key!r} must be 1 to {NVS_KEY_MAX} "
                                   "bytes")
    for key, (encoding, value) in entries.items():
        n = len(value.encode()) + 1 if isinstance(value, str) else len(value)
        if encoding == "string" and n > NVS_STRING_MAX:
            raise CredentialsError(f"NVS string {key!r} is {n} bytes; at most "
                                   f"{NVS_STRING_MAX}")
    out = io.BytesIO()
    try:
        # One page is kept empty: NVS needs it to garbage-collect on the board.
        if nvs_keys is not None and len(nvs_keys) != NVS_KEYS_SIZE:
            raise CredentialsError(f"NVS encryption keys are {NVS_KEYS_SIZE} bytes, not "
                                   f"{len(nvs_keys)}")
        nvs = gen.nvs_open(out, size - NVS_PAGE, gen.Page.VERSION2,
                           is_encrypt=nvs_keys is not None, key=nvs_keys)
        gen.write_entry(nvs, namespace, "namespace", "", "")
        for key, (encoding, value) in entries.items():
            gen.write_entry(nvs, key, "data", encoding, value)
        gen.nvs_close(nvs)
    except (gen.InsufficientSizeError, gen.InputError, gen.PageFullError) as e:
        raise CredentialsError(f"the credentials do not fit an NVS partition of "
                               f"0x{size:x} bytes: {e}") from None
    image = out.getvalue()
    if len(image) != size:
        raise CredentialsError(f"NVS generator made {len(image)} bytes for a 0x{size:x} "
                               "partition")
    return image


def nvs_region(creds: DeviceCredentials, partition_offset: int, partition_size: int,
               namespace: str, nvs_keys: bytes | None = None) -> Region:
    """The board's credentials partition: the whole partition, so stale pages are erased;
    encrypted with `nvs_keys` (the board's nvs_keys partition holds them) when given."""
    image = nvs_image(nvs_entries(creds), partition_size, namespace, nvs_keys)
    return Region.build("nvs-credentials", partition_offset, image)
