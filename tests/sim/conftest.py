"""Fixtures for the virtual-board tests: rigs, images, and running the real esptool."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from station.sim import Rig

ESPTOOL_TIMEOUT_S = 120.0


@dataclass
class EsptoolResult:
    returncode: int
    output: str  # stdout and stderr together, as a user would read them


def esptool(port: str, *args: str, timeout: float = ESPTOOL_TIMEOUT_S,
            pre: tuple[str, ...] = (), env: dict[str, str] | None = None) -> EsptoolResult:
    """Run the real esptool in a subprocess against ``port`` (``env``: extra variables)."""
    proc = subprocess.run(
        [sys.executable, "-m", "esptool", "--port", port, *pre, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
        check=False, env={**os.environ, **env} if env else None,
    )
    return EsptoolResult(proc.returncode, proc.stdout)


@pytest.fixture
def fast_rig(tmp_path: Path) -> Iterator[Rig]:
    """Boards without line-rate or flash timing: functional tests stay quick."""
    with Rig(tmp_path / "hub", seed=7, throttle=False, flash_timing=False) as rig:
        yield rig


@dataclass
class Images:
    """A bootloader, a partition table and an app, with files on disk."""

    parts: dict[int, bytes]
    paths: dict[int, Path]

    def args(self) -> list[str]:
        out: list[str] = []
        for offset, path in sorted(self.paths.items()):
            out += [hex(offset), str(path)]
        return out


def make_images(tmp_path: Path, chip: str, app_size: int = 1 << 20, seed: int = 1,
                compressible_app: bool = False) -> Images:
    """Random test images at the chip's real offsets (bootloader 0x1000 on ESP32 only).

    The bootloader and partition table are compressible (mostly-structured data), so a
    default write exercises FLASH_DEFL_*; a random app is incompressible, and esptool
    sends it raw even with compression on, which exercises the FLASH_DATA path too.
    """
    rng = random.Random(seed)
    boot_offset = 0x1000 if chip == "esp32" else 0x0
    bootloader = bytes(rng.choice(b"\x00\x01\x02\xff") for _ in range(24 * 1024))
    table = (bytes(rng.getrandbits(8) for _ in range(256)) + b"\xff" * 2816)
    if compressible_app:
        app = bytes(rng.choice(b"ESP32\x00\xc0\xdb") for _ in range(app_size))
    else:
        app = rng.randbytes(app_size)
    parts = {boot_offset: bootloader, 0x8000: table, 0x10000: app}
    paths: dict[int, Path] = {}
    for offset, data in parts.items():
        path = tmp_path / f"image-{offset:#x}.bin"
        path.write_bytes(data)
        paths[offset] = path
    return Images(parts, paths)
