"""A mixture of probabilistic-PCA Gaussians fitted to MNIST, with its exact posterior-mean denoiser.

Component k has mean ``mu_k``, weight ``pi_k`` and covariance (Tipping & Bishop 1999, PPCA)

    C_k = U_k diag(L_k) U_k^T + tau2_k I,        U_k: d x q orthonormal, L_k >= 0 [q], tau2_k > 0.

Under EDM's forward process ``x = x0 + sigma n`` the noisy marginal is ``sum_k pi_k N(mu_k, C_k + sigma^2 I)``
and the denoiser (the posterior mean ``E[x0 | x]``, Tweedie's formula) is exact:

    D(x, sigma) = sum_k w_k(x, sigma) [x - sigma^2 (C_k + sigma^2 I)^{-1} (x - mu_k)],
    w_k(x, sigma) = softmax_k( log pi_k + log N(x; mu_k, C_k + sigma^2 I) ).

With ``a_k = tau2_k + sigma^2`` the Woodbury identity gives, at O(d q) per component and sample,

    (a I + U diag(L) U^T)^{-1} = (1/a) (I - U diag(L / (L + a)) U^T),
    log det(C_k + sigma^2 I) = (d - q) log a + sum_j log(L_j + a),

and the component posterior mean is written as ``mu + (tau2/a) r + (sigma^2/a) U diag(L/(L+a)) U^T r``
(``r = x - mu``), which equals ``x - sigma^2 (C + sigma^2 I)^{-1} r`` without its cancellation at large sigma.

Fitting (:func:`fit_ppca_mixture`): pixels scaled to [-1, 1] (``u8 / 127.5 - 1``); one component per digit class
when ``components == 10`` (``pi_k`` = class frequency), otherwise the components are the clusters of a
deterministic k-means (k-means++ seeding from a fixed seed, then Lloyd iterations). Per component, ``U_k`` holds
the top-q eigenvectors of the (maximum-likelihood) covariance and ``L_k = max(eig_k - tau2_k, 0)``: the PPCA
maximum-likelihood loading for a given noise variance (Tipping & Bishop 1999, eq. 7, ``W = U (Lambda - tau2 I)^{1/2}``).

The noise variance ``tau2_k`` is, by default, the fixed value ``tau2`` (default 1e-3, i.e. a pixel std of 0.03):
samples are then clean rank-q digits, at the price of leaving out the variance of the discarded directions
(about 27% of it at q = 16). With ``mle_noise=True`` it is ``max(tau2, PPCA MLE noise)``, the MLE noise being the
mean of the d - q discarded eigenvalues (eq. 8), so that ``tr C_k`` matches the data; on MNIST that noise is
0.02-0.09 (a pixel std of 0.15-0.3) and samples look grainy. q = 16 with the fixed tau2 = 1e-3 gave the most
recognisable digits of q in {16, 32, 64} and tau2 in {1e-3, 1e-2, MLE}. Fits are cached on disk.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from iia_cli.io.atomic import savez_atomic
from iia_cli.io.hashing import sha256_of_file
from iia_cli.io.layout import model_cache_dir
from iia_cli.runtime.errors import ConfigError, IIARuntimeError
from iia_cli.runtime.schema import Bool, Int, ModelParams, OptFloat, OptInt

from .data import load_mnist_5k, mnist_5k_path

CACHE_FORMAT_VERSION = 2
DEFAULT_COMPONENTS = 10
DEFAULT_RANK = 16
DEFAULT_TAU2 = 1e-3
KMEANS_SEED = 0
KMEANS_ITERS = 25
MNIST_SHAPE: tuple[int, int, int] = (1, 28, 28)
_PARAM_NAMES = ("means", "U", "L", "tau2", "weights")


# ---------------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------------


def fit_ppca_component(
    x: torch.Tensor, rank: int, tau2: float, mle_noise: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPCA maximum-likelihood fit of one component (Tipping & Bishop 1999, eqs. 7-8).

    x: float64 [N, d]. Returns ``mu [d], U [d, q], L [q], tau2 []`` with ``L = max(top-q eigenvalues - tau2, 0)``
    and ``tau2`` the given value or, with ``mle_noise``, ``max(tau2, mean of the d - q smallest eigenvalues)``.
    """
    n, d = x.shape
    if n == 0:
        raise IIARuntimeError("a GMM component has no data points; use fewer components")
    mu = x.mean(0)  # [d]
    # Eigen-decomposition of the ML covariance (x - mu)^T (x - mu) / n through the SVD of the centred data:
    # eigenvalues S^2 / n, eigenvectors the rows of Vh. (LAPACK's SVD of [n, d] is as exact as eigh of [d, d]
    # and does not slow down 20x under CPU contention as the threaded eigh does.)
    _, s, vh = torch.linalg.svd(x - mu, full_matrices=n < rank)
    eig = torch.zeros(d, dtype=torch.float64)
    eig[: s.numel()] = s**2 / n  # descending
    vec = vh.T  # [d, min(n, d) or d]
    discarded = eig[rank:]
    noise = max(tau2, float(discarded.mean())) if mle_noise else tau2
    tau2_k = torch.tensor(noise, dtype=torch.float64)
    return mu, vec[:, :rank].contiguous(), (eig[:rank] - tau2_k).clamp_min(0.0), tau2_k


