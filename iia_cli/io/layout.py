"""Where output files go: the one place that decides the layout under the results directory.

Everything the CLI writes by default lives under ``results/`` (``RESULTS_DIR``) of the anchor: ``$IIA_HOME`` when
set, else the working directory. A relative ``calibration.out_dir`` or ``evaluate.csv`` resolves against the same
anchor (:func:`anchored`), so with ``IIA_HOME`` set the same command finds the same coefficient files from any
directory; without it the paths stay relative to the working directory (and are recorded as before). Model fits
that any run may reuse live in the user cache (``$IIA_CACHE_DIR`` or ``~/.cache/iia_cli``)::

    results/<experiment>.csv                      evaluation rows (``results_csv``)
    results/coefficients/                         calibrated IIA coefficients (``coefficients_dir``)
    results/cache/reference-*.npz                 FID reference statistics of data specs (``reference_cache_dir``)
    results/cache/partial/                        checkpoints of interrupted evaluations, calibrations (``partial_dir``)
    results/shards/<experiment>/                  shard files of ``evaluate --shard i/n`` (``shard_dir``)
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_DIR = Path("results")
ENV_CACHE_DIR = "IIA_CACHE_DIR"
ENV_HOME = "IIA_HOME"


def anchored(path: str | Path) -> Path:
    """A relative output path under ``$IIA_HOME`` when it is set; otherwise (or absolute) the path as given."""
    home = os.environ.get(ENV_HOME)
    p = Path(path).expanduser()
    return Path(home).expanduser() / p if home and not p.is_absolute() else p


def where(path: str | Path) -> str:
    """A path as messages print it: relative ones also with the directory they are relative to."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    return f"{p} (under {Path.cwd()}; set {ENV_HOME} to anchor results/ elsewhere)"


def results_dir() -> Path:
    """``results/`` under the anchor (``$IIA_HOME`` or the working directory)."""
    return anchored(RESULTS_DIR)


def results_csv(experiment: str) -> Path:
    """The default results CSV of an experiment."""
    return results_dir() / f"{experiment}.csv"


def coefficients_dir() -> Path:
    """The default directory of calibrated coefficient files (``calibration.out_dir``)."""
    return results_dir() / "coefficients"


def reference_cache_dir() -> Path:
    """FID reference statistics computed from a data spec (``builtin:mnist``), reused across runs."""
    return results_dir() / "cache"


def partial_dir() -> Path:
    """Resumable checkpoints of evaluation passes and calibrations (``calibration-<key>-r<rank>of<world>/``)."""
    return results_dir() / "cache" / "partial"


def shard_dir(experiment: str) -> Path:
    """Shard files of ``iia evaluate --shard i/n``, merged by ``iia merge``."""
    return results_dir() / "shards" / experiment


def model_cache_dir() -> Path:
    """Fitted built-in models (the MNIST mixture): ``$IIA_CACHE_DIR`` or ``~/.cache/iia_cli``."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env) if env else Path.home() / ".cache" / "iia_cli"
