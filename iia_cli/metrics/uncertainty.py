"""95 % intervals for every result row, paired comparisons of two methods on the same seeds, KID and FD-infinity.

Pure numpy (plus the standard library for the normal distribution); deterministic: the bootstrap draws its seed
indices from a numpy Generator with a fixed seed, so the same arrays give the same bits in any process.

* Integration RMSE (per-seed squared-error sums ``sq`` and element counts ``count``): bootstrap over seeds
  (:func:`rmse_interval`), paired bootstrap of the ratio of two methods on the same seeds (:func:`paired_rmse`),
  and a heavy-tail check (:func:`tail_share`): when a few seeds carry most of the squared error, the bootstrap
  is over-confident and the interval says so in ``warning``.
* Distribution metrics (FID, KID, FD-infinity) from per-sample Inception features: a block jackknife over the
  seeds in order (:func:`blocks`, :func:`jackknife_interval`, :func:`paired_jackknife`).
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
JACKKNIFE_BLOCKS = 10
TAIL_FRACTION = 0.05  # "worst 5 % of seeds"

BOOTSTRAP_SEED = 20240917  # fixed: every process draws the same resampled seed indices for the same n
BOOTSTRAP_CHUNK = 250  # resamples drawn per Generator call (fixed, so the stream never depends on memory)
BOOTSTRAP_VARIANT = "bca"  # chosen by the coverage study (see rmse_interval); "percentile" also available
# The heavy-tail warning (see rmse_interval): the worst TAIL_FRACTION of seeds carry more than TAIL_WARNING_SHARE
# of the squared error and there are fewer than TAIL_WARNING_SEEDS seeds, or more than TAIL_WARNING_EXTREME at any n.
TAIL_WARNING_SHARE = 0.25
TAIL_WARNING_SEEDS = 128
TAIL_WARNING_EXTREME = 0.8
POWER = 0.8  # seeds_to_resolve: probability that a fresh run with the observed effect resolves
FD_INF_SIZES = 8  # FD-infinity: subset sizes per fit
FD_INF_SEED = 20200614  # FD-infinity: the fixed seed of the subset order

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Interval:
    """A 95 % interval; ``method`` names how it was computed (CSV column ci_method), ``warning`` is "" or one
    short sentence (CSV column ci_warning)."""

    low: float
    high: float
    method: str
    warning: str = ""


@dataclass(frozen=True)
class Paired:
    """Method a against method b on the same seeds: ``ratio`` = value_a / value_b and its 95 % interval."""

    ratio: float
    low: float
    high: float
    method: str
    prob_improvement: float | None  # share of seeds where a's per-seed error < b's (ties 1/2); None if not per-seed
    n: int  # seeds used (0: not known, e.g. a jackknife given only block values)
    warning: str = ""

    @property
    def resolved(self) -> bool:
        """The interval excludes 1 (strictly); False when it is NaN."""
        return bool(self.low > 1.0 or self.high < 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Exact text form of per-seed arrays (CSV / JSON cells)


def encode_array(a: np.ndarray) -> str:
    """A 1-D array as float64 little-endian bytes in base64 ASCII; :func:`decode_array` gives the same bits back."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim > 1:
        raise ValueError(f"encode_array takes a 1-D array, got shape {list(arr.shape)}")
    return base64.b64encode(np.ascontiguousarray(arr.reshape(-1), dtype="<f8").tobytes()).decode("ascii")


