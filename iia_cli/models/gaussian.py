"""An isotropic Gaussian data distribution: a denoiser and a probability-flow ODE known in closed form.

Data ``x0 ~ N(mu, s^2 I)``; EDM's forward process ``x = x0 + sigma * n`` gives ``x ~ N(mu, (s^2 + sigma^2) I)``.

* Denoiser (posterior mean, Tweedie):   ``D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)``.
* Probability-flow ODE (Karras et al. 2022, eq. 1 with sigma(t) = t): ``dx/dsigma = (x - D(x, sigma)) / sigma
  = sigma / (s^2 + sigma^2) (x - mu)``, whose solution is
  ``x(sigma1) = mu + sqrt(s^2 + sigma1^2) / sqrt(s^2 + sigma0^2) (x(sigma0) - mu)``.

Used as a test model: a solver's global error against :meth:`GaussianModel.exact_solution` shows its order.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import torch
from pydantic import Field

from iia_cli.runtime.errors import ConfigError
from iia_cli.runtime.schema import Float, IntList, ModelParams


def make_default_mean(shape: tuple[int, int, int]) -> torch.Tensor:
    """A smooth, non-constant pattern in [-0.5, 0.5]: ``0.5 cos(pi (i/(H-1) + j/(W-1)) / 2 + 2 pi c/C)`` at [c, i, j].

    For one channel, a diagonal cosine ramp from +0.5 (top-left) to -0.5 (bottom-right).
    """
    c_dim, h_dim, w_dim = shape
    i = torch.arange(h_dim, dtype=torch.float64) / max(h_dim - 1, 1)
    j = torch.arange(w_dim, dtype=torch.float64) / max(w_dim - 1, 1)
    c = torch.arange(c_dim, dtype=torch.float64) / c_dim
    phase = math.pi * (i[None, :, None] + j[None, None, :]) / 2 + 2 * math.pi * c[:, None, None]  # [C, H, W]
    return 0.5 * torch.cos(phase)


class GaussianModel:
    """Closed-form denoiser of ``N(mu, s^2 I)`` data, with the exact probability-flow ODE solution.

    ``mean`` is a float (constant image), a tensor or nested list of ``shape``, or None for
    :func:`make_default_mean`.
    Computes in float64 and returns tensors in the dtype of ``x``.
    """

    label_dim: int = 0
    dtype: torch.dtype = torch.float64

    def __init__(
        self,
        shape: tuple[int, int, int] = (1, 8, 8),
        mean: float | torch.Tensor | list[Any] | None = None,
        std: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        if len(shape) != 3 or any(int(n) < 1 for n in shape):
            raise ConfigError(f"Gaussian model shape must be three positive sizes (C, H, W), got {tuple(shape)}")
        if not std > 0:
            raise ConfigError(f"Gaussian model std must be > 0, got {std}")
        self.shape: tuple[int, int, int] = (int(shape[0]), int(shape[1]), int(shape[2]))
        if mean is None:
            mu = make_default_mean(self.shape)
        else:
            try:
                given = torch.as_tensor(mean, dtype=torch.float64).detach().clone()  # a float, tensor or nested list
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise ConfigError(f"Gaussian model mean={mean!r:.60} must be a number or a nested list of numbers") from None
            if not bool(torch.isfinite(given).all()):
                raise ConfigError("Gaussian model mean must be finite")
            if given.ndim == 0:
                mu = given.expand(self.shape).clone()
            elif tuple(given.shape) == self.shape:
                mu = given
            else:
                raise ConfigError(
                    f"Gaussian model mean has shape {tuple(given.shape)}, expected a number or {self.shape}"
                )
        self.mean: torch.Tensor = mu  # [C, H, W]
        self.std = float(std)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def to(self, device: torch.device | str) -> GaussianModel:
        """Move the mean to ``device`` (in place); returns self."""
        self.mean = self.mean.to(device)
        return self

    def _sigma(self, sigma: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        """``sigma`` as float64 [B, 1, 1, 1] (a scalar or one-element tensor is broadcast over the batch)."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(batch)
        return s.reshape(-1, 1, 1, 1)

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)``; x [B, C, H, W], sigma [B]."""
        x64 = x.to(torch.float64)
        sigma4 = self._sigma(sigma, x.shape[0], x.device)  # [B, 1, 1, 1]
        mu = self.mean.to(x.device)
        s2 = self.std**2
        return (mu + s2 / (s2 + sigma4**2) * (x64 - mu)).to(x.dtype)

    def exact_solution(
        self, x0: torch.Tensor, sigma0: torch.Tensor | float, sigma1: torch.Tensor | float
    ) -> torch.Tensor:
        """Probability-flow ODE from ``sigma0`` to ``sigma1`` (may be 0):
        ``mu + sqrt(s^2 + sigma1^2) / sqrt(s^2 + sigma0^2) (x0 - mu)``."""
        x64 = x0.to(torch.float64)
        s0 = self._sigma(sigma0, x0.shape[0], x0.device)
        s1 = self._sigma(sigma1, x0.shape[0], x0.device)
        mu = self.mean.to(x0.device)
        s2 = self.std**2
        return (mu + torch.sqrt((s2 + s1**2) / (s2 + s0**2)) * (x64 - mu)).to(x0.dtype)

    def fingerprint(self) -> str:
        """sha256 hex of the model's parameters: mean bytes (float64), std, shape."""
        h = hashlib.sha256(b"iia_cli.GaussianModel.v1")
        h.update(self.mean.detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
        h.update(repr((self.std, self.shape)).encode())
        return h.hexdigest()


class GaussianParams(ModelParams):
    """``model.kind: gaussian``: the closed-form test model (exact denoiser and probability-flow solution)."""

    kind: Literal["gaussian"] = "gaussian"
    shape: IntList = Field([1, 8, 8], description="data shape (C, H, W)")
    mean: Any = Field(None, description="data mean mu: a number or a nested list of the data shape "
                                        "(default: a fixed smooth pattern)")
    std: Float = Field(0.5, description="data standard deviation s")
    sigma_min: Float = Field(0.002, description="smallest noise level the model reports")
    sigma_max: Float = Field(80.0, description="largest noise level the model reports")


def build(p: GaussianParams, device: torch.device) -> GaussianModel:
    return GaussianModel(shape=tuple(p.shape), mean=p.mean, std=float(p.std), sigma_min=float(p.sigma_min),
                         sigma_max=float(p.sigma_max)).to(device)