def kmeans(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS, seed: int = KMEANS_SEED) -> torch.Tensor:
    """Deterministic k-means: k-means++ seeding from ``torch.Generator().manual_seed(seed)``, then Lloyd.

    x: float64 [N, d]. Returns int64 assignments [N]. An empty cluster keeps its previous centre.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=gen))]]
    dist2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        idx = int(torch.multinomial(dist2 / dist2.sum(), 1, generator=gen)) if dist2.sum() > 0 else 0
        centres.append(x[idx])
        dist2 = torch.minimum(dist2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centres)  # [K, d]
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)  # [K]
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # [K, d]
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        new_assign = torch.cdist(x, c).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def fit_ppca_mixture(
    x: torch.Tensor, labels: torch.Tensor, components: int, rank: int, tau2: float, mle_noise: bool = False
) -> dict[str, torch.Tensor]:
    """Fit ``components`` PPCA Gaussians to float64 data x [N, d] (see the module docstring).

    ``components == number of classes``: one component per class; otherwise deterministic k-means clusters.
    Returns float64 tensors ``means [K, d], U [K, d, q], L [K, q], tau2 [K], weights [K]``.
    """
    n_classes = int(labels.max()) + 1
    assign = labels if components == n_classes else kmeans(x, components)
    parts = [fit_ppca_component(x[assign == k], rank, tau2, mle_noise) for k in range(components)]
    counts = torch.bincount(assign, minlength=components).to(torch.float64)
    return {
        "means": torch.stack([p[0] for p in parts]),
        "U": torch.stack([p[1] for p in parts]),
        "L": torch.stack([p[2] for p in parts]),
        "tau2": torch.stack([p[3] for p in parts]),
        "weights": counts / counts.sum(),
    }


# ---------------------------------------------------------------------------------------------------------------
# On-disk cache
# ---------------------------------------------------------------------------------------------------------------


def gmm_cache_path(
    cache_dir: Path, components: int, rank: int, tau2: float, mle_noise: bool, data_sha256: str
) -> Path:
    """Cache file for one fit, named by a hash of (K, q, tau2, noise model, data sha256, k-means settings, format)."""
    settings = (components, rank, float(tau2), bool(mle_noise), data_sha256, KMEANS_SEED, KMEANS_ITERS)
    key = repr((CACHE_FORMAT_VERSION, *settings))
    return cache_dir / f"gmm-mnist-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def _save_params(path: Path, params: dict[str, torch.Tensor]) -> None:
    """Write ``params`` as .npz atomically."""
    savez_atomic(path, **{name: params[name].cpu().numpy() for name in _PARAM_NAMES})


def _load_params(path: Path) -> dict[str, torch.Tensor] | None:
    """Read a cached fit; None when the file is missing or unreadable (it is then refitted and rewritten)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: torch.from_numpy(z[name].astype(np.float64)) for name in _PARAM_NAMES}
    except (OSError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# The denoiser
# ---------------------------------------------------------------------------------------------------------------


class GMMDenoiser:
    """Exact posterior-mean denoiser of a PPCA Gaussian mixture (formulas in the module docstring).

    Parameters (float64): ``means [K, d]``, ``U [K, d, q]`` (orthonormal columns), ``L [K, q] >= 0``,
    ``tau2 [K] > 0``, ``weights [K]`` (normalised here). ``shape`` is (C, H, W) with C H W = d.

    ``conditional=True`` sets ``label_dim = K``: ``class_labels`` [B, K] (one-hot, EDM's convention) replace the
    prior weights, so a one-hot label gives exactly that component's posterior mean (a soft label gives the
    posterior mean of the mixture with those prior weights). Without labels the mixture prior ``pi`` is used.
    Computes in float64 and returns the dtype of ``x``.
    """

    dtype: torch.dtype = torch.float64

    def __init__(
        self,
        means: torch.Tensor,
        U: torch.Tensor,
        L: torch.Tensor,
        tau2: torch.Tensor | float,
        weights: torch.Tensor,
        shape: tuple[int, int, int],
        conditional: bool = False,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        f64 = torch.float64
        self.means = means.detach().to(f64)
        self.U = U.detach().to(f64)
        self.L = L.detach().to(f64)
        k, d = self.means.shape
        self.tau2 = torch.as_tensor(tau2, dtype=f64, device=self.means.device).expand(k).clone()
        w = weights.detach().to(f64)
        self.weights = w / w.sum()
        self.shape: tuple[int, int, int] = (int(shape[0]), int(shape[1]), int(shape[2]))
        q = self.U.shape[-1]
        if math.prod(self.shape) != d or self.U.shape != (k, d, q) or self.L.shape != (k, q):
            raise ConfigError(
                f"GMM parameter shapes disagree: means {tuple(self.means.shape)}, U {tuple(self.U.shape)}, "
                f"L {tuple(self.L.shape)}, image shape {self.shape}; "
                "expected means [K, d], U [K, d, q], L [K, q] with d = C*H*W"
            )
        if self.weights.shape != (k,) or bool((self.tau2 <= 0).any()) or bool((self.L < 0).any()):
            raise ConfigError("GMM parameters need weights [K], tau2 > 0 and L >= 0")
        self.conditional = bool(conditional)
        self.label_dim = k if self.conditional else 0
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @classmethod
    def from_mnist(
        cls,
        components: int = DEFAULT_COMPONENTS,
        rank: int = DEFAULT_RANK,
        tau2: float = DEFAULT_TAU2,
        mle_noise: bool = False,
        conditional: bool = False,
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> GMMDenoiser:
        """Fit (or load from the on-disk cache) K PPCA components of rank q to the 5,000 MNIST digits.

        ``tau2`` is each component's isotropic variance (pixels in [-1, 1]); with ``mle_noise`` it is the floor
        under the PPCA MLE noise (the mean discarded eigenvalue).
        """
        if components < 1 or not 1 <= rank < math.prod(MNIST_SHAPE):
            raise ConfigError(
                f"GMM needs components >= 1 and 1 <= rank < 784, got components={components}, rank={rank}"
            )
        if not tau2 > 0:
            raise ConfigError(f"GMM tau2 (isotropic variance) must be > 0, got {tau2}")
        path = gmm_cache_path(
            Path(cache_dir) if cache_dir is not None else model_cache_dir(),
            components, rank, tau2, mle_noise, sha256_of_file(mnist_5k_path()),
        )  # fmt: skip
        params = _load_params(path) if path.is_file() else None
        if params is None:
            images, labels = load_mnist_5k()
            x = torch.from_numpy(images.reshape(len(images), -1)).to(torch.float64) / 127.5 - 1  # [N, 784]
            params = fit_ppca_mixture(x, torch.from_numpy(labels), components, rank, tau2, mle_noise)
            try:
                _save_params(path, params)
            except OSError as exc:
                raise IIARuntimeError(f"cannot write the GMM cache file {path}: {exc}") from exc
        return cls(**params, shape=MNIST_SHAPE, conditional=conditional).to(device)

    @property
    def components(self) -> int:
        return int(self.means.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[-1])

    def to(self, device: str | torch.device) -> GMMDenoiser:
        """Move every parameter to ``device`` (in place); returns self."""
        for name in _PARAM_NAMES:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sample_exact(self, n: int, seed: int = 0) -> torch.Tensor:
        """n exact samples of the mixture (ancestral sampling), float64 [n, C, H, W] in pixel space [-1, 1].

        ``k ~ Categorical(pi)``, ``x = mu_k + U_k diag(sqrt(L_k)) z + sqrt(tau2_k) e`` with ``z ~ N(0, I_q)``,
        ``e ~ N(0, I_d)``: exactly ``N(mu_k, C_k)`` (module docstring). Draws come from one CPU generator
        seeded with ``seed``, so the samples depend only on (the fit, n, seed).
        """
        gen = torch.Generator().manual_seed(seed)
        means, U, L, tau2, w = (t.cpu() for t in (self.means, self.U, self.L, self.tau2, self.weights))
        k = torch.multinomial(w, n, replacement=True, generator=gen)  # [n]
        z = torch.randn(n, U.shape[-1], generator=gen, dtype=torch.float64)  # [n, q]
        e = torch.randn(n, means.shape[1], generator=gen, dtype=torch.float64)  # [n, d]
        x = means[k] + tau2[k].sqrt()[:, None] * e  # [n, d]
        for c in range(len(w)):  # the low-rank part, one component at a time ([n_c, q] @ [q, d])
            rows = (k == c).nonzero().squeeze(1)
            x[rows] += (L[c].sqrt() * z[rows]) @ U[c].T
        return x.reshape(n, *self.shape)

    def mixture_mean(self) -> torch.Tensor:
        """``sum_k pi_k mu_k`` as float64 [C, H, W]: the limit of D(x, sigma) as sigma -> infinity."""
        return (self.weights @ self.means).reshape(self.shape)

    def _prior_log_weights(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """log prior weights [B, K]: ``log pi`` or, for a conditional model given labels, ``log class_labels``."""
        if not self.conditional or class_labels is None:
            return self.weights.log().expand(batch, -1)
        labels = class_labels.to(device=self.means.device)
        if labels.ndim == 1 and not labels.is_floating_point():
            labels = torch.nn.functional.one_hot(labels, self.components)
        if labels.shape != (batch, self.components):
            raise ConfigError(f"class_labels must be one-hot [B, {self.components}], got {tuple(class_labels.shape)}")
        return labels.to(torch.float64).log()

    def _components(
        self, x: torch.Tensor, sigma: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component pieces: r [K, B, d], coef*U^T r [K, B, q], log N(x; mu_k, C_k + sigma^2 I) [B, K],
        tau2/a [K, B] and sigma^2/a [K, B]."""
        b, d = x.shape[0], self.means.shape[1]
        x64 = x.to(device=self.means.device, dtype=torch.float64).reshape(b, d)  # [B, d]
        s = torch.as_tensor(sigma, dtype=torch.float64, device=self.means.device).reshape(-1)
        s2 = (s.expand(b) if s.numel() == 1 else s) ** 2  # [B]
        a = self.tau2[:, None] + s2[None, :]  # [K, B]
        r = x64[None] - self.means[:, None]  # [K, B, d]
        proj = torch.bmm(r, self.U)  # [K, B, q]  U^T r
        l_plus_a = self.L[:, None, :] + a[..., None]  # [K, B, q]
        # Mahalanobis distance r^T (C + sigma^2 I)^{-1} r = |r_perp|^2 / a + sum_j proj_j^2 / (L_j + a).
        r2_perp = ((r * r).sum(-1) - (proj * proj).sum(-1)).clamp_min(0.0)  # [K, B]
        maha = r2_perp / a + (proj * proj / l_plus_a).sum(-1)
        q = self.U.shape[-1]
        logdet = (d - q) * a.log() + l_plus_a.log().sum(-1)  # [K, B]
        log_n = -0.5 * (maha + logdet + d * math.log(2 * math.pi))  # [K, B]
        coef_proj = self.L[:, None, :] / l_plus_a * proj  # [K, B, q]  diag(L / (L + a)) U^T r
        return r, coef_proj, log_n.T, self.tau2[:, None] / a, s2[None, :] / a

    def posterior_weights(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``w_k(x, sigma)`` as float64 [B, K] (rows sum to 1)."""
        _, _, log_n, _, _ = self._components(x, sigma)
        return torch.softmax(self._prior_log_weights(class_labels, x.shape[0]) + log_n, dim=-1)

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``D(x, sigma) = sum_k w_k [mu_k + (tau2_k/a_k) r_k + (sigma^2/a_k) U_k diag(L_k/(L_k+a_k)) U_k^T r_k]``.

        x [B, C, H, W], sigma [B] (or a scalar). Cost O(B K d q).
        """
        r, coef_proj, log_n, tau_frac, s_frac = self._components(x, sigma)
        w = torch.softmax(self._prior_log_weights(class_labels, x.shape[0]) + log_n, dim=-1).T  # [K, B]
        lowrank = torch.bmm(coef_proj * (w * s_frac)[..., None], self.U.transpose(1, 2)).sum(0)  # [B, d]
        # sum_k w_k (mu_k + (tau2_k/a_k) r_k): r_k = x - mu_k is already materialised.
        iso = (w[..., None] * (self.means[:, None] + tau_frac[..., None] * r)).sum(0)  # [B, d]
        return (iso + lowrank).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def fingerprint(self) -> str:
        """sha256 hex of the fitted parameter bytes (float64) and the adapter settings."""
        h = hashlib.sha256(f"iia_cli.GMMDenoiser.v{CACHE_FORMAT_VERSION}".encode())
        for name in _PARAM_NAMES:
            h.update(getattr(self, name).detach().cpu().contiguous().numpy().tobytes())
        h.update(repr((self.shape, self.conditional, self.sigma_min, self.sigma_max)).encode())
        return h.hexdigest()


class GMMParams(ModelParams):
    """``model.kind: gmm-mnist``: a PPCA mixture fitted to MNIST with its exact posterior-mean denoiser."""

    kind: Literal["gmm-mnist"] = "gmm-mnist"
    components: Int = Field(10, description="mixture components K")
    rank: OptInt = Field(None, description=f"PPCA rank q of each component (default {DEFAULT_RANK})")
    tau2: OptFloat = Field(None, description="isotropic variance of each component, pixels in [-1, 1] "
                                             f"(default {DEFAULT_TAU2}; with mle_noise the floor of the MLE noise)")
    mle_noise: Bool = Field(False, description="PPCA maximum-likelihood noise (mean discarded eigenvalue)")
    conditional: Bool = Field(False, description="one component per digit class, class-conditional sampling")


def build(p: GMMParams, device: torch.device) -> GMMDenoiser:
    kw = {k: getattr(p, k) for k in ("rank", "tau2") if getattr(p, k) is not None}
    return GMMDenoiser.from_mnist(components=int(p.components), conditional=bool(p.conditional),
                                  mle_noise=bool(p.mle_noise), **kw).to(device)