def decode_array(text: str) -> np.ndarray:
    """The float64 array written by :func:`encode_array`."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 8:
        raise ValueError(f"encoded array has {len(raw)} bytes, not a multiple of 8")
    return np.frombuffer(raw, dtype="<f8").astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Distribution quantiles (standard library and numpy only)


def student_t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    if dof < 1 or dof != int(dof):
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {dof}")
    dof = int(dof)
    theta = math.atan(abs(t) / math.sqrt(dof))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2:  # odd
        series, term = 0.0, 1.0
        if dof > 1:
            series = 1.0
            for j in range(1, (dof - 3) // 2 + 1):
                term *= c2 * (2 * j) / (2 * j + 1)
                series += term
        two_sided = 2 / math.pi * (theta + s * math.cos(theta) * series)
    else:
        series, term = 1.0, 1.0
        for j in range(1, (dof - 2) // 2 + 1):
            term *= c2 * (2 * j - 1) / (2 * j)
            series += term
        two_sided = s * series
    return 0.5 + math.copysign(0.5 * two_sided, t) if t else 0.5


def student_t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t (integer dof), by bisection on :func:`student_t_cdf` to ~1e-12."""
    if not 0 < p < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, dof) > p:
        lo *= 2
    while student_t_cdf(hi, dof) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if student_t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------------------------------
# Integration RMSE: bootstrap over seeds


def _as_pair(sq, count) -> tuple[np.ndarray, np.ndarray]:
    sq = np.asarray(sq, dtype=np.float64).reshape(-1)
    count = np.asarray(count, dtype=np.float64).reshape(-1)
    if sq.shape != count.shape:
        raise ValueError(f"sq has {sq.size} seeds, count {count.size}")
    if sq.size == 0:
        raise ValueError("no seeds")
    if not (np.isfinite(sq).all() and np.isfinite(count).all()) or (sq < 0).any() or (count <= 0).any():
        raise ValueError("sq must be finite and >= 0, count finite and > 0")
    return sq, count


def rmse_value(sq, count) -> float:
    """sqrt(sum sq / sum count)."""
    sq, count = _as_pair(sq, count)
    return math.sqrt(float(sq.sum()) / float(count.sum()))


def _resample_sums(n: int, columns: list[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES) -> list[np.ndarray]:
    """For each column c [n], the sums of c over ``resamples`` bootstrap resamples of the n seeds (with
    replacement); every column uses the same resampled indices. Deterministic: a fixed-seed Generator, fixed
    chunks."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    out = [np.empty(resamples) for _ in columns]
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        for col, dest in zip(columns, out):
            dest[start : start + size] = col[idx].sum(axis=1)
    return out


def _bootstrap_bounds(boot: np.ndarray, theta: float, loo: np.ndarray, variant: str) -> tuple[float, float]:
    """Two-sided CONFIDENCE bounds from bootstrap replicates ``boot`` of a statistic with value ``theta``;
    ``loo``: its leave-one-seed-out values (for BCa's acceleration)."""
    alpha = (1 - CONFIDENCE) / 2
    if variant == "percentile":
        q = (alpha, 1 - alpha)
    elif variant == "bca":
        b = len(boot)
        share = (np.count_nonzero(boot < theta) + 0.5 * np.count_nonzero(boot == theta)) / b
        z0 = _NORMAL.inv_cdf(min(max(share, 0.5 / b), 1 - 0.5 / b))
        dev = loo.mean() - loo
        denom = 6 * float((dev**2).sum()) ** 1.5
        acc = float((dev**3).sum()) / denom if denom > 0 else 0.0
        q = []
        for level in (alpha, 1 - alpha):
            z = _NORMAL.inv_cdf(level)
            q.append(_NORMAL.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z))))
    else:
        raise ValueError(f"unknown bootstrap variant {variant!r}")
    lo, hi = np.quantile(boot, q)
    return float(lo), float(hi)


def tail_share(sq, fraction: float = TAIL_FRACTION) -> float:
    """Share of sum(sq) carried by the worst ceil(fraction * n) seeds (at least one); 0 when all sq are 0."""
    sq = np.asarray(sq, dtype=np.float64).reshape(-1)
    if sq.size == 0:
        raise ValueError("no seeds")
    total = float(sq.sum())
    if total <= 0:
        return 0.0
    m = max(1, math.ceil(round(fraction * sq.size, 9)))
    return float(np.sort(sq)[::-1][:m].sum()) / total


