"""The researcher's first hour: --version, help defaults that match what runs, lists in --set, messages that say
what happened, coefficient locations, sample grids and the paper configs' up-front file check."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_version_prints_version_and_git_revision(tmp_path):
    from iia_cli import __version__

    out = subprocess.run([sys.executable, "-m", "iia_cli", "--version"], capture_output=True, text=True,
                         cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if rev.returncode == 0:  # a checkout: the revision of the package's checkout, wherever the command runs
        assert out.stdout.startswith(f"iia {__version__} (git {rev.stdout.strip()}")
    else:
        assert out.stdout.strip() == f"iia {__version__}"


def test_version_without_checkout_is_the_version_alone(cli, monkeypatch):
    import iia_cli.results
    from iia_cli import __version__

    monkeypatch.setattr(iia_cli.results, "git_revision", lambda: "unknown")
    r = cli(["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"iia {__version__}"
