"""Where output files go: the one place that decides the layout under the results directory.

Everything the CLI writes by default lives under ``results/`` in the working directory (``RESULTS_DIR``);
model fits that any run may reuse live in the user cache (``$IIA_CACHE_DIR`` or ``~/.cache/iia_cli``)::

    results/<experiment>.csv                      evaluation rows (``results_csv``)
    results/coefficients/                         calibrated IIA coefficients (``coefficients_dir``)
    results/cache/reference-*.npz                 FID reference statistics of data specs (``reference_cache_dir``)
    results/cache/partial/                        checkpoints of interrupted evaluation passes (``partial_dir``)
    results/shards/<experiment>/                  shard files of ``evaluate --shard i/n`` (``shard_dir``)
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_DIR = Path("results")
ENV_CACHE_DIR = "IIA_CACHE_DIR"


def results_csv(experiment: str) -> Path:
    """The default results CSV of an experiment."""
    return RESULTS_DIR / f"{experiment}.csv"


def coefficients_dir() -> Path:
    """The default directory of calibrated coefficient files (``calibration.out_dir``)."""
    return RESULTS_DIR / "coefficients"


def reference_cache_dir() -> Path:
    """FID reference statistics computed from a data spec (``builtin:mnist``), reused across runs."""
    return RESULTS_DIR / "cache"


def partial_dir() -> Path:
    """Resumable checkpoints of evaluation passes."""
    return RESULTS_DIR / "cache" / "partial"


def shard_dir(experiment: str) -> Path:
    """Shard files of ``iia evaluate --shard i/n``, merged by ``iia merge``."""
    return RESULTS_DIR / "shards" / experiment


def model_cache_dir() -> Path:
    """Fitted built-in models (the MNIST mixture): ``$IIA_CACHE_DIR`` or ``~/.cache/iia_cli``."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env) if env else Path.home() / ".cache" / "iia_cli"
