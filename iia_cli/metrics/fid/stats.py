"""FID statistics: float64 feature sums that merge exactly across batches, shards and GPUs; reference ``.npz``
files (``mu`` [2048], ``sigma`` [2048, 2048]) read as data; the Frechet distance."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iia_cli.io.atomic import savez_atomic
from iia_cli.io.hashing import sha256_of_file
from iia_cli.runtime.errors import IIARuntimeError, MissingFileError, one_line

from .weights import FEATURE_DIM


@dataclass
class FeatureStats:
    """Float64 sums of features: ``n``, ``sum`` = sum f [D], ``sum_outer`` = sum f f^T [D, D].

    Sums merge by addition, so statistics of batches, shards or GPUs combine without gathering features.
    """

    n: int
    sum: np.ndarray  # float64 [D]
    sum_outer: np.ndarray  # float64 [D, D]

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM) -> FeatureStats:
        return cls(0, np.zeros(dim, dtype=np.float64), np.zeros((dim, dim), dtype=np.float64))

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add features [N, D] (any float dtype; accumulated in float64). Returns ``self``."""
        f = torch.as_tensor(features).detach().to("cpu", torch.float64).numpy()
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise IIARuntimeError(f"expected features [N, {self.dim}], got {list(f.shape)}")
        self.n += int(f.shape[0])
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats holding the sums of ``self`` and ``other``."""
        if other.dim != self.dim:
            raise IIARuntimeError(f"cannot merge feature statistics of dimensions {self.dim} and {other.dim}")
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer)

    @classmethod
    def merge_all(cls, parts: Iterable[FeatureStats]) -> FeatureStats:
        parts = list(parts)
        if not parts:
            raise IIARuntimeError("no feature statistics to merge")
        total = parts[0].merge(cls.empty(parts[0].dim))
        for part in parts[1:]:
            total = total.merge(part)
        return total

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) with the unbiased covariance (divisor n - 1), as ``numpy.cov``."""
        if self.n < 2:
            raise IIARuntimeError(f"FID needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2

    def save(self, path: str | Path) -> Path:
        """Write the sums as an ``.npz`` (keys ``n``, ``sum``, ``sum_outer``), atomically."""
        return savez_atomic(Path(path), n=np.int64(self.n), sum=self.sum, sum_outer=self.sum_outer)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError("feature statistics", path)
        with _open_npz(path, "feature statistics") as data:
            missing = {"n", "sum", "sum_outer"} - set(data.files)
            if missing:
                raise IIARuntimeError(
                    f"{path} is not a feature-statistics file: keys present {sorted(data.files)}, "
                    "expected n, sum, sum_outer"
                )
            n, total, outer = (_read_float_array(data, k, path, "feature statistics") for k in ("n", "sum", "sum_outer"))
        return cls._checked(n, total, outer, path)

    @classmethod
    def _checked(cls, n: np.ndarray, total: np.ndarray, outer: np.ndarray, path: Path) -> FeatureStats:
        """Sums read from a file: a whole count n >= 0, sum [D], sum_outer [D, D], all finite."""
        if n.shape != () or not 0 <= n < 2**62 or n != np.floor(n):
            raise IIARuntimeError(f"feature statistics {path}: n must be one whole number >= 0, got {n.tolist()!r:.60}")
        if total.ndim != 1 or outer.shape != (total.shape[0],) * 2:
            raise IIARuntimeError(
                f"feature statistics {path}: sum {list(total.shape)} and sum_outer {list(outer.shape)} do not match"
            )
        if not (np.isfinite(total).all() and np.isfinite(outer).all()):
            raise IIARuntimeError(f"feature statistics {path} contain NaN or infinite values")
        return cls(int(n), total, outer)

    def to_reference_npz(self, path: str | Path) -> Path:
        """Write ``mu`` and ``sigma`` (float64) in the standard reference format, atomically."""
        mu, sigma = self.mean_cov()
        return savez_atomic(Path(path), rescue=True, what="reference statistics", mu=mu, sigma=sigma)


def _open_npz(path: Path, what: str) -> np.lib.npyio.NpzFile:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file
        raise IIARuntimeError(f"cannot read {what} {path}: {one_line(exc, 200)}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise IIARuntimeError(f"{what} {path} is not an .npz archive")
    return data


def _read_float_array(data: np.lib.npyio.NpzFile, key: str, path: Path, what: str) -> np.ndarray:
    """``data[key]`` as float64, or a one-line error: object arrays (pickles) are refused, never loaded;
    strings, complex numbers and unreadable members are named."""
    try:
        arr = data[key]
    except Exception as exc:  # noqa: BLE001 -- object arrays (allow_pickle=False), truncated members
        raise IIARuntimeError(f"cannot read '{key}' of {what} {path}: {one_line(exc, 200)}") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise IIARuntimeError(f"'{key}' of {what} {path} holds {arr.dtype} values, expected real numbers")
    return arr.astype(np.float64)


def check_reference_stats(mu: np.ndarray, sigma: np.ndarray, where: str, rtol: float = 1e-6) -> None:
    """Reference statistics must describe a Gaussian: mu [D] and sigma [D, D], finite, sigma symmetric and
    positive semi-definite (both within ``rtol`` of its largest entry). A Cholesky factorisation of
    sigma + rtol * max(diag) I (about 4x cheaper than eigenvalues at D = 2048) fails exactly when sigma has an
    eigenvalue below -rtol * max(diag)."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise IIARuntimeError(f"{where}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not match")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise IIARuntimeError(f"{where} contain NaN or infinite values")
    scale = float(np.abs(sigma).max(initial=0.0))
    if float(np.abs(sigma - sigma.T).max(initial=0.0)) > rtol * scale:
        raise IIARuntimeError(f"{where}: sigma is not symmetric, so it is not a covariance matrix")
    if scale > 0:
        try:
            np.linalg.cholesky((sigma + sigma.T) / 2 + rtol * float(np.diagonal(sigma).max()) * np.eye(len(mu)))
        except np.linalg.LinAlgError:
            raise IIARuntimeError(
                f"{where}: sigma is not positive semi-definite, so it is not a covariance matrix"
            ) from None


def load_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Reference statistics ``(mu, sigma, sha256 of the file)`` from an ``.npz`` with ``mu`` and ``sigma``.

    EDM's, pytorch-fid's and ADM's published files load as they are; a FeatureStats file (n, sum, sum_outer)
    is accepted too.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError("reference statistics", path, "create them with `iia fid-ref --data ... --out ...`")
    with _open_npz(path, "reference statistics") as data:
        keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            mu, sigma = (_read_float_array(data, k, path, "reference statistics") for k in ("mu", "sigma"))
        elif {"n", "sum", "sum_outer"} <= keys:
            n, total, outer = (_read_float_array(data, k, path, "reference statistics") for k in ("n", "sum", "sum_outer"))
            mu, sigma = FeatureStats._checked(n, total, outer, path).mean_cov()
        else:
            raise IIARuntimeError(
                f"reference statistics {path} need keys 'mu' and 'sigma'; "
                f"keys present: {', '.join(sorted(keys)) or 'none'}"
            )
    check_reference_stats(mu, sigma, f"reference statistics {path}")
    return mu, sigma, sha256_of_file(path)


def _psd_eigenvalues_clean(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those below rounding level (D * eps * max) set to 0.

    A singular covariance (fewer images than dimensions) has many zero eigenvalues that rounding turns into
    +-1e-16 * max; their square roots (1e-8 each) would otherwise add up over 2048 dimensions.
    """
    tol = max(float(w.max(initial=0.0)), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_psd_eigenvalues_clean(w))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians: |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    tr (sigma1 sigma2)^(1/2) is evaluated as tr (S sigma2 S)^(1/2) with S = sigma1^(1/2), a symmetric PSD
    matrix: two symmetric eigendecompositions, exact for singular covariances (fewer images than 2048) and about
    5x faster at D = 2048 than pytorch-fid's ``scipy.linalg.sqrtm`` of sigma1 sigma2 (which the tests keep as
    an independent oracle).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise IIARuntimeError(
            f"statistics do not match: mu {list(mu1.shape)} vs {list(mu2.shape)}, "
            f"sigma {list(sigma1.shape)} vs {list(sigma2.shape)}"
        )
    diff = mu1 - mu2
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(_psd_eigenvalues_clean(eigenvalues)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
