"""A real PostgreSQL server for the tests: one throw-away cluster per test process.

The cluster itself is benchmarks/soak_pg.py's (the soak uses the same one). Here: one
per process (a module-level singleton, destroyed at exit), so under pytest-xdist every
worker has its own on its own port; each test gets its own database. If no server
binaries can be found the fixtures skip with the reason.
"""

from __future__ import annotations

import atexit
import os
import subprocess
from collections.abc import Iterator, Mapping

import pytest

from benchmarks.soak_pg import (
    PASSWORD,
    SUPERUSER,
    USER,
    Cluster,
    find_bindir,
    free_port,
)

__all__ = ["PASSWORD", "SUPERUSER", "USER", "Cluster", "free_port", "cluster", "pg",
           "central_db", "pg_env"]


_cluster: Cluster | None = None
_failure: str | None = None


def cluster() -> Cluster:
    """This process's cluster, made at first use; skips the test if there is no server."""
    global _cluster, _failure
    if _cluster is not None:
        return _cluster
    if _failure is not None:  # found but would not start: every test says so
        pytest.fail(_failure)
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (pg_ctl, initdb) on PATH or in "
                    "/usr/lib/postgresql/*/bin; .ci/run installs the `postgresql` package")
    for attempt in range(3):  # a free port may be taken between the look and the bind
        made = Cluster(bindir)
        try:
            made.init()
            break
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            made.destroy()
            if attempt == 2:
                _failure = f"could not start a PostgreSQL server from {bindir}: {e}"
                pytest.fail(_failure)
    atexit.register(made.destroy)
    _cluster = made
    return made


@pytest.fixture
def pg() -> Cluster:
    return cluster()


@pytest.fixture
def central_db(pg: Cluster) -> Iterator[str]:
    """A fresh database for one test; yields its URL (no password in it)."""
    yield pg.url(pg.new_database())


def pg_env(password: str = PASSWORD, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The station's environment for PostgreSQL: the password, no service or pass file.
    `base`: the environment to start from (default this process's), e.g. a relay's, whose
    PYTHONPATH must survive."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGPASSFILE="/nonexistent", PGSERVICEFILE="/nonexistent",
               PGCONNECT_TIMEOUT="3")
    return env
