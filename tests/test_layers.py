"""Layers only import downward: a module may import its own package and the layers below it, never above
(imports inside ``if TYPE_CHECKING:`` are for type hints only and do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

import activelab

#: rank of each top-level module or package of activelab; an import must not go to a higher rank
RANKS = {
    "errors": 0,
    "plugins": 1, "jsonable": 1, "metrics": 1, "mcstats": 1, "memory": 1, "stopping": 1, "neighbors": 1,
    "config": 2,
    "data": 3,
    "models": 4,
    "inference": 5, "train": 5,
    "query": 6,
    "strategies": 7,
    "experiment": 8,
    "api": 9, "report": 9,
    "distributed": 10, "project": 10,
    "web": 11,
    "cli": 12, "cli_project": 12,
    "__init__": 13,
}  # fmt: skip


def _imports(tree: ast.Module):
    """ImportFrom nodes outside ``if TYPE_CHECKING:`` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in skip]


def _edges():
    root = Path(activelab.__file__).parent
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        src = parts[0]
        package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
        for node in _imports(ast.parse(path.read_text())):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:  # "from . import x" at the top of the package
                    target = [a.name for a in node.names][:1]
            elif (node.module or "").startswith("activelab."):
                target = node.module.split(".")[1:]
            else:
                continue
            yield str(path.relative_to(root)), src, target[0]


def test_every_top_level_module_has_a_layer():
    root = Path(activelab.__file__).parent
    names = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    assert names <= set(RANKS), f"give {sorted(names - set(RANKS))} a rank in this test"


def test_no_import_runs_up_a_layer():
    bad = [
        f"{where}: {src} -> {dst}"
        for where, src, dst in _edges()
        if dst != src and dst in RANKS and RANKS[dst] > RANKS[src]
    ]
    assert not bad, "imports that run back up a layer:\n" + "\n".join(sorted(bad))
