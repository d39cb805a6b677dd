"""Every benchmark and script imports against the current package (their main() is not run): a renamed or moved
name in iia_cli breaks the tools that cite the README's numbers, not only the package's own tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_imports(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(path.parent))  # benchmarks import their shared helpers (paired_rows)
    spec = importlib.util.spec_from_file_location(f"_check_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top-level code only: main() runs under __name__ == "__main__"
    if path.name != "paired_rows.py":  # the helper module the two error benchmarks share
        assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