def _tail_warning(sq: np.ndarray, what: str = "") -> str:
    share = tail_share(sq)
    if share > TAIL_WARNING_EXTREME:
        advice = "the interval may be too narrow"
    elif share > TAIL_WARNING_SHARE and sq.size < TAIL_WARNING_SEEDS:
        advice = f"the interval may be too narrow below {TAIL_WARNING_SEEDS} seeds"
    else:
        return ""
    return f"heavy tail{what}: the worst {TAIL_FRACTION:.0%} of seeds carry {share:.0%} of the squared error; {advice}"


def rmse_interval(sq, count, variant: str = BOOTSTRAP_VARIANT, resamples: int = BOOTSTRAP_RESAMPLES) -> Interval:
    """95 % bootstrap interval of the RMSE over seeds (resampling whole seeds, so each seed's element count
    goes with its squared error).

    Variant: BCa (method ``bootstrap-seeds-bca-2000``; ``variant="percentile"`` gives the percentile interval).
    Chosen by the coverage study (scripts/coverage_data.py, scripts/coverage_study.py, tests/test_coverage.py):
    on gmm-mnist (ddim, edm, dpm-solver++-2m at NFE 6 and 10, 5,120 seeds against a 50-step Heun solve), the
    share of disjoint seed ranges whose interval held the RMSE of all seeds was, worst case over the six
    method/NFE cells, 86 % (percentile) vs 88 % (BCa) at 64 seeds, 90 % vs 92.5 % at 128 and 90 % vs 90 % at 256;
    on the Gaussian model (light tail) both held >= 97.5 % at every N.

    Heavy tails: on gmm-mnist the worst 5 % of seeds carry 12-64 % of the squared error (mode flips); the
    intervals that miss are those of ranges that drew no rare large error, so a range's own tail share cannot
    single them out, but it shows the distribution is heavy-tailed. At 64 seeds coverage fell below 90 % exactly
    in the cells whose tail share was >= 0.24; at 128 seeds every cell held (tail shares up to 0.65). So
    ``warning`` is set when the worst 5 % carry more than TAIL_WARNING_SHARE (25 %) with fewer than
    TAIL_WARNING_SEEDS (128) seeds, or more than TAIL_WARNING_EXTREME (80 %, beyond anything the study saw) at any
    number of seeds. Deterministic: identical bits for identical arrays in any process.
    """
    sq, count = _as_pair(sq, count)
    n = sq.size
    value = rmse_value(sq, count)
    method = f"bootstrap-seeds-{variant}-{resamples}"
    if n < 2:
        return Interval(math.nan, math.nan, method, "one seed: no interval")
    s_sq, s_cnt = _resample_sums(n, [sq, count], resamples)
    boot = np.sqrt(s_sq / s_cnt)
    loo = np.sqrt((sq.sum() - sq) / (count.sum() - count)) if variant == "bca" else np.empty(0)
    lo, hi = _bootstrap_bounds(boot, value, loo, variant)
    return Interval(lo, hi, method, _tail_warning(sq))


