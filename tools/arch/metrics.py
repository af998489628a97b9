"""House metrics of a tricopy tree: modules, packages, import levels, cycles, function-level imports of the
project's own modules, the largest modules. `python -m tools.arch.metrics [ROOT] [--json]`.

A module's level is 1 + the highest level of the project modules it imports (top-level or inside a function);
a cycle (a strongly connected set of modules) counts as one node. The numbers in ARCHITECTURE.md come from here.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

PACKAGES = ("vstore", "jfs")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan(root: Path) -> dict:
    files = sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))
    names = {module_name(root, p): p for p in files}
    edges: dict[str, set[str]] = {m: set() for m in names}
    lazy: list[str] = []
    for mod, path in names.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            hits = {t for t in targets if t in names and t != mod}
            if not hits:
                continue
            edges[mod] |= hits
            if node.col_offset > 0:
                lazy.append(f"{path.relative_to(root)}:{node.lineno}")
    for mod in names:  # a package's __init__ is not an import of its children
        edges[mod] = {t for t in edges[mod] if not mod.startswith(t + ".") or names[t].stat().st_size > 0}
    cycles = strongly_connected(edges)
    return {
        "modules": sum(1 for p in files if p.name != "__init__.py"),
        "packages": sum(1 for p in files if p.name == "__init__.py"),
        "import_levels": levels(edges),
        "cycles": [sorted(c) for c in cycles if len(c) > 1],
        "function_level_project_imports": len(lazy),
        "largest": sorted(((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in files),
                          reverse=True)[:8],
        "over_500_lines": sum(1 for p in files if len(p.read_text().splitlines()) > 500),
    }


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def levels(edges: dict[str, set[str]]) -> int:
    comps = strongly_connected(edges)
    comp_of = {m: i for i, c in enumerate(comps) for m in c}
    level: dict[int, int] = {}
    for i, comp in enumerate(comps):  # Tarjan emits components in reverse topological order
        below = {comp_of[t] for m in comp for t in edges[m]} - {i}
        level[i] = 1 + max((level[j] for j in below), default=0)
    return max(level.values(), default=0)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--json"]
    doc = scan(Path(args[0]) if args else Path.cwd())
    if "--json" in sys.argv:
        print(json.dumps(doc, indent=2))
        return
    for key, value in doc.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
