"""The architecture as layers with one-way doors: the import-linter contract in pyproject.toml is kept, it places
every module of the package in a layer, the import graph (function-level imports included) has no cycle, and
package inits hold nothing that imports (the top one the version, the subpackages' a docstring)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "iia_cli"


def _contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract


def test_layers_contract_is_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.is_file():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    r = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "1 kept, 0 broken" in r.stdout


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def test_every_module_has_a_layer() -> None:
    """A new module (or subpackage) must be placed in the contract: otherwise import-linter ignores it. A layer
    names a subpackage (all of it) or a module; a subpackage split over layers is not named itself."""
    named = {m.strip() for layer in _contract()["layers"] for m in layer.replace("|", ":").split(":")}
    modules = set(_modules())
    assert not named - modules, f"no such module: {sorted(named - modules)}"
    split = {m for m in modules if any(n.startswith(m + ".") for n in named)}  # iia_cli and the packages split
    unplaced = {m for m in modules - split if not any(m == n or m.startswith(n + ".") for n in named)}
    assert not unplaced, f"not in a layer: {sorted(unplaced)}"
    overlapping = {n for n in named if any(n.startswith(o + ".") for o in named)}
    assert not overlapping, f"in two layers: {sorted(overlapping)}"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    succ = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            for j in range(i, len(succ[v])):
                w = succ[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
    return out


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycles() -> None:
    """Within a layer import-linter allows any direction; across the whole package no module may reach itself."""
    graph = grimp.build_graph("iia_cli")
    assert _cycles(graph) == []


def test_package_init_holds_the_version_only() -> None:
    """Importing any module must not load the whole stack through the package's ``__init__``."""
    r = subprocess.run([sys.executable, "-c", "import sys, iia_cli; print(sorted(m for m in sys.modules "
                        "if m.startswith('iia_cli')), iia_cli.__version__)"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("['iia_cli'] "), r.stdout


def test_subpackage_inits_hold_a_docstring_only() -> None:
    """A subpackage's ``__init__`` re-exports nothing: re-exports pull whole layers in and hide cycles. Its one
    line says what the subpackage holds."""
    inits = sorted(p for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE)
    assert len(inits) >= 10
    for p in inits:
        body = ast.parse(p.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), p
        assert isinstance(body[0].value.value, str) and "\n" not in body[0].value.value.strip(), p
