import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    """No hub downloads in tests; a hermetic model cache shared within the session."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    if "IIA_CACHE_DIR" not in os.environ:
        os.environ["IIA_CACHE_DIR"] = str(tmp_path_factory.mktemp("iia_cache"))
    yield


@pytest.fixture
def cli():
    """Run the ``iia`` Typer app in-process: cli(["sample", ...]) -> Result."""
    from typer.testing import CliRunner

    from iia_cli.cli import app

    runner = CliRunner()

    def run(args, **kw):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kw)

    return run
