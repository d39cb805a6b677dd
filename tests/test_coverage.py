"""Coverage of rmse_interval on real per-seed errors of the tool's own sampler: for 20 disjoint ranges of N seeds,
the 95 % interval must hold the RMSE of all 20 N seeds in at least 90 % of the ranges, on gmm-mnist (heavy
tail: a few seeds flip mode) and on the Gaussian model (exact solution). The full study behind the choice of
BCa and of N is scripts/coverage_study.py (ddim, edm, dpm-solver++-2m at NFE 6 and 10, 5,120 seeds)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from iia_cli.config.experiment import load_config
from iia_cli.metrics import uncertainty as U

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from coverage_data import per_seed_sq  # noqa: E402

N = 128  # seeds per interval: the recommended evaluate.error_samples
RANGES = 20
ROOT = Path(__file__).resolve().parents[1]


def _coverage(sq, count, n=N):
    truth = U.rmse_value(sq, count)
    ivs = [U.rmse_interval(sq[r * n:(r + 1) * n], count[r * n:(r + 1) * n]) for r in range(len(sq) // n)]
    return np.mean([iv.low <= truth <= iv.high for iv in ivs]), ivs


@pytest.mark.slow
def test_coverage_gmm_mnist_heavy_tail():
    # dpm-solver++-2m at NFE 6: the study's heavy-tailed cell (the worst 5 % of seeds carry ~45 % of the squared
    # error); reference: the same solver at NFE 30 (its error is ~(6/30)^2 of NFE 6's), cheaper than NFE 999
    cfg = load_config(ROOT / "configs" / "mnist-gmm.yaml", [("sampler.device", "cpu")])
    seeds = list(range(10**6, 10**6 + RANGES * N))  # away from the study's seeds 0-5119
    (sq, count), = per_seed_sq(cfg, ["dpm-solver++-2m"], [6], seeds, ("dpm-solver++-2m", 30), 256).values()
    assert U.tail_share(sq) > 0.3  # the regime the warning and N are about
    cov, ivs = _coverage(sq, count)
    assert cov >= 0.9
    assert all(iv.method == "bootstrap-seeds-bca-2000" for iv in ivs)
    assert not any(iv.warning for iv in ivs)  # handled at N seeds ...
    _, small = _coverage(sq, count, 64)
    assert sum(bool(iv.warning) for iv in small) > len(small) // 2  # ... flagged at 64


def test_coverage_gaussian_exact_solution(tmp_path):
    path = tmp_path / "gaussian.yaml"
    path.write_text("experiment: gaussian-coverage\nmodel: {kind: gaussian, shape: [1, 8, 8]}\n"
                    "grid: {kind: karras, rho: 7, sigma_min: 0.002, sigma_max: 80}\nsampler: {device: cpu}\n")
    cfg = load_config(path)
    res = per_seed_sq(cfg, ["ddim", "edm", "dpm-solver++-2m"], [6, 10], list(range(RANGES * N)), None, 512,
                      exact=True)
    assert len(res) == 6
    for (method, nfe), (sq, count) in res.items():
        assert U.rmse_value(sq, count) > 1e-4, (method, nfe)  # a real integration error
        cov, ivs = _coverage(sq, count)
        assert cov >= 0.9, (method, nfe, cov)
        assert U.tail_share(sq) < 0.12 and not any(iv.warning for iv in ivs)  # light tail: no warning
