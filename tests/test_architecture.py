"""The layout's rules as tests: import-linter's contracts (pyproject.toml) hold on the tree,
and each one, broken on purpose in a copy of the package, fails naming the import.

Plus the two rules no import graph shows: no module over 500 lines, and every package's
`__init__` names its face (`__all__`, each name imported there).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "lint-imports"
LINT_TIMEOUT = 120.0
MAX_LINES = 500


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the `station` package under `root`, with root's pyproject.toml."""
    exe = LINT_IMPORTS if LINT_IMPORTS.exists() else Path(shutil.which("lint-imports") or "")
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy, not the installed package
    return subprocess.run([str(exe), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True,
                          timeout=LINT_TIMEOUT, check=False)


def test_the_tree_keeps_every_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"Contracts: \d+ kept, 0 broken\.", done.stdout), done.stdout


# (file to change, line appended, the contract that breaks, what its report must name)
BREAKS = {
    "the worker reads the screen": (
        "worker.py", "from station.screen import StationView  # probe",
        "The worker emits events; screen, report, fleet and health consume them BROKEN",
        "station.worker -> station.screen (l."),
    "flash imports identity": (
        "flash/plan.py", "from station.identity import nvs_region  # probe",
        "flash, identity and security meet only in the worker "
        "BROKEN", "station.flash.plan -> station.identity (l."),
    "a port module knows the simulator": (
        "ports/hotplug.py", "import station.sim  # probe",
        "Only the CLI and the demo know the simulator BROKEN",
        "station.ports.hotplug -> station.sim (l."),
    "config imports a stage above it": (
        "config/folders.py", "from station.flash import Plan  # probe",
        "Layers: each imports only the layers below it BROKEN",
        "station.config.folders -> station.flash (l."),
    "a circle inside a package": (
        "record/eventlog.py", "from station.record import ledger  # probe",
        "No import circles anywhere in station BROKEN",
        "No cycles are allowed in station.record.\nIt could be made acyclic by removing 1 "
        "dependency:\n\n- .eventlog -> .ledger (1 import)"),
    "check reaches into the ledger's private tables": (
        "check/commands.py", "from station.record import _tables  # probe",
        "A _module is its package's own BROKEN", "station.check.commands -> "
        "station.record._tables"),
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to break."""
    shutil.copytree(ROOT / "station", tmp_path / "station",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_a_broken_rule_fails_naming_the_import(tree: Path, case: str) -> None:
    file, line, broken, named = BREAKS[case]
    with (tree / "station" / file).open("a") as f:
        f.write(f"\n{line}\n")
    done = lint_imports(tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert broken in done.stdout, done.stdout
    assert named in done.stdout, done.stdout


def test_a_new_top_level_module_must_take_a_layer(tree: Path) -> None:
    (tree / "station" / "registry.py").write_text('"""A probe: in no layer yet."""\n')
    done = lint_imports(tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Layers: each imports only the layers below it BROKEN" in done.stdout
    assert "station.registry" in done.stdout, done.stdout


def test_no_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for folder in ("station", "benchmarks")
            for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, "split these by concept (a module past ~400 lines holds two ideas)"


def face(init: Path) -> tuple[list[str], set[str]]:
    """A package __init__'s `__all__` and the names it imports or defines."""
    tree = ast.parse(init.read_text())
    names: set[str] = set()
    listed: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == "__all__":
                    listed = list(ast.literal_eval(node.value))
                elif isinstance(target, ast.Name):
                    names.add(target.id)
    return listed, names


PACKAGES = sorted(str(p.parent.relative_to(ROOT / "station"))
                  for p in (ROOT / "station").rglob("__init__.py") if p.parent != ROOT / "station")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_names_its_face(package: str) -> None:
    init = ROOT / "station" / package / "__init__.py"
    listed, names = face(init)
    assert listed, f"station/{package}/__init__.py has no __all__"
    assert sorted(set(listed) - names) == [], f"__all__ of station/{package} names what it " \
        "does not import"
    assert ast.get_docstring(ast.parse(init.read_text())), f"station/{package}: say what " \
        "happens here"


def test_run_imports_neither_the_simulator_nor_aws_nor_http() -> None:
    """Every `station` process pays its imports: `run` with a config that is not AWS's
    loads neither the simulator (only `station sim` needs it), nor botocore / boto3, nor
    httpx (only a [registry] needs it)."""
    probe = ("import sys\n"
             "from station.cli import main\n"
             "main(['run', '--config', '/nonexistent/station.toml'])\n"
             "import station.app, station.check.commands\n"
             "print(sorted({m.split('.')[0] + ('.sim' if m.startswith('station.sim') else '')"
             " for m in sys.modules if m.startswith(('station.sim', 'boto', 'httpx'))}))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=LINT_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
