"""The layout rules of README "Layout", checked on the real source tree.

- import-linter's contracts (pyproject.toml) hold, and a wrong import breaks them;
- modules <= 500 lines and functions <= 80 lines unless a `# size: <why>` comment says why;
- an import inside a function is a heavy third-party one (or, in cli, a stage that imports
  one), and says why.
"""

import ast
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mondrian"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_MODULE, MAX_FUNCTION = 500, 80
WHY = "# noqa: PLC0415 - heavy:"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _lint_imports() -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_hold():
    res = _lint_imports()
    assert res.returncode == 0, res.stdout + res.stderr
    summary = next(line for line in res.stdout.splitlines() if line.startswith("Contracts:"))
    assert summary.endswith(" 0 broken."), summary


@pytest.mark.parametrize(("stage", "target", "contract"), [
    ("serve", "mondrian.train.loop", "serve never imports"),
    ("core", "mondrian.models.sources", "Stages import only core"),
])
def test_a_wrong_import_breaks_the_contracts(stage, target, contract):
    # A real module in the real tree, removed afterwards: the check reads the same files CI does.
    probe = PACKAGE / stage / f"_layout_probe_{uuid.uuid4().hex[:8]}.py"
    probe.write_text(f'"""A deliberately wrong import (tests/test_layout.py)."""\n\nimport {target}  # noqa: F401\n')
    try:
        res = _lint_imports()
    finally:
        probe.unlink()
    assert res.returncode != 0
    broken = res.stdout.split("Broken contracts")[-1]
    assert contract in broken and probe.stem in broken, res.stdout


def _size_exempt(lines: list[str], lineno: int) -> bool:
    """A `# size: <why>` comment on the line above `lineno` (1-based)."""
    return lineno >= 2 and lines[lineno - 2].strip().startswith("# size:")


def test_modules_and_functions_are_small():
    too_long = []
    for path in _modules():
        text = path.read_text()
        lines = text.splitlines()
        rel = path.relative_to(ROOT)
        if len(lines) > MAX_MODULE and not any(x.startswith("# size:") for x in lines[:5]):
            too_long.append(f"{rel}: {len(lines)} lines > {MAX_MODULE}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - first + 1
                if n > MAX_FUNCTION and not _size_exempt(lines, first):
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines > {MAX_FUNCTION}")
    assert not too_long, "\n".join(too_long)


def _inner_imports(tree: ast.AST):
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    yield node


def test_imports_inside_functions_are_heavy_and_say_why():
    bad = []
    for path in _modules():
        text = path.read_text()
        lines = text.splitlines()
        for node in _inner_imports(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            top = names[0].split(".")[0]
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            # cli may defer a stage whose import is heavy (serve: fastapi), so --help stays fast
            deferrable = top == "mondrian" and "cli" in path.relative_to(PACKAGE).parts[:1]
            if top == "" or top in sys.stdlib_module_names or (top == "mondrian" and not deferrable):
                bad.append(f"{where}: import {names[0]} belongs at module top")
            elif WHY not in lines[node.lineno - 1]:
                bad.append(f"{where}: import {names[0]} inside a function needs '{WHY} <why>'")
    assert not bad, "\n".join(bad)
