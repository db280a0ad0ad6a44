"""A throw-away PostgreSQL server for the soak and the tests (pytest-free).

Why it looks like this:
- The distro's server binaries (Debian's `postgresql` package; .ci/run installs it on a
  fresh machine) are the real thing; a mock of PostgreSQL would test nothing we ship.
- CI runs as root and initdb refuses root, so the cluster belongs to an unprivileged
  user (`postgres` if the package made one, else `nobody`) and is started through
  `runuser`; as a normal user it simply runs as that user.
- Its own temporary folder and a free loopback port: several clusters (pytest-xdist
  workers, a soak beside the tests) never share state or ports.
- Password authentication (scram) is on, so a wrong password is refused exactly as in
  a factory; fsync is off (a test cluster does not outlive its test).
- `stop()` / `start()` are pg_ctl's, for outage tests and the soak's outage window.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

USER = "station"
PASSWORD = "station-test-password"
SUPERUSER = "pgadmin"
START_TIMEOUT = 60.0


def find_bindir() -> Path | None:
    """The folder of pg_ctl/initdb/postgres: PATH first, then Debian's versioned folders."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit()
                        else 0)
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """One initdb'd PostgreSQL cluster in a temporary folder, on 127.0.0.1:port."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="station-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.owner: str | None = None
        if os.geteuid() == 0:
            self.owner = "postgres" if _user_exists("postgres") else "nobody"
            os.chown(self.root, pwd.getpwnam(self.owner).pw_uid, -1)
        self._lock = threading.Lock()

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.owner, "--", *cmd] if self.owner else cmd

    def _run(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): "
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.owner:
            os.chown(pwfile, pwd.getpwnam(self.owner).pw_uid, -1)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--pwfile", str(pwfile),
                  "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                       "synchronous_commit = off\nfull_page_writes = off\n"
                       "max_connections = 200\nshared_buffers = 32MB\n"
                       "max_prepared_transactions = 10\n")
        self.start()
        self.sql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t",
                  str(int(START_TIMEOUT)), "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str, user: str = USER) -> str:
        """A libpq URL without the password (the station takes it from PGPASSWORD)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.url(database, SUPERUSER), password=PASSWORD,
                             autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(statement)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def new_database(self) -> str:
        """A fresh database owned by the station's role; returns its name."""
        name = f"t_{uuid.uuid4().hex[:10]}"
        with self._lock:
            self.sql(f"CREATE DATABASE {name} OWNER {USER}")
        return name


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
