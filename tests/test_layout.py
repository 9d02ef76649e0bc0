"""The package layout the design promises: one installed namespace and imports that point downwards."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INNER = ("supernet", "search", "evaluators")
FOUNDATION = {"tyr", "tyr.errors", "tyr.io"}  # `tyr` itself only for `from tyr import errors/io`
# Which inner packages each one may import (README, "Where things live").
ALLOWED_INNER = {
    "supernet": set(),
    "evaluators": set(),
    "search": {"tyr.supernet", "tyr.evaluators"},
}


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in the file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


@pytest.mark.parametrize("package", INNER)
def test_inner_packages_import_only_the_foundation_and_lower_layers(package):
    allowed_inner = ALLOWED_INNER[package] | {f"tyr.{package}"}
    bad = []
    for path in _python_files(package):
        for line, module, names in _imports(path):
            if module != "tyr" and not module.startswith("tyr."):
                continue
            top = ".".join(module.split(".")[:2])
            if module == "tyr":
                ok = set(names) <= {"errors", "io"}
            else:
                ok = module in FOUNDATION or top in allowed_inner
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "inner packages must not import the surface:\n" + "\n".join(bad)


def test_no_import_of_the_bare_folder_names():
    pattern = re.compile(r"^\s*(from|import)\s+(search|supernet|evaluators)\b", re.M)
    hits = [
        f"{p.relative_to(ROOT)}: {m.group(0).strip()}"
        for p in _python_files("tyr", *INNER, "tests", "benchmarks")
        for m in pattern.finditer(p.read_text())
    ]
    assert not hits, "import them as tyr.search / tyr.supernet / tyr.evaluators:\n" + "\n".join(hits)


def test_installed_namespace_from_another_directory(tmp_path):
    """From a folder outside the repository: tyr.* imports, the generic top-level names do not exist."""
    code = (
        "import importlib, sys\n"
        "for name in ('tyr.search.evolution', 'tyr.supernet.store', 'tyr.evaluators.kl', 'tyr.cli'):\n"
        "    importlib.import_module(name)\n"
        "for name in ('search', 'supernet', 'evaluators'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    sys.exit(f'{name} is importable as a top-level module')\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr + result.stdout


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a file (f-string parts included), docstrings excluded."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_only_the_run_directory_type_knows_the_layout():
    """`iter-N/` and `result.json` are spelled out in tyr/rundir.py alone."""
    hits = [
        f"{p.relative_to(ROOT)}:{line}: {text!r}"
        for p in _python_files("tyr", *INNER, "benchmarks")
        # rundir.py owns the layout; bad_inputs.py replays what users type and do to run folders (like tests)
        if p.name not in ("rundir.py", "bad_inputs.py")
        for line, text in _string_literals(p)
        if "iter-" in text or "result.json" in text
    ]
    assert not hits, "use tyr.rundir.RunDir for run-directory paths:\n" + "\n".join(hits)


def test_every_package_is_installed():
    """pyproject.toml lists packages explicitly (the package-dir mapping needs it): none may be missing."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *relative)))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