def paired_rmse(sq_a, count_a, sq_b, count_b, variant: str = BOOTSTRAP_VARIANT,
                resamples: int = BOOTSTRAP_RESAMPLES) -> Paired:
    """RMSE_a / RMSE_b on the same seeds with a 95 % bootstrap interval that resamples the seeds jointly (the
    same indices for a and b, so noise shared by both methods cancels), and the share of seeds on which a's
    per-seed MSE is lower than b's (ties count 1/2)."""
    sq_a, count_a = _as_pair(sq_a, count_a)
    sq_b, count_b = _as_pair(sq_b, count_b)
    if sq_a.size != sq_b.size:
        raise ValueError(f"paired comparison needs the same seeds: {sq_a.size} vs {sq_b.size}")
    n = sq_a.size
    ratio = rmse_value(sq_a, count_a) / rmse_value(sq_b, count_b) if sq_b.sum() > 0 else math.nan
    mse_a, mse_b = sq_a / count_a, sq_b / count_b
    prob = float(np.mean((mse_a < mse_b) + 0.5 * (mse_a == mse_b)))
    method = f"paired-bootstrap-seeds-{variant}-{resamples}"
    warning = _tail_warning(sq_a, " (a)") or _tail_warning(sq_b, " (b)")
    if n < 2 or not math.isfinite(ratio):
        return Paired(ratio, math.nan, math.nan, method, prob, n, warning)
    a_sq, a_cnt, b_sq, b_cnt = _resample_sums(n, [sq_a, count_a, sq_b, count_b], resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.sqrt((a_sq / a_cnt) / (b_sq / b_cnt))
    loo = np.empty(0)
    if variant == "bca":
        with np.errstate(divide="ignore", invalid="ignore"):
            loo = np.sqrt(((sq_a.sum() - sq_a) / (count_a.sum() - count_a))
                          / ((sq_b.sum() - sq_b) / (count_b.sum() - count_b)))
    if not np.isfinite(boot).all():  # a resample where b has no error at all
        return Paired(ratio, math.nan, math.nan, method, prob, n, warning)
    lo, hi = _bootstrap_bounds(boot, ratio, loo, variant)
    return Paired(ratio, lo, hi, method, prob, n, warning)


def seeds_to_resolve(n: int, paired: Paired) -> int | None:
    """About how many seeds would make an unresolved comparison resolve at the observed effect: the interval's
    half-width on the log-ratio scale (the side towards 1) shrinks like 1/sqrt(N), and N is chosen so that a
    fresh run whose true effect is the observed one resolves with probability about POWER (80 %):
    N = n * ((z_0.975 + z_0.8) / z_0.975)^2 * (half-width / |log ratio|)^2.
    Returns n when already resolved, None when the ratio is 1 or any of ratio/low/high is not finite or <= 0."""
    r, lo, hi = paired.ratio, paired.low, paired.high
    if not all(math.isfinite(v) and v > 0 for v in (r, lo, hi)) or r == 1.0:
        return None
    if paired.resolved:
        return int(n)
    effect = abs(math.log(r))
    half = math.log(hi / r) if r < 1 else math.log(r / lo)
    z_a = _NORMAL.inv_cdf(1 - (1 - CONFIDENCE) / 2)
    z_b = _NORMAL.inv_cdf(POWER)
    return max(int(n), math.ceil(n * ((z_a + z_b) / z_a) ** 2 * (half / effect) ** 2))


# ---------------------------------------------------------------------------------------------------------------
# Block jackknife


def blocks(n: int, k: int = JACKKNIFE_BLOCKS) -> list[np.ndarray]:
    """Seeds 0..n-1 in order split into min(k, n) contiguous blocks whose sizes differ by at most one (the
    larger ones first)."""
    if n < 1 or k < 1:
        raise ValueError(f"blocks need n >= 1 and k >= 1, got n={n}, k={k}")
    k = min(k, n)
    size, extra = divmod(n, k)
    edges = np.cumsum([0] + [size + (j < extra) for j in range(k)])
    return [np.arange(edges[j], edges[j + 1]) for j in range(k)]


def jackknife_interval(value: float, loo: np.ndarray, method_prefix: str = "jackknife-blocks") -> Interval:
    """value +- t_{k-1, 0.975} * sqrt((k-1)/k * sum (loo_j - mean(loo))^2), from the k leave-one-block-out
    values ``loo``. For the sample mean with equal blocks this is exactly the t-interval of the k block means."""
    loo = np.asarray(loo, dtype=np.float64).reshape(-1)
    k = loo.size
    method = f"{method_prefix}-{k}"
    if k < 2 or not math.isfinite(value) or not np.isfinite(loo).all():
        return Interval(math.nan, math.nan, method, "too few blocks for an interval" if k < 2 else "")
    se = math.sqrt((k - 1) / k * float(((loo - loo.mean()) ** 2).sum()))
    t = student_t_quantile(1 - (1 - CONFIDENCE) / 2, k - 1)
    return Interval(value - t * se, value + t * se, method)


def paired_jackknife(value_a: float, loo_a: np.ndarray, value_b: float, loo_b: np.ndarray, n: int = 0) -> Paired:
    """value_a / value_b with the block-jackknife interval of the ratio, computed from the ratios of the
    leave-one-block-out values (the same blocks of the same seeds for a and b). ``n``: seeds used, if known."""
    loo_a = np.asarray(loo_a, dtype=np.float64).reshape(-1)
    loo_b = np.asarray(loo_b, dtype=np.float64).reshape(-1)
    if loo_a.shape != loo_b.shape:
        raise ValueError(f"paired jackknife needs the same blocks: {loo_a.size} vs {loo_b.size}")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = value_a / value_b if value_b != 0 else math.nan
        loo = loo_a / loo_b
    iv = jackknife_interval(ratio, loo, "paired-jackknife-blocks")
    return Paired(ratio, iv.low, iv.high, iv.method, None, int(n), iv.warning)


# ---------------------------------------------------------------------------------------------------------------
# FID of many subsets of one feature set


def _clean_psd(w: np.ndarray, dim: int) -> np.ndarray:
    """Eigenvalues below rounding level (dim * eps * max) set to 0, as iia_cli.metrics.fid.stats does for its
    dim x dim problem, so that both routes treat the null space alike."""
    tol = max(float(w.max(initial=0.0)), 0.0) * dim * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


class _SubsetFID:
    """FID of any subset of the rows of X against (mu_ref, sigma_ref).

    n < d: the low-rank route. With A = H X_S (H the s x s centring matrix) Sigma_S = A^T A / (s-1), the non-zero
    eigenvalues of Sigma_S Sigma_ref are those of H X_S Sigma_ref X_S^T H / (s-1), so after Q = X Sigma_ref X^T,
    G = X X^T and X mu_ref (once) each subset costs one s x s symmetric eigenproblem.
    n >= d: moment sums and iia_cli.metrics.fid.stats.frechet_distance."""

    def __init__(self, X: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        mu_ref = np.asarray(mu_ref, dtype=np.float64).reshape(-1)
        sigma_ref = np.asarray(sigma_ref, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != mu_ref.size or sigma_ref.shape != (mu_ref.size,) * 2:
            raise ValueError(f"features {list(X.shape)}, mu_ref {list(mu_ref.shape)}, sigma_ref "
                             f"{list(sigma_ref.shape)} do not match")
        self.X, self.mu_ref, self.sigma_ref = X, mu_ref, sigma_ref
        self.n, self.d = X.shape
        self.low_rank = self.n < self.d
        if self.low_rank:
            sym = (sigma_ref + sigma_ref.T) / 2
            Q = X @ sym @ X.T
            self.Q = (Q + Q.T) / 2
            self.G = X @ X.T
            self.Xmu = X @ mu_ref
            self.mu2 = float(mu_ref @ mu_ref)
            self.tr_ref = float(np.trace(sigma_ref))

    def fid(self, idx: np.ndarray) -> float:
        idx = np.asarray(idx)
        s = idx.size
        if s < 2:
            raise ValueError(f"FID needs at least 2 samples, got {s}")
        if not self.low_rank:
            return self._fid_moments(self.X[idx].sum(axis=0), self.X[idx].T @ self.X[idx], s)
        G = self.G[np.ix_(idx, idx)]
        Q = self.Q[np.ix_(idx, idx)]
        mean_term = float(G.sum()) / s**2 - 2 * float(self.Xmu[idx].sum()) / s + self.mu2
        tr_sigma = (float(np.trace(G)) - float(G.sum()) / s) / (s - 1)  # tr(H G H) / (s - 1)
        Qc = Q - Q.mean(axis=0, keepdims=True)
        Qc = Qc - Qc.mean(axis=1, keepdims=True)  # H Q H
        w = np.linalg.eigvalsh((Qc + Qc.T) / (2 * (s - 1)))
        tr_sqrt = float(np.sqrt(_clean_psd(w, self.d)).sum())
        return mean_term + tr_sigma + self.tr_ref - 2 * tr_sqrt

    def _fid_moments(self, total: np.ndarray, outer: np.ndarray, s: int) -> float:
        from .fid.stats import frechet_distance

        mu = total / s
        sigma = (outer - s * np.outer(mu, mu)) / (s - 1)  # as FeatureStats.mean_cov
        return frechet_distance(mu, (sigma + sigma.T) / 2, self.mu_ref, self.sigma_ref)


_SUBSET_FID_CACHE: dict[bytes, _SubsetFID] = {}


def _subset_fid(X, mu_ref, sigma_ref) -> _SubsetFID:
    """The _SubsetFID of these arrays, kept for the last two argument sets (keyed by a hash of their bytes), so
    fid_jackknife and fd_inf_jackknife of one row share the n x d x d product Q (low-rank route only)."""
    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (X, mu_ref, sigma_ref)]
    if arrays[0].ndim != 2 or arrays[0].shape[0] >= arrays[0].shape[1]:  # moment route: nothing worth keeping
        return _SubsetFID(*arrays)
    h = hashlib.blake2b(digest_size=20)
    for a in arrays:
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    key = h.digest()
    if key not in _SUBSET_FID_CACHE:
        if len(_SUBSET_FID_CACHE) >= 2:
            _SUBSET_FID_CACHE.pop(next(iter(_SUBSET_FID_CACHE)))
        _SUBSET_FID_CACHE[key] = _SubsetFID(*arrays)
    return _SUBSET_FID_CACHE[key]


def fid_jackknife(X, mu_ref, sigma_ref, k: int = JACKKNIFE_BLOCKS) -> tuple[float, np.ndarray]:
    """(FID of all n samples, the k leave-one-block-out FIDs) of features X [n, d] (seed order) against reference
    statistics; agrees with iia_cli.metrics.fid.stats.frechet_distance of FeatureStats' mean and unbiased covariance."""
    f = _subset_fid(X, mu_ref, sigma_ref)
    parts = blocks(f.n, k)
    if f.low_rank:
        everything = np.arange(f.n)
        return f.fid(everything), np.array([f.fid(np.setdiff1d(everything, b)) for b in parts])
    sums = [f.X[b].sum(axis=0) for b in parts]
    outers = [f.X[b].T @ f.X[b] for b in parts]
    total, outer = np.sum(sums, axis=0), np.sum(outers, axis=0)
    value = f._fid_moments(total, outer, f.n)
    loo = [f._fid_moments(total - sums[j], outer - outers[j], f.n - len(b)) for j, b in enumerate(parts)]
    return value, np.array(loo)


# ---------------------------------------------------------------------------------------------------------------
# KID


_KID_REF_CACHE: dict[bytes, float] = {}


def _poly_kernel(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return (A @ B.T / A.shape[1] + 1.0) ** 3


def _ref_term(Y: np.ndarray) -> float:
    """sum_{i != j} k(y_i, y_j) / (m (m-1)), cached by the bytes of Y (the reference is the same for every row)."""
    key = hashlib.blake2b(np.ascontiguousarray(Y).tobytes(), digest_size=20).digest() + repr(Y.shape).encode()
    if key not in _KID_REF_CACHE:
        m = Y.shape[0]
        K = _poly_kernel(Y, Y)
        if len(_KID_REF_CACHE) >= 4:
            _KID_REF_CACHE.pop(next(iter(_KID_REF_CACHE)))
        _KID_REF_CACHE[key] = (float(K.sum()) - float(np.trace(K))) / (m * (m - 1))
    return _KID_REF_CACHE[key]


def kid_jackknife(X, Y_ref, k: int = JACKKNIFE_BLOCKS) -> tuple[float, np.ndarray]:
    """(KID of all n samples, the k leave-one-block-out KIDs) of features X [n, d] against reference features
    Y_ref [m, d].

    Same kernel and estimator as torch-fidelity's KID (polynomial kernel (x.y/d + 1)^3, unbiased MMD^2:
    sum_{i!=j} k(x_i,x_j)/(n(n-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum k(x_i,y_j)/(nm)), but on all
    samples at once instead of the mean over random subsets of a fixed size; with n = m it equals
    torch-fidelity's kid_features_to_metric(..., kid_subsets=1, kid_subset_size=n). Leave-one-block-out values
    come from block sums of the kernel matrices; the reference term is computed once per reference.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y_ref, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(f"features {list(X.shape)} and reference features {list(Y.shape)} do not match")
    n, m = X.shape[0], Y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    yy = _ref_term(Y)
    Kxx = _poly_kernel(X, X)
    np.fill_diagonal(Kxx, 0.0)
    xy_rows = _poly_kernel(X, Y).sum(axis=1)  # [n]
    parts = blocks(n, k)
    # block-by-block sums of the off-diagonal Kxx
    B = np.array([[Kxx[np.ix_(bi, bj)].sum() for bj in parts] for bi in parts])
    xx_total, xy_total = float(B.sum()), float(xy_rows.sum())
    value = xx_total / (n * (n - 1)) + yy - 2 * xy_total / (n * m)
    loo = []
    for j, b in enumerate(parts):
        r = n - b.size
        if r < 2:
            loo.append(math.nan)
            continue
        xx = xx_total - 2 * float(B[j].sum()) + float(B[j, j])
        xy = xy_total - float(xy_rows[b].sum())
        loo.append(xx / (r * (r - 1)) + yy - 2 * xy / (r * m))
    return value, np.array(loo)


# ---------------------------------------------------------------------------------------------------------------
# FD-infinity


def fd_inf_sizes(n: int, count: int = FD_INF_SIZES) -> np.ndarray:
    """Subset sizes for the FD-infinity fit: ``count`` sizes spaced evenly in 1/s from s = max(2, n // 5)
    (a 5x range, like Chong & Forsyth's 5k..50k) to n, rounded and deduplicated."""
    if n < 4:
        raise ValueError(f"FD-infinity needs at least 4 samples, got {n}")
    s_min = max(2, n // 5)
    inv = np.linspace(1.0 / s_min, 1.0 / n, count)
    return np.unique(np.clip(np.rint(1.0 / inv).astype(int), s_min, n))


def _fd_inf_of(f: _SubsetFID, rows: np.ndarray) -> float:
    """FD-infinity of the samples ``rows``: FID of nested subsets (prefixes of one fixed-seed permutation of
    ``rows``) at the sizes of :func:`fd_inf_sizes`, least-squares fit FID = a + b / s, returns a."""
    order = np.random.default_rng(FD_INF_SEED).permutation(rows)
    sizes = fd_inf_sizes(rows.size)
    if f.low_rank:
        fids = [f.fid(order[:s]) for s in sizes]
    else:  # moment sums accumulated along the permutation, one pass over the data
        fids, total, outer, done = [], np.zeros(f.d), np.zeros((f.d, f.d)), 0
        for s in sizes:
            chunk = f.X[order[done:s]]
            total, outer, done = total + chunk.sum(axis=0), outer + chunk.T @ chunk, s
            fids.append(f._fid_moments(total, outer, s))
    design = np.stack([np.ones(sizes.size), 1.0 / sizes], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.array(fids), rcond=None)
    return float(coef[0])


def fd_inf_jackknife(X, mu_ref, sigma_ref, k: int = JACKKNIFE_BLOCKS) -> tuple[float, np.ndarray]:
    """(FD-infinity of all n samples, the k leave-one-block-out values) after Chong & Forsyth (CVPR 2020):
    FID is close to linear in 1/N, so FID of subsets of FD_INF_SIZES sizes (evenly spaced in 1/s from n // 5
    to n, one nested subset per size from a fixed-seed permutation) is fitted with FID = a + b / s and a is
    reported. Each leave-one-block-out value repeats the procedure on the remaining samples. Needs n >= 4
    (blocks leaving fewer than 4 samples give NaN)."""
    f = _subset_fid(X, mu_ref, sigma_ref)
    everything = np.arange(f.n)
    value = _fd_inf_of(f, everything)
    loo = []
    for b in blocks(f.n, k):
        rest = np.setdiff1d(everything, b)
        loo.append(_fd_inf_of(f, rest) if rest.size >= 4 else math.nan)
    return value, np.array(loo)
