"""The house rules, checked on the tree itself (ARCHITECTURE.md "Layers").

- every layer imports only from the layers below it, no package has an import cycle among its modules, and the
  servers never load typer or rich: the import-linter contracts in pyproject.toml hold;
- the check is real: the same contracts fail on a copy of the tree with one upward import, and with one cycle;
- a project module is imported inside a function only where the function needs an optional heavy dependency
  (none of the project's own modules qualifies);
- no module is over 500 lines; no source file tells history (issue numbers).
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

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vstore", "jfs")
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([*LINT, "--config", str(tree / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tree / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def add_line(path: Path, line: str) -> None:
    text = path.read_text()
    head, sep, rest = text.partition('"""\n\n')  # after the module docstring
    path.write_text(head + sep + line + "\n" + rest if sep else line + "\n" + text)


def test_import_contracts_hold() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("vstore/blocks/units.py", "import vstore.replication.pairs  # an upward import", "layers"),
    ("jfs/layout.py", "import vstore.replication.entries  # jfs reaching into the replication stack", "layers"),
    ("vstore/replication/network.py", "import vstore.replication.storage  # a cycle inside one layer", "cycles"),
    ("vstore/lab/system.py", "import rich.console  # the terminal stack in a server", "terminal stack"),
])
def test_contracts_fail_on_a_bad_import(tmp_path: Path, module: str, line: str, broken: str) -> None:
    tree = copy_tree(tmp_path)
    add_line(tree / module, line)
    result = lint(tree)
    assert result.returncode != 0, f"the contracts did not notice `{line}` in {module}"
    assert "BROKEN" in result.stdout and broken in result.stdout.split("Broken contracts")[1]


def function_level_project_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom) and node.col_offset > 0:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] in PACKAGES for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_function_level_imports_of_project_modules() -> None:
    lazy = [hit for path in sources() for hit in function_level_project_imports(path)]
    assert not lazy, "import these at module level (a layer may import anything below it): " + ", ".join(lazy)


def test_no_module_over_500_lines() -> None:
    big = {str(p.relative_to(ROOT)): n for p in sources() if (n := len(p.read_text().splitlines())) > 500}
    assert not big, f"split these on their own seams: {big}"


HISTORY = re.compile(r"\bissues? #?\d+|\(#\d+\)|\blater issues?\b", re.IGNORECASE)


def test_sources_state_what_is_not_history() -> None:
    files = [*sources(), *sorted((ROOT / "tools").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]
    told = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.name != Path(__file__).name
            for i, text in enumerate(p.read_text().splitlines(), 1) if HISTORY.search(text)]
    assert not told, "say what the code is, not which issue it came from: " + ", ".join(told)
