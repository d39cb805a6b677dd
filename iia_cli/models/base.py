"""The denoiser protocol every solver sees, and the small helpers around it.

A denoiser is EDM's ``D(x, sigma, class_labels=None) -> x0``: ``x`` is [B, C, H, W] in EDM's
parameterisation (data in [-1, 1], ``x = data + sigma * noise``), ``sigma`` is a tensor of shape [B].
Solvers never see eps / v parameterisations, betas or checkpoint formats: adapters live in ``models/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, class_labels=None) -> x0`` plus the attributes solvers and grids need.

    Required attributes: ``shape`` (C, H, W), ``sigma_min``, ``sigma_max``. The optional hooks, each with the
    default that applies without it, are the fields of :class:`Capabilities`; read them with :func:`capabilities`.
    """

    shape: tuple[int, int, int]
    sigma_min: float
    sigma_max: float

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Capabilities:
    """Every optional hook of a :class:`Denoiser`, with the default that applies when a model lacks it. Adapters
    declare a capability by having the attribute; callers ask :func:`capabilities` instead of probing the model.

    ``label_dim``: class labels (0: unconditional). ``dtype``: the network's dtype. ``round_sigma(sigma)``: the
    sigmas the network accepts (EDM). ``discrete_sigmas``: float64 [T] ascending training sigmas of a discrete-time
    model. ``sigma_to_t`` / ``t_to_sigma``: the model's own time. ``condition(seeds)``: the conditioning tensor of
    each seed (text-to-image). ``decode(x)``: final states -> images (a VAE). ``guided``: the model applies
    classifier-free guidance. ``prompt_of(seed)``: the prompt of a seed (CLIP score). ``exact_solution(x, s0,
    s1)``: the closed-form probability-flow solution. ``fingerprint()``: sha256 of the checkpoint and settings."""

    label_dim: int = 0
    dtype: torch.dtype = torch.float32
    round_sigma: Callable[[torch.Tensor], Any] | None = None
    discrete_sigmas: Any = None
    sigma_to_t: Callable[[torch.Tensor], Any] | None = None
    t_to_sigma: Callable[[torch.Tensor], Any] | None = None
    condition: Callable[[list[int]], torch.Tensor] | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    guided: bool = False
    prompt_of: Callable[[int], str] | None = None
    exact_solution: Callable[..., torch.Tensor] | None = None
    fingerprint: Callable[[], str] | None = None


def _hook(model: Any, name: str) -> Any:
    value = getattr(model, name, None)
    return value if callable(value) else None


def capabilities(model: Any) -> Capabilities:
    """The optional hooks ``model`` has (the one place that probes a model's attributes)."""
    dtype = getattr(model, "dtype", None)
    both_times = _hook(model, "sigma_to_t") is not None and _hook(model, "t_to_sigma") is not None
    return Capabilities(
        label_dim=int(getattr(model, "label_dim", 0) or 0),
        dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
        round_sigma=_hook(model, "round_sigma"),
        discrete_sigmas=getattr(model, "discrete_sigmas", None),
        sigma_to_t=_hook(model, "sigma_to_t") if both_times else None,
        t_to_sigma=_hook(model, "t_to_sigma") if both_times else None,
        condition=_hook(model, "condition"),
        decode=_hook(model, "decode"),
        guided=bool(getattr(model, "guided", False)),
        prompt_of=_hook(model, "prompt_of"),
        exact_solution=_hook(model, "exact_solution"),
        fingerprint=_hook(model, "fingerprint"),
    )


def round_sigmas(model: Any, sigmas: torch.Tensor) -> torch.Tensor:
    """``sigmas`` (float64) as the model accepts them: its ``round_sigma`` where it has one, else unchanged."""
    round_sigma = capabilities(model).round_sigma
    return sigmas if round_sigma is None else torch.as_tensor(round_sigma(sigmas), dtype=torch.float64)


def label_dim(model: Any) -> int:
    return capabilities(model).label_dim


def model_dtype(model: Any) -> torch.dtype:
    return capabilities(model).dtype
