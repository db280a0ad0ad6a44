"""A real Mosquitto for the tests: TLS with client certificates from a local CA.

`mosquitto(folder, ca)` starts `/usr/sbin/mosquitto` on a free loopback port with the CA
as its `cafile`, a server certificate the CA signs for 127.0.0.1, `require_certificate`
and `use_identity_as_username` (the certificate's CN, the thing name, is the user), as
docs/registration.md tells a fleet to set it up. Options: a CRL (`crlfile`: revoked
certificates), an ACL file, and `log_type all`, whose lines name each client id that
connected and published. Skips where Mosquitto is not installed.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from station.identity.registrar.local_ca import LocalCa
from tests.registrar.awsproxy import free_port

TIMEOUT = 10.0


@dataclass(frozen=True)
class Broker:
    port: int
    folder: Path  # ca.crt, server.crt, mosquitto.log

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return (self.folder / "mosquitto.log").read_text(errors="replace")


def executable() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                        if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return exe


@contextlib.contextmanager
def mosquitto(folder: Path, ca: LocalCa, *, crl: bytes | None = None, acl: str | None = None,
              verbose: bool = False) -> Iterator[Broker]:
    exe = executable()
    folder.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = ca.server_certificate(["127.0.0.1", "localhost"])
    (folder / "ca.crt").write_text(ca.pem)
    (folder / "server.crt").write_text(cert_pem)
    (folder / "server.key").write_text(key_pem)
    port = free_port()
    options = ["log_type all"] if verbose else []
    if crl is not None:
        (folder / "crl.pem").write_bytes(crl)
        options.append(f"crlfile {folder / 'crl.pem'}")
    if acl is not None:
        (folder / "acl").write_text(acl)
        options.append(f"acl_file {folder / 'acl'}")
    conf = folder / "mosquitto.conf"
    conf.write_text("\n".join([
        f"user {getpass.getuser()}", "persistence false", "log_dest stderr",
        f"listener {port} 127.0.0.1", f"cafile {folder / 'ca.crt'}",
        f"certfile {folder / 'server.crt'}", f"keyfile {folder / 'server.key'}",
        "require_certificate true", "use_identity_as_username true",
        "allow_anonymous false", *options]) + "\n")
    log = (folder / "mosquitto.log").open("wb")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto did not listen: {log.name}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)  # the pause between tries, and an early exit seen
                raise RuntimeError(f"mosquitto exited: {(folder / 'mosquitto.log').read_text()}")
        yield Broker(port, folder)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        log.close()
