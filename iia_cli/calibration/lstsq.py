"""Per-step least squares of IIA (the paper's eqs. 14 and 19): normal equations accumulated in float64, solved with
a small ridge and a warning when ill-conditioned."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from iia_cli.runtime.errors import IIARuntimeError


class IllConditionedWarning(UserWarning):
    pass


def accumulate_normal_equations(quantities: list[torch.Tensor], target: torch.Tensor,
                                G: torch.Tensor, g: torch.Tensor) -> None:
    """G += Q Q^T, g += Q r for one chunk, in float64. quantities: K tensors [b, ...]; target [b, ...]."""
    Q = torch.stack([q.reshape(-1) for q in quantities]).to(torch.float64)  # [K, b*d]
    G += (Q @ Q.T).cpu()
    g += (Q @ target.reshape(-1).to(torch.float64)).cpu()


def solve_least_squares(G: torch.Tensor, g: torch.Tensor, ridge: float = 1e-8, step: int | None = None,
                        warn: Any = None) -> torch.Tensor:
    """Solve (G + lambda I) c = g with lambda = ridge * trace(G) / K; warn when G is ill-conditioned."""
    K = G.shape[0]
    scale = float(torch.trace(G)) / K
    if not math.isfinite(scale):
        raise IIARuntimeError(f"IIA calibration: non-finite normal equations at step {step}")
    if scale == 0:
        return torch.zeros(K, dtype=torch.float64)
    A = G + ridge * scale * torch.eye(K, dtype=torch.float64)
    c = torch.linalg.solve(A, g)
    # Nearly collinear quantities (e.g. D_i - D_{i-1} and eps_i - eps_{i-1} at high sigma) make G singular to
    # working precision; the ridge then picks the smallest coefficients among equally good fits. Warn only
    # where that choice costs fit: the residual the ridge solution removes (2 c.g - c^T G c) falls short of the
    # best fit over G's numerically resolved eigen-directions.
    w, V = torch.linalg.eigh(G)
    keep = w > w.max() * K * torch.finfo(torch.float64).eps
    proj = V.T @ g
    best = float((proj[keep] ** 2 / w[keep]).sum())
    removed = float(2 * c @ g - c @ G @ c)
    if best > 0 and removed < (1 - 1e-3) * best:
        msg = (f"IIA step {step}: the correction directions are nearly collinear (condition number "
               f"{float(w.max() / w.min().clamp(min=1e-300)):.1e}) and the ridge {ridge:g} x trace(G)/K removes "
               f"{100 * (1 - removed / best):.1f}% less of the residual than the best fit; lower calibration.ridge "
               f"for a closer fit or raise it for smaller coefficients")
        if warn is None:
            warnings.warn(msg, IllConditionedWarning, stacklevel=2)
        else:
            warn(f"warning: {msg}")
    return c
