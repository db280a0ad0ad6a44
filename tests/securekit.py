"""A line that locks boards ([security]), on virtual boards with reset lines, for the
security tests: builds made for flash encryption and secure boot (station.demo), a
signing key from the real espsecure, station.toml with [[firmware]] per chip, and what
a person checks afterwards (the ledger, each board's eFuse file through `espefuse
--virt`, its flash dump decrypted by `espsecure decrypt-flash-data`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from station.demo import make_demo_firmware
from station.security.efuse_defs import espefuse_module, parse_once
from station.sim import PluggedBoard, Rig
from station.sim.efuse import EfuseArray, efuse_path
from station.sim.flash_crypto import chip_cipher
from station.sim.pty_lines import relay_env
from tests.test_bad_inputs import Result, toml_value

CHIPS = ("esp32s3", "esp32c3", "esp32c6", "esp32")
APP_SIZE = 0x8000
"""Small apps: the virtual boot story decrypts an app through a 64 KB peek of its header
(station/sim/boot_security.py `_span`), so larger apps boot as noise there."""
RUN_TIMEOUT = 300.0
MARKS = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
"""A locking module's `pytestmark`: runs of several `station run`s with espsecure and
espefuse inside, whose imports warn of deprecations that are not ours."""
TOOL_TIMEOUT = 60.0


def tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m espsecure|espefuse args`, output merged."""
    return subprocess.run([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TOOL_TIMEOUT,
                          check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"})


_SIGNING_KEYS: dict[str, bytes] = {}


def signing_key(path: Path) -> Path:
    """An RSA-3072 secure boot v2 key made by `espsecure generate-signing-key`, once per
    file name and test process (a line keeps its signing key for years; each 3072-bit
    key costs ~0.4 CPU-s to make): "sb.pem" and "other.pem" stay two different keys."""
    if path.name not in _SIGNING_KEYS:
        made = tool("espsecure", "generate-signing-key", "--version", "2", "--scheme",
                    "rsa3072", str(path))
        assert made.returncode == 0, made.stdout
        _SIGNING_KEYS[path.name] = path.read_bytes()
    else:
        path.write_bytes(_SIGNING_KEYS[path.name])
    return path


class Ran(NamedTuple):
    """One `station run` over boards plugged at once, and what is left of them once the
    rig is gone: each board's flash dump and eFuse file, by `board.mac`."""

    result: Result
    boards: list[PluggedBoard]
    flashes: dict[str, bytes]
    files: dict[str, Path]


@dataclass
class SecureLine:
    """One station locking boards: its config, state, rig folder and builds."""

    root: Path
    builds: dict[str, Path]  # chip -> flasher_args.json
    key: Path
    security: dict[str, Any] = field(default_factory=lambda: {
        "flash_encryption": "release", "secure_boot": "v2", "signing_key": "sb.pem",
        "lockdown": True})
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = relay_env(self.root / "pty-lines.sock")

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def rig(self, seed: int = 41) -> Rig:
        return Rig(self.hub, seed=seed, throttle=False, flash_timing=False,
                   pty_lines=self.root / "pty-lines.sock")

    def write(self) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "station": {"name": "line-1", "state_dir": "state"},
            "ports": {"watch": [str(self.hub / "pci-*")], "rescan_interval": 0.2,
                      "reenumerate_window": 0},
            "verify": {"boot": "app", "boot_timeout": 5.0},
            "worker": {"retry_delay": 0.05},
            "security": self.security, **self.extra}
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n"
                                                for k, v in table.items()) + "\n"
                       for name, table in sections.items())
        for chip, build in self.builds.items():
            text += f"[[firmware]]\nchip = \"{chip}\"\nflasher_args = {toml_value(build)}\n\n"
        path = self.root / "station.toml"
        path.write_text(text)
        return path

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = TOOL_TIMEOUT) -> Result:
        config = self.write()
        # a caller's environment (aws_env's copy of ours) keeps the relay's modem lines
        env = relay_env(self.root / "pty-lines.sock", base={**self.env, **(env or {})})
        out, err = self.root / "out.txt", self.root / "err.txt"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.run([sys.executable, "-m", "station", *args, "--config",
                                   str(config)], cwd=self.root, env=env,
                                  stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                  timeout=timeout, check=False)
        return Result(proc.returncode, out.read_text(errors="replace"),
                      err.read_text(errors="replace"))

    def run(self, boards: int, env: dict[str, str] | None = None) -> Result:
        return self.cli("run", "--headless", "--exit-after", str(boards), env=env,
                        timeout=RUN_TIMEOUT)

    def plug_and_run(self, chips: list[str] | tuple[str, ...]) -> Ran:
        """A board of each of `chips` plugged into a fresh rig, one `station run` for them
        all."""
        with self.rig() as rig:
            boards = [rig.plug(chip=chip) for chip in chips]
            result = self.run(len(boards))
            return Ran(result, boards, {b.mac: rig.flash(b) for b in boards},
                       {b.mac: efuse_file(rig, b) for b in boards})

    def rows(self) -> dict[str, dict[str, Any]]:
        """The ledger's rows by MAC (hex, no colons)."""
        return {r["mac"]: r for r in self.ledger()}

    def ledger(self) -> list[dict[str, Any]]:
        result = self.cli("ledger", "--format", "json")
        assert result.code == 0, str(result)
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    def journal(self, mac: str) -> list[tuple[str, str]]:
        import sqlite3

        conn = sqlite3.connect(self.state / "ledger.sqlite3")
        try:
            return [(s, p) for s, p in conn.execute(
                "SELECT step, phase FROM security WHERE mac = ? ORDER BY rowid", (mac,))]
        finally:
            conn.close()


