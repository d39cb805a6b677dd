"""Improved PNDM (Zhang & Chen 2023, DEIS; Appendix G of the IIA paper).

Adams-Bashforth on eps = dx/dsigma up to order 4 with the fixed weights 1; (3, -1)/2;
(23, -16, 5)/12; (55, -59, 37, -9)/24, lower orders while warming up, then the DDIM-form (Euler) update.

IIA's fine reference runs the same multistep method with *variable-step* Adams-Bashforth weights
(Lagrange interpolation of eps through the actual past sigmas), so that it can continue from the coarse
history on its finer sub-grid; on equal steps those weights are exactly the fixed ones above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import DenoiseFn, History, Solver, StepRecord, StepResult, sigma_pair

AB_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def variable_ab_weights(past_sigmas: list[float], sigma_next: float) -> list[float]:
    """Adams-Bashforth weights for arbitrary past points: w_j = (1/h) int_{s_0}^{s_next} L_j(s) ds, with
    L_j the Lagrange basis over ``past_sigmas`` (current point first). Equal steps give AB_WEIGHTS."""
    s0 = past_sigmas[0]
    h = sigma_next - s0
    nodes = [(s - s0) / h for s in past_sigmas]  # 0, -1, -2, ... on equal steps
    weights = []
    for j, nj in enumerate(nodes):
        basis = np.poly1d([1.0])
        for m, nm in enumerate(nodes):
            if m != j:
                basis = basis * np.poly1d([1.0, -nm]) / (nj - nm)
        antiderivative = basis.integ()
        weights.append(float(antiderivative(1.0) - antiderivative(0.0)))
    return weights


@dataclass(frozen=True, slots=True, eq=False)
class IPNDMRecord(StepRecord):
    """The Adams-Bashforth combination eps_comb = sum_j w_j eps_{i-j} the step used, and its denoised form
    x_i - sigma_i eps_comb (IIA-iPNDM's differences, Appendix G of the IIA paper)."""

    eps_comb: torch.Tensor
    denoised_comb: torch.Tensor


class IPNDM(Solver):
    name = "ipndm"
    order = 4
    record_type = IPNDMRecord

    def __init__(self, variable_steps: bool = False) -> None:
        self.variable_steps = variable_steps

    def reference_solver(self) -> Solver:
        return self.same_rules(IPNDM(variable_steps=True))

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History) -> StepResult:
        s, s_next = sigma_pair(sigmas, i)
        denoised = denoise(x, s)
        eps = (x - denoised) / s
        order = min(self.order, len(history) + 1)
        recent = list(reversed(history[len(history) - (order - 1):])) if order > 1 else []
        past = [eps] + [r.eps for r in recent]
        if self.variable_steps:
            weights = variable_ab_weights([s] + [r.sigma for r in recent], s_next)
        else:
            weights = AB_WEIGHTS[order]
        eps_comb = sum(w * e for w, e in zip(weights, past))
        record = IPNDMRecord(s, denoised, eps, eps_comb=eps_comb, denoised_comb=x - s * eps_comb)
        return StepResult(x + (s_next - s) * eps_comb, record)
