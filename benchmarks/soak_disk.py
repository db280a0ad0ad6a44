"""The soak's certs_out disk: a small tmpfs that the harness fills up to make writes fail.

A real full disk, not a mock: `certs_out/` is a tmpfs of a few MB mounted for the run;
`fill()` takes every free block with one filler file (so the station's next write of a
key, certificate or record gets ENOSPC from the kernel), `free()` deletes it. Mounting
needs root (CAP_SYS_ADMIN), which the soak has on the rig and in CI; without it the
fault is reported as not injected, with the reason, and the soak runs on a plain folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

FILLER = ".soak-filler"
CHUNK = 1 << 16


class FullableDisk:
    def __init__(self, mountpoint: Path, size_mb: int = 32) -> None:
        self.mountpoint = mountpoint
        self.size_mb = size_mb
        self.mounted = False
        self.unavailable: str | None = None  # why the fault cannot be injected
        self.fills = 0

    def mount(self) -> bool:
        """Mount the tmpfs; False (with `unavailable` set) if this host does not allow it."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.unavailable = "needs root to mount a tmpfs"
            return False
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0700", "soak-certs",
             str(self.mountpoint)], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            self.unavailable = f"mount failed: {result.stderr.strip() or result.returncode}"
            return False
        self.mounted = True
        return True

    def fill(self) -> int:
        """Take every free byte; returns the bytes taken."""
        if not self.mounted:
            return 0
        path = self.mountpoint / FILLER
        taken = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            free = os.statvfs(self.mountpoint)
            want = free.f_bavail * free.f_frsize
            if want:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, os.fstat(fd).st_size, want)
                    taken += want
            block = b"\0" * CHUNK
            while True:  # whatever fallocate left (tmpfs rounding): write until ENOSPC
                try:
                    taken += os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 2]
        finally:
            os.close(fd)
        self.fills += 1
        return taken

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.mountpoint / FILLER).unlink()

    @property
    def full(self) -> bool:
        return (self.mountpoint / FILLER).exists()

    def unmount(self) -> None:
        if not self.mounted:
            return
        self.free()
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True,
                       timeout=30, check=False)
        self.mounted = False
