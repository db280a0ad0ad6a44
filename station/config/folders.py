"""A configured folder proven writable: created if missing, then a small file written.

`station check` runs it on state_dir and credentials.out_dir, and `run` on out_dir at
start, so a permission, a read-only mount or a full disk fails before the first board,
naming the config file and key.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from station.config.sections import Config
from station.errors import ConfigError

PROBE_BYTES = 4096
"""What is written (and removed) to prove a folder takes data: about one board's
certificate files, so a full disk fails here and not at the first board."""


def writable_folder(path: Path, key: str, config: Config) -> int:
    """Prove `path` can be created and written (permissions, read-only mount, full disk)
    by writing a small file there; returns the free bytes."""
    probe = path / f".station-check.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
        stat = os.statvfs(path)
    except OSError as e:
        reason = "not writable by this user" if e.errno in (errno.EACCES, errno.EPERM) \
            else e.strerror or str(e)
        raise ConfigError(str(config.path), key, f"{path}: {reason}") from None
    return stat.f_bavail * stat.f_frsize