def make_line(root: Path, chips: tuple[str, ...] = CHIPS, nvs_keys: bool = False) -> SecureLine:
    """`nvs_keys`: the builds' tables have ESP-IDF's nvs_keys partition (NVS encryption)."""
    builds = {chip: make_demo_firmware(root / "build" / chip, chip=chip, app_size=APP_SIZE,
                                       secure=True, nvs_keys=nvs_keys) for chip in chips}
    return SecureLine(root, builds, signing_key(root / "sb.pem"))


def device_line(root: Path, chips: tuple[str, ...] = CHIPS, secure_cert: bool = False
                ) -> SecureLine:
    """key = "device": builds made for it, the bootloader makes the key and encrypts the
    flash on the board's first boot; no secure boot, so no signing key. `secure_cert`:
    the builds' tables have an esp_secure_cert partition."""
    builds = {chip: make_demo_firmware(root / "build" / chip, chip=chip, app_size=APP_SIZE,
                                       device_key=True, secure_cert=secure_cert)
              for chip in chips}
    line = SecureLine(root, builds, root / "unused.pem")
    line.security = {"flash_encryption": "release", "key": "device"}
    return line


def mac_of(board: PluggedBoard) -> str:
    return board.mac.replace(":", "")


def efuse_file(rig: Rig, board: PluggedBoard) -> Path:
    return efuse_path(rig.directory, bytes.fromhex(mac_of(board)))


def virt_summary(chip: str, efuses: Path, out: Path) -> dict[str, Any]:
    """What `espefuse --virt --chip CHIP --path-efuse-file EFUSES summary --format json`
    shows of a board's eFuse file: the library calls its CLI makes, in this process (a
    CLI start cost ~0.5 CPU-s, 16 in the 16-board test). espefuse's virtual controller
    reads the file with an `open()` it never closes: its ResourceWarning is not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # espefuse's imports
        warnings.simplefilter("ignore", ResourceWarning)
        import espefuse

        for module in ("fields", "emulate_efuse_controller"):  # the table parsed once
            parse_once(espefuse_module(f"efuse.{chip}.{module}"))
        commands = espefuse.init_commands(virt=True, chip=chip, virt_efuse_file=str(efuses))
        with out.open("w") as file:
            commands.summary(format="json", file=file)
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def burned_key(chip: str, efuses: Path) -> bytes:
    """The flash-encryption key in the chip's fuses (read-protected: only the virtual chip
    keeps it, in its `.keys` file), as espsecure's key file holds it."""
    return chip_cipher(EfuseArray(chip, efuses)).key_file


def burned_key_file(chip: str, efuses: Path, out: Path) -> Path:
    """`burned_key` as a key file for espsecure."""
    out.write_bytes(burned_key(chip, efuses))
    return out


def decrypt_with_fuses(chip: str, efuses: Path, data: bytes, address: int, tmp: Path
                       ) -> bytes:
    """`data` read at `address` decrypted with the key burned in the board's eFuse file:
    what the chip's flash decryption gives the app."""
    return decrypt(chip, burned_key_file(chip, efuses, tmp / "burned.key"), data, address, tmp)


def decrypt(chip: str, key: Path, data: bytes, address: int, tmp: Path) -> bytes:
    """`espsecure decrypt-flash-data` of `data` read at `address`: the function its CLI
    runs (`decrypt_flash_data_cli`), called here: a CLI process per region cost ~0.5 CPU-s
    of start-up, 48 of them in the 16-board test alone."""
    import espsecure

    src, dst = tmp / "cipher.bin", tmp / "plain.bin"
    src.write_bytes(data)
    with key.open("rb") as keyfile, src.open("rb") as cipher, dst.open("wb") as plain, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # espsecure's imports, not ours
        espsecure.decrypt_flash_data(keyfile, plain, address, 0xF, chip != "esp32", cipher)
    return dst.read_bytes()
