"""The package's import graph: no cycles, imports point down the floors, no module reaches
for another module's private names. Built from the source with ``ast`` (nothing is run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "funcreg"

# Each module's floor; a module imports only from its own floor or below. A new module must
# be given a floor here (docs/ARCHITECTURE.md says what each floor is for).
FLOORS: dict[str, int] = {
    # ground floor: checks, tensor-tree algebra, prox kernels, selectors, functional optimizers
    "_checks": 0,
    "_tree": 0,
    "selectors": 0,
    "prox": 0,
    "progress": 0,
    "optim": 0,
    "_secant": 0,
    "_foreach": 0,
    "losses": 0,
    # penalties, specs and what declares them
    "penalties": 1,
    "spec": 2,
    "declare": 3,
    "activity": 3,
    "keras": 4,
    # data layout and results
    "stack": 5,
    "result": 6,
    "plot": 6,
    "_report": 6,
    "_files": 0,
    # one step, classic loops
    "train": 7,
    "eager": 7,
    "hooks": 8,
    "lightning": 9,
    # the training engine
    "_data": 8,
    "_chunking": 8,
    "_plan": 8,
    "_checkpoint": 8,
    "_setup": 9,
    "_stacked": 9,
    "_graphs": 8,
    "_engine": 10,
    "distributed": 11,
    "_sweep": 12,
    # exact solvers
    "_lasso": 8,
    "_homotopy": 8,
    "_fista": 8,
    "_quadratic": 8,
    "_newton": 8,
    "_routes": 8,
    "solvers": 9,
    # applications
    "_folds": 13,
    "_path": 13,
    "_implicit": 12,
    "hypergrad": 13,
    "unrolled": 13,
    "_tune_net": 14,
    "selection": 14,
    "_working_set": 13,
    "tune": 15,
    "__init__": 16,
}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` for every ``from . import`` / ``from .x import`` /
    ``import funcreg.x`` in a file, function-level imports included; imports under
    ``if TYPE_CHECKING:`` are for the type checker only (never run) and do not count."""
    out: list[tuple[str, list[str], int]] = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # drop the type-checker-only blocks before walking
        if isinstance(node, ast.If) and ast.unparse(node.test) in {
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        }:
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1 and node.module:
                out.append((node.module.split(".")[0], names, node.lineno))
            elif node.level == 1:  # from . import a, b: each is a module
                out += [(n, [], node.lineno) for n in names]
            elif node.module and node.module.split(".")[0] == "funcreg":
                parts = node.module.split(".")
                if len(parts) > 1:
                    out.append((parts[1], names, node.lineno))
                else:
                    out += [(n, [], node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "funcreg" and len(parts) > 1:
                    out.append((parts[1], [], node.lineno))
    return out


MODULES = sorted(p.stem for p in PKG.glob("*.py"))
assert "penalties" in MODULES, PKG
GRAPH = {m: _imports(PKG / f"{m}.py") for m in MODULES}


def test_every_module_has_a_floor():
    missing = [m for m in MODULES if m not in FLOORS]
    assert not missing, f"give {missing} a floor in FLOORS (and a line in docs/ARCHITECTURE.md)"


def test_imports_point_down():
    wrong = [
        f"{m}.py:{line} imports {dep} (floor {FLOORS[dep]} above {FLOORS[m]})"
        for m in MODULES
        for dep, _, line in GRAPH[m]
        if dep in FLOORS and m in FLOORS and FLOORS[dep] > FLOORS[m]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges = {m: sorted({d for d, _, _ in GRAPH[m] if d in GRAPH and d != m}) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


def test_no_module_reaches_for_private_names():
    wrong = [
        f"{m}.py:{line} imports {n} from {dep}"
        for m in MODULES
        for dep, names, line in GRAPH[m]
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not wrong, "\n".join(wrong)


# penalties.py holds one class per penalty family and stays whole (one file to touch when a
# penalty is added); distributed.py keeps the sharded run, its packing and its status
# exchange together (one place to read what every rank does). Every other module stays
# within 600 lines.
LONG = {"penalties", "distributed"}


def test_modules_stay_small():
    sizes = {m: len((PKG / f"{m}.py").read_text().splitlines()) for m in MODULES}
    big = {m: n for m, n in sizes.items() if n > 600 and m not in LONG}
    assert not big, f"split these modules (lines): {big}"
