"""Sigma grids: descending float64 tensors, ending in 0 when the last step denoises.

Every grid is a pure function of its parameters and the number of sigma points; solvers receive the
grid as data and never rebuild it. ``sigma`` is always the EDM noise level, ``t`` a model's time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from iia_cli.models.base import Denoiser, capabilities, round_sigmas
from iia_cli.runtime.errors import ConfigError

GRID_KINDS = ("karras", "logsnr", "time-uniform", "discrete", "list", "file")
DISCRETE_SPACINGS = ("uniform", "quad")

# Continuous linear-VP schedule (Song et al. 2021): beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1].
VP_BETA_MIN = 0.1
VP_BETA_MAX = 20.0


@dataclass(frozen=True)
class GridPlan:
    """How many sigma points a solver needs for an NFE, and whether a final 0 is appended."""

    n_points: int  # points from sigma_max down to sigma_min (inclusive)
    append_zero: bool


def make_karras_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. (5): ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, i = 0..n-1."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def make_logsnr_grid(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in lambda = -log(sigma)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def vp_sigma(t: torch.Tensor) -> torch.Tensor:
    """sigma(t) of the continuous linear VP schedule: sqrt(exp(beta_min t + (beta_max - beta_min) t^2 / 2) - 1)."""
    return torch.sqrt(torch.expm1(VP_BETA_MIN * t + 0.5 * (VP_BETA_MAX - VP_BETA_MIN) * t**2))


def vp_time(sigma: float) -> float:
    """Inverse of :func:`vp_sigma`: the positive root of (d/2) t^2 + beta_min t - log(1 + sigma^2) = 0."""
    d = VP_BETA_MAX - VP_BETA_MIN
    c = math.log1p(sigma**2)
    return (-VP_BETA_MIN + math.sqrt(VP_BETA_MIN**2 + 2 * d * c)) / d


def make_time_uniform_grid(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in the time t of the continuous linear-VP schedule, mapped to sigma."""
    t = torch.linspace(vp_time(sigma_max), vp_time(sigma_min), n, dtype=torch.float64)
    return vp_sigma(t)


def discrete_timesteps(T: int, steps: int, spacing: str = "uniform") -> list[int]:
    """A discrete model's timesteps, descending. ``uniform``: DDIM's ``range(0, T, T // S)``;
    ``quad``: DDIM's quadratic skip ``(linspace(0, sqrt(0.8 T), S))^2``."""
    if spacing == "uniform":
        ts = list(range(0, T, max(T // steps, 1)))[:steps]
    elif spacing == "quad":
        ts = sorted({int(v) for v in torch.linspace(0, math.sqrt(T * 0.8), steps, dtype=torch.float64) ** 2})
    else:
        raise ConfigError(f"grid.spacing={spacing!r} is not valid; choose one of {', '.join(DISCRETE_SPACINGS)}")
    if len(ts) != steps:
        raise ConfigError(f"grid.spacing={spacing} gives {len(ts)} distinct timesteps for {steps} steps; use fewer steps")
    return ts[::-1]


def make_grid(grid_cfg: Any, plan: GridPlan, model: Denoiser) -> torch.Tensor:
    """Build the sigma grid for ``plan`` from the config section ``grid`` and the model's range.

    Returns a descending float64 tensor of ``plan.n_points`` sigmas (plus a trailing 0 if
    ``plan.append_zero``). Continuous grids are clipped to the model's [sigma_min, sigma_max] and passed
    through the model's ``round_sigma`` where it has one.
    """
    kind = grid_cfg.kind
    n = plan.n_points
    if kind == "list":
        raise ConfigError("grid.kind=list takes its sigmas from grid.sigmas; use list_grid()")
    if kind == "file":
        raise ConfigError("grid.kind=file takes its sigmas from the grid file grid.path; use gridfile.load_grid_file()")
    if kind == "discrete":
        sig_train = capabilities(model).discrete_sigmas
        if sig_train is None:
            raise ConfigError("grid.kind=discrete needs a discrete-time model (kind: diffusers); "
                              "use karras, logsnr or time-uniform for this model")
        sig_train = torch.as_tensor(sig_train, dtype=torch.float64)
        ts = discrete_timesteps(len(sig_train), n, grid_cfg.spacing)
        sigmas = sig_train[ts]
    else:
        s_min = max(float(grid_cfg.sigma_min), float(model.sigma_min))
        s_max = min(float(grid_cfg.sigma_max), float(model.sigma_max))
        if not s_min < s_max:
            raise ConfigError(f"grid sigma range [{s_min}, {s_max}] is empty after clipping to the model's "
                              f"[{model.sigma_min}, {model.sigma_max}]")
        if kind == "karras":
            sigmas = make_karras_grid(n, s_min, s_max, float(grid_cfg.rho))
        elif kind == "logsnr":
            sigmas = make_logsnr_grid(n, s_min, s_max)
        elif kind == "time-uniform":
            sigmas = make_time_uniform_grid(n, s_min, s_max)
        else:
            raise ConfigError(f"grid.kind={kind!r} is not valid; choose one of {', '.join(GRID_KINDS)}")
        sigmas = round_sigmas(model, sigmas)
    if plan.append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def list_grid(values: list[float]) -> torch.Tensor:
    """An explicit grid: strictly descending, positive except an optional final 0."""
    sigmas = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if len(sigmas) < 2 or not bool((sigmas[:-1] > sigmas[1:]).all()) or bool((sigmas[:-1] <= 0).any()):
        raise ConfigError("grid.sigmas must be a strictly descending list of at least 2 positive sigmas "
                          "(optionally ending in 0)")
    return sigmas


def subdivide(s0: float, s1: float, m: int, variable: str, model: Denoiser | None = None) -> torch.Tensor:
    """M sub-steps of [s0, s1] uniform in ``variable``: 'sigma', 'lambda' (= -log sigma) or 't' (the
    model's own time via ``sigma_to_t`` / ``t_to_sigma``; sigma where the model has none).
    Returns m + 1 descending sigmas from s0 to s1."""
    if variable == "lambda" and s1 > 0:
        out = torch.exp(torch.linspace(math.log(s0), math.log(s1), m + 1, dtype=torch.float64))
    elif variable == "t" and (caps := capabilities(model)).sigma_to_t is not None and s1 > 0:
        t0 = float(caps.sigma_to_t(torch.tensor(s0, dtype=torch.float64)))
        t1 = float(caps.sigma_to_t(torch.tensor(s1, dtype=torch.float64)))
        ts = torch.linspace(t0, t1, m + 1, dtype=torch.float64)
        out = torch.as_tensor(caps.t_to_sigma(ts), dtype=torch.float64)  # type: ignore[misc]
    else:
        out = torch.linspace(s0, s1, m + 1, dtype=torch.float64)
    out[0], out[-1] = s0, s1
    return out
