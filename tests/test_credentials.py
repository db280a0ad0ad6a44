"""CredentialStore: the seed's files, atomically, 0700/0600, clear errors, no secrets shown."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from station.errors import CredentialsError
from station.identity import (
    CERTIFICATE_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    RECORD_FILE,
    CredentialStore,
    RegistrationRecord,
)
from station.parts import DeviceCredentials

SECRET = "-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n-----END PRIVATE KEY-----\n"


def creds(thing: str = "thing-1") -> DeviceCredentials:
    return DeviceCredentials(thing_name=thing, certificate_pem="CERT", private_key_pem=SECRET,
                             public_key_pem="PUB", endpoint="e.example", certificate_id="abc",
                             certificate_arn="arn:aws:iot:x:1:cert/abc")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_writes_the_seed_files(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "certs_out")
    record = RegistrationRecord(thing_name="thing-1", registrar="aws-iot", status="active",
                                certificate_id="abc", endpoint="e.example", mac="001122334455")
    old_umask = os.umask(0o022)
    try:
        asyncio.run(store.save(creds(), record))
    finally:
        os.umask(old_umask)
    folder = tmp_path / "certs_out" / "thing-1"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CERTIFICATE_FILE, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, RECORD_FILE])
    assert mode(folder) == 0o700
    assert mode(folder / PRIVATE_KEY_FILE) == 0o600
    assert (folder / PRIVATE_KEY_FILE).read_text() == SECRET
    assert (folder / CERTIFICATE_FILE).read_text() == "CERT"
    back = asyncio.run(store.read_record("thing-1"))
    assert back is not None and back.certificate_id == "abc" and back.mac == "001122334455"
    loaded = asyncio.run(store.read_credentials("thing-1"))
    assert loaded is not None and loaded.private_key_pem == SECRET
    assert "SECRET" not in repr(loaded) and "SECRET" not in repr(store)


def test_forget_private_key(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    record = RegistrationRecord(thing_name="thing-1", registrar="local-ca")
    asyncio.run(store.save(creds(), record))
    asyncio.run(store.forget_private_key("thing-1"))
    assert not (tmp_path / "thing-1" / PRIVATE_KEY_FILE).exists()
    assert (tmp_path / "thing-1" / CERTIFICATE_FILE).exists()
    back = asyncio.run(store.read_record("thing-1"))
    assert back is not None and back.private_key_dropped
    assert asyncio.run(store.read_credentials("thing-1")) is None
    asyncio.run(store.forget_private_key("thing-1"))  # twice is fine


def test_rewrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)

    async def many() -> None:
        await asyncio.gather(*(store.write_certificate("thing-1", f"CERT{i}")
                               for i in range(20)))

    asyncio.run(many())
    folder = tmp_path / "thing-1"
    assert [p.name for p in folder.iterdir()] == [CERTIFICATE_FILE]
    assert (folder / CERTIFICATE_FILE).read_text().startswith("CERT")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_dir_names_the_path(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    store = CredentialStore(out)
    with pytest.raises(CredentialsError, match=str(out)):
        asyncio.run(store.write_key("thing-1", SECRET, "PUB"))


def test_write_failure_names_the_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # a thing folder that is a file fails like a full disk does (an OSError), as any user
    (out / "thing-2").write_text("not a folder")
    store = CredentialStore(out)
    with pytest.raises(CredentialsError, match="thing-2"):
        asyncio.run(store.write_key("thing-2", SECRET, "PUB"))
    with pytest.raises(CredentialsError) as info:
        asyncio.run(store.write_key("thing-2", SECRET, "PUB"))
    assert "SECRET" not in str(info.value)


def test_thing_names_cannot_escape(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    with pytest.raises(CredentialsError):
        store.folder("../etc")
