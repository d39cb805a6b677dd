"""iia_cli.metrics.uncertainty: exact encodings, FID/KID parity with the project's and torch-fidelity's estimators,
jackknife and bootstrap intervals against known answers, paired comparisons, determinism."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from iia_cli.metrics import uncertainty as U
from iia_cli.metrics.fid.stats import FeatureStats, frechet_distance


def _fid_of(X, mu_ref, sigma_ref):
    mu, sigma = FeatureStats.empty(X.shape[1]).update(X).mean_cov()
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def _features(rng, n, d, shift=0.0):
    """Inception-like features: non-negative, correlated, mean ~0.4."""
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    return np.abs(rng.normal(size=(n, d)) @ mix * 0.5 + 0.4 + shift)


def _ref_stats(rng, d, m=400):
    return FeatureStats.empty(d).update(_features(rng, m, d, 0.05)).mean_cov()


# --- encoding --------------------------------------------------------------------------------------------------


def test_encode_decode_exact_round_trip():
    a = np.array([0.1, -0.0, 1e-310, np.inf, -np.inf, np.nan, 2.0**-1074, 1 / 3, -1e308])
    text = U.encode_array(a)
    assert text.isascii() and "," not in text and "\n" not in text
    b = U.decode_array(text)
    assert b.dtype == np.float64 and b.shape == a.shape
    assert np.array_equal(a.view(np.uint64), b.view(np.uint64))  # every bit, -0.0 and NaN included
    assert U.decode_array(U.encode_array(np.arange(5, dtype=np.float32))).tolist() == [0, 1, 2, 3, 4]
    assert U.decode_array(U.encode_array(np.empty(0))).size == 0


# --- quantiles -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 9, 10, 29, 200])
def test_student_t_quantile_matches_scipy(dof):
    stats = pytest.importorskip("scipy.stats")
    for p in (0.5, 0.8, 0.975, 0.025, 0.999):
        assert U.student_t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-9, abs=1e-12)
    assert U.student_t_cdf(-1.3, dof) == pytest.approx(stats.t.cdf(-1.3, dof), rel=1e-12)


# --- blocks and jackknife --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(200, 10), (64, 10), (7, 10), (23, 5)])
def test_blocks_contiguous_and_balanced(n, k):
    parts = U.blocks(n, k)
    assert len(parts) == min(n, k)
    assert np.array_equal(np.concatenate(parts), np.arange(n))
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_jackknife_of_the_mean_is_the_t_interval_of_block_means():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.exponential(size=200)
    parts = U.blocks(200, 10)
    loo = np.array([np.delete(x, p).mean() for p in parts])
    iv = U.jackknife_interval(float(x.mean()), loo)
    means = np.array([x[p].mean() for p in parts])
    half = stats.t.ppf(0.975, 9) * means.std(ddof=1) / math.sqrt(10)
    assert iv.method == "jackknife-blocks-10" and iv.warning == ""
    assert iv.low == pytest.approx(x.mean() - half, rel=1e-9)
    assert iv.high == pytest.approx(x.mean() + half, rel=1e-9)


# --- FID -------------------------------------------------------------------------------------------------------


def test_fid_low_rank_route_matches_frechet_distance():
    rng = np.random.default_rng(2)
    d, n = 192, 60  # n < d: the s x s eigenproblem route
    mu_r, sigma_r = _ref_stats(rng, d)
    X = _features(rng, n, d)
    value, loo = U.fid_jackknife(X, mu_r, sigma_r, k=6)
    assert value == pytest.approx(_fid_of(X, mu_r, sigma_r), rel=1e-9)
    for j, part in enumerate(U.blocks(n, 6)):
        assert loo[j] == pytest.approx(_fid_of(np.delete(X, part, axis=0), mu_r, sigma_r), rel=1e-9)
    assert len(set(loo.tolist())) == 6  # each block really left out


def test_fid_moment_route_matches_frechet_distance():
    rng = np.random.default_rng(3)
    d, n = 24, 150  # n >= d: block moment sums
    mu_r, sigma_r = _ref_stats(rng, d)
    X = _features(rng, n, d)
    value, loo = U.fid_jackknife(X, mu_r, sigma_r, k=10)
    assert value == pytest.approx(_fid_of(X, mu_r, sigma_r), rel=1e-9)
    for j, part in enumerate(U.blocks(n, 10)):
        assert loo[j] == pytest.approx(_fid_of(np.delete(X, part, axis=0), mu_r, sigma_r), rel=1e-9)


# --- KID -------------------------------------------------------------------------------------------------------


def _kid_direct(X, Y):
    d = X.shape[1]
    kxx, kyy, kxy = ((A @ B.T / d + 1) ** 3 for A, B in ((X, X), (Y, Y), (X, Y)))
    n, m = len(X), len(Y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.sum() / (n * m))


def test_kid_matches_torch_fidelity_and_leave_one_block_out():
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    rng = np.random.default_rng(4)
    n, d = 80, 64
    X, Y = _features(rng, n, d), _features(rng, n, d, 0.1)
    value, loo = U.kid_jackknife(X, Y, k=8)
    theirs = kid_features_to_metric(torch.from_numpy(X), torch.from_numpy(Y), kid_subsets=1, kid_subset_size=n,
                                    verbose=False, rng_seed=0)[KEY_METRIC_KID_MEAN]
    assert value == pytest.approx(theirs, rel=1e-9)
    for j, part in enumerate(U.blocks(n, 8)):
        assert loo[j] == pytest.approx(_kid_direct(np.delete(X, part, axis=0), Y), rel=1e-9)
    Y2 = _features(rng, 130, d)  # m != n: the all-samples U-statistic
    assert U.kid_jackknife(X, Y2)[0] == pytest.approx(_kid_direct(X, Y2), rel=1e-9)


def test_kid_interval_contains_zero_for_same_distribution_and_resolves_a_shift():
    rng = np.random.default_rng(5)
    d = 32
    pool = _features(rng, 800, d)
    same = U.jackknife_interval(*U.kid_jackknife(pool[:400], pool[400:]))
    assert same.low < 0 < same.high
    shifted = U.jackknife_interval(*U.kid_jackknife(pool[:400] + 0.15, pool[400:]))
    assert shifted.low > 0


# --- FD-infinity -----------------------------------------------------------------------------------------------


def test_fd_inf_is_closer_to_the_true_distance_than_fid():
    rng = np.random.default_rng(6)
    d, n = 32, 200
    a = rng.normal(size=(d, d)) / math.sqrt(d)
    cov1, cov2 = a @ a.T + 0.5 * np.eye(d), np.eye(d) * 0.8
    mu1, mu2 = np.zeros(d), np.full(d, 0.1)
    truth = frechet_distance(mu1, cov1, mu2, cov2)
    chol = np.linalg.cholesky(cov1)
    err_fid, err_inf = [], []
    for _ in range(6):
        X = mu1 + rng.normal(size=(n, d)) @ chol.T
        fid, _ = U.fid_jackknife(X, mu2, cov2)
        inf, loo = U.fd_inf_jackknife(X, mu2, cov2)
        assert np.isfinite(loo).all() and loo.size == 10
        err_fid.append(fid - truth)
        err_inf.append(inf - truth)
    assert np.mean(err_fid) > 0  # FID of n samples is biased upward ...
    assert abs(np.mean(err_inf)) < 0.5 * np.mean(err_fid)  # ... FD-infinity removes most of that bias
    assert np.mean(np.abs(err_inf)) < 0.7 * np.mean(np.abs(err_fid))


def test_fd_inf_sizes():
    sizes = U.fd_inf_sizes(200)
    assert sizes[0] == 40 and sizes[-1] == 200 and len(sizes) == 8
    assert np.allclose(1.0 / sizes, np.linspace(1 / 40, 1 / 200, 8), rtol=0.03)  # evenly spaced in 1/s
    assert U.fd_inf_sizes(6)[0] == 2


# --- integration RMSE ------------------------------------------------------------------------------------------


def _errors(rng, n, scale=1.0, elements=64):
    """Per-seed squared-error sums of ``elements`` Gaussian errors with a per-seed scale (light tail)."""
    s = scale * np.exp(0.3 * rng.normal(size=n))
    return (s[:, None] * rng.normal(size=(n, elements))) ** 2


def test_rmse_value_and_interval():
    rng = np.random.default_rng(7)
    e = _errors(rng, 128)
    sq, count = e.sum(1), np.full(128, 64.0)
    value = U.rmse_value(sq, count)
    assert value == pytest.approx(math.sqrt(e.mean()), rel=1e-12)
    iv = U.rmse_interval(sq, count)
    assert iv.method == "bootstrap-seeds-bca-2000"
    assert iv.low < value < iv.high and iv.warning == ""
    # width ~ 2 * 1.96 * sd of the RMSE: per-seed MSE has a relative sd ~0.35 here, so the RMSE's is ~0.35/2/sqrt(n)
    rel = (iv.high - iv.low) / value
    assert 0.02 < rel < 0.2
    pct = U.rmse_interval(sq, count, variant="percentile")
    assert pct.method == "bootstrap-seeds-percentile-2000" and pct.low < value < pct.high
    assert pct.low != iv.low and abs(pct.low - iv.low) < 0.2 * (iv.high - iv.low)  # two variants, close here


def test_tail_share_and_heavy_tail_warning():
    assert U.tail_share(np.ones(100)) == pytest.approx(0.05)  # 5 seeds of 100
    assert U.tail_share(np.ones(20)) == pytest.approx(0.05)  # 1 seed of 20
    assert U.tail_share(np.ones(21)) == pytest.approx(2 / 21)  # ceil(1.05) = 2
    assert U.tail_share(np.r_[np.ones(19), 81.0]) == pytest.approx(0.81)
    assert U.tail_share(np.zeros(5)) == 0.0
    sq = np.r_[np.ones(60), [50.0, 40.0, 1.0, 1.0]]  # two mode flips among 64 seeds
    iv = U.rmse_interval(sq, np.ones(64))
    assert iv.warning == ("heavy tail: the worst 5% of seeds carry 61% of the squared error; "
                          "the interval may be too narrow below 128 seeds")
    assert U.rmse_interval(np.ones(64) + np.arange(64) / 64, np.ones(64)).warning == ""
    assert U.rmse_interval(np.r_[sq, sq], np.ones(128)).warning == ""  # handled at 128 seeds (coverage study)
    extreme = U.rmse_interval(np.r_[np.full(190, 0.01), np.full(10, 100.0)], np.ones(200)).warning
    assert extreme.startswith("heavy tail: the worst 5% of seeds carry 100%") and extreme.endswith("too narrow")


# --- paired comparisons ----------------------------------------------------------------------------------------


def test_paired_with_itself_is_ratio_one_and_never_resolved():
    rng = np.random.default_rng(8)
    for trial in range(5):
        sq = _errors(rng, 64).sum(1)
        p = U.paired_rmse(sq, np.full(64, 64.0), sq, np.full(64, 64.0))
        assert p.ratio == 1.0 and p.low == 1.0 and p.high == 1.0 and not p.resolved
        assert p.prob_improvement == 0.5 and p.n == 64
        assert U.seeds_to_resolve(64, p) is None


def test_clearly_better_method_is_resolved():
    rng = np.random.default_rng(9)
    n = 64
    e_b = _errors(rng, n)
    e_a = 0.25 * e_b * np.exp(0.2 * rng.normal(size=(n, 1)))  # errors halved (squared errors quartered), noise
    cnt = np.full(n, 64.0)
    p = U.paired_rmse(e_a.sum(1), cnt, e_b.sum(1), cnt)
    assert p.resolved and p.high < 1 and p.low < p.ratio < p.high
    assert p.ratio == pytest.approx(math.sqrt(e_a.sum() / e_b.sum()), rel=1e-12)
    assert 0.4 < p.ratio < 0.6 and p.prob_improvement > 0.95
    assert U.seeds_to_resolve(n, p) == n
    q = U.paired_rmse(e_b.sum(1), cnt, e_a.sum(1), cnt)  # the other way round: above 1
    assert q.resolved and q.low > 1 and q.prob_improvement < 0.05


def test_paired_interval_is_narrower_than_unpaired_with_shared_noise():
    rng = np.random.default_rng(10)
    n = 128
    shared = _errors(rng, n)  # both methods err mostly on the same seeds
    e_a = 0.9 * shared + 0.05 * _errors(rng, n)
    e_b = shared + 0.05 * _errors(rng, n)
    cnt = np.full(n, 64.0)
    p = U.paired_rmse(e_a.sum(1), cnt, e_b.sum(1), cnt)
    ia, ib = U.rmse_interval(e_a.sum(1), cnt), U.rmse_interval(e_b.sum(1), cnt)
    unpaired_log_width = math.hypot(math.log(ia.high / ia.low), math.log(ib.high / ib.low))
    assert math.log(p.high / p.low) < 0.3 * unpaired_log_width
    assert p.resolved  # a 5 % effect, invisible to two separate intervals ...
    assert ia.high > ib.low  # ... which overlap


def test_paired_resolved_is_false_for_nan():
    p = U.Paired(math.nan, math.nan, math.nan, "x", None, 0)
    assert not p.resolved
    assert U.seeds_to_resolve(10, p) is None


def test_paired_jackknife_of_ratio():
    rng = np.random.default_rng(11)
    a, b = rng.normal(10, 1, 200), rng.normal(12, 1, 200)
    parts = U.blocks(200)
    loo_a = np.array([np.delete(a, p).mean() for p in parts])
    loo_b = np.array([np.delete(b, p).mean() for p in parts])
    p = U.paired_jackknife(a.mean(), loo_a, b.mean(), loo_b, n=200)
    direct = U.jackknife_interval(a.mean() / b.mean(), loo_a / loo_b, "paired-jackknife-blocks")
    assert (p.ratio, p.low, p.high, p.method) == (a.mean() / b.mean(), direct.low, direct.high, direct.method)
    assert p.resolved and p.high < 1 and p.prob_improvement is None and p.n == 200
    same = U.paired_jackknife(a.mean(), loo_a, a.mean(), loo_a)
    assert same.ratio == 1.0 and not same.resolved


def test_seeds_to_resolve_predicts_enough_seeds():
    """A 6 % effect unresolved at n = 64 seeds: at the suggested number of seeds, fresh data with the same
    effect resolves most of the time (the suggestion aims at 80 %), far more often than at n."""
    rng = np.random.default_rng(13)

    def draw(n):  # method a: RMSE x0.94 of b's on average, with per-seed noise in the ratio
        b = _errors(rng, n).sum(1)
        return 0.94**2 * b * np.exp(0.9 * rng.normal(size=n) - 0.405), b

    def resolves(n):
        a, b = draw(n)
        return U.paired_rmse(a, np.ones(n), b, np.ones(n)).resolved

    n = 64
    a, b = draw(n)
    p = U.paired_rmse(a, np.ones(n), b, np.ones(n))
    assert not p.resolved and p.ratio < 1
    big = U.seeds_to_resolve(n, p)
    assert big is not None and 2 * n < big < 100 * n
    resolved_big = sum(resolves(big) for _ in range(20))
    resolved_small = sum(resolves(n) for _ in range(20))
    assert resolved_big >= 12 and resolved_small <= 9 and resolved_big > resolved_small


# --- determinism -----------------------------------------------------------------------------------------------


def _bits(*values):
    return np.array(values, dtype=np.float64).view(np.uint64).tolist()


def test_intervals_are_deterministic_bit_for_bit():
    rng = np.random.default_rng(13)
    sq, cnt = _errors(rng, 100).sum(1), np.full(100, 64.0)
    sq_b = _errors(rng, 100).sum(1)
    first = U.rmse_interval(sq, cnt)
    np.random.seed(99)  # the global numpy state plays no part
    np.random.default_rng().random(10)
    second = U.rmse_interval(sq.copy(), cnt.copy())
    assert _bits(first.low, first.high) == _bits(second.low, second.high)
    perm = rng.permutation(100)
    shuffled, back = sq[perm], np.empty(100)
    back[perm] = shuffled
    third = U.rmse_interval(back, cnt)
    assert _bits(first.low, first.high) == _bits(third.low, third.high)
    p1, p2 = U.paired_rmse(sq, cnt, sq_b, cnt), U.paired_rmse(back, cnt, sq_b.copy(), cnt)
    assert _bits(p1.ratio, p1.low, p1.high) == _bits(p2.ratio, p2.low, p2.high)
    # another process, from the exact text form of the arrays
    code = ("import sys, numpy as np; from iia_cli.metrics import uncertainty as U; "
            "sq = U.decode_array(sys.argv[1]); iv = U.rmse_interval(sq, np.full(sq.size, 64.0)); "
            "print(U.encode_array(np.array([iv.low, iv.high])))")
    out = subprocess.run([sys.executable, "-c", code, U.encode_array(sq)], capture_output=True, text=True, check=True)
    assert _bits(*U.decode_array(out.stdout.strip())) == _bits(first.low, first.high)
    # but a real reordering of the seeds is a different resample (the interval follows the seeds' order)
    other = U.rmse_interval(shuffled, cnt)
    assert _bits(other.low, other.high) != _bits(first.low, first.high)
