"""The denoiser protocol every solver sees, and the small helpers around it.

A denoiser is EDM's ``D(x, sigma, class_labels=None) -> x0``: ``x`` is [B, C, H, W] in EDM's
parameterisation (data in [-1, 1], ``x = data + sigma * noise``), ``sigma`` is a tensor of shape [B].
Solvers never see eps / v parameterisations, betas or checkpoint formats: adapters live in ``models/``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, class_labels=None) -> x0`` plus the attributes solvers and grids need.

    Required attributes: ``shape`` (C, H, W), ``sigma_min``, ``sigma_max``.
    Optional: ``label_dim`` (0 = unconditional), ``round_sigma(sigma) -> sigma``,
    ``dtype`` (the network's dtype), ``fingerprint() -> str`` (sha256 of checkpoint bytes and adapter
    settings), ``discrete_sigmas`` (float64 [T] ascending training sigmas of a discrete-time model).
    """

    shape: tuple[int, int, int]
    sigma_min: float
    sigma_max: float

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor: ...


def label_dim(model: Any) -> int:
    return int(getattr(model, "label_dim", 0) or 0)


def model_dtype(model: Any) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
