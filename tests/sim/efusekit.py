"""Running the real espefuse / espsecure against virtual boards, for the eFuse tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import ESPTOOL_TIMEOUT_S, EsptoolResult


def run_tool(module: str, *args: str, timeout: float = ESPTOOL_TIMEOUT_S,
             env: dict[str, str] | None = None) -> EsptoolResult:
    """``python -m <module> args...`` (espefuse, espsecure, esptool), output merged;
    ``env``: extra variables."""
    proc = subprocess.run([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning",
                               **(env or {})})
    return EsptoolResult(proc.returncode, proc.stdout)


def espefuse(port: str, *args: str, timeout: float = ESPTOOL_TIMEOUT_S,
             env: dict[str, str] | None = None) -> EsptoolResult:
    """The real espefuse CLI against a board, confirming burns as a script does."""
    return run_tool("espefuse", "--port", port, "--do-not-confirm", *args, timeout=timeout,
                    env=env)


def one_connect_attempt(folder: Path) -> dict[str, str]:
    """Variables that make esptool (and espefuse's reconnects, which take no option)
    give up after one connect attempt: esptool's config file (``esptool/config.py``)."""
    cfg = folder / "esptool.cfg"
    cfg.write_text("[esptool]\nconnect_attempts = 1\n")
    return {"ESPTOOL_CFGFILE": str(cfg)}


def espsecure(*args: str) -> EsptoolResult:
    return run_tool("espsecure", *args)


def summary(port: str, out: Path) -> dict[str, Any]:
    """``espefuse summary --format json`` of a board, as a dict of eFuses."""
    result = run_tool("espefuse", "--port", port, "summary", "--format", "json",
                      "--file", str(out))
    assert result.returncode == 0, result.output
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def virt_summary(chip: str, efuse_file: Path, out: Path) -> dict[str, Any]:
    """What ``espefuse --virt --path-efuse-file`` reads from a board's eFuse file."""
    result = run_tool("espefuse", "--virt", "--chip", chip, "--path-efuse-file",
                      str(efuse_file), "summary", "--format", "json", "--file", str(out))
    assert result.returncode == 0, result.output
    data: dict[str, Any] = json.loads(out.read_text())
    return data
