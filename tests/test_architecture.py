"""The architecture as layers with one-way doors: the import-linter contract in pyproject.toml is kept, it places
every module of the package in a layer, and the import graph (function-level imports included) has no cycle."""

from __future__ import annotations

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


def test_every_module_has_a_layer() -> None:
    """A new module (or subpackage) must be placed in the contract: otherwise import-linter ignores it."""
    named = {m.strip() for layer in _contract()["layers"] for m in layer.replace("|", ":").split(":")}
    present = {f"iia_cli.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    present |= {f"iia_cli.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert present == named, f"not in a layer: {sorted(present - named)}; no such module: {sorted(named - present)}"


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
