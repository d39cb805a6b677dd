"""Improved PNDM (Zhang & Chen 2023, DEIS; Appendix G of the IIA paper).

Adams-Bashforth on eps = dx/dsigma up to order 4 with the fixed weights 1; (3, -1)/2;
(23, -16, 5)/12; (55, -59, 37, -9)/24, lower orders while warming up, then the DDIM-form (Euler) update.
"""

from __future__ import annotations

import torch

from .base import DenoiseFn, History, Solver, StepResult, sigma_pair

AB_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class IPNDM(Solver):
    name = "ipndm"
    order = 4
    reference_keeps_history = False  # fixed AB weights assume equal steps: the fine run warms up afresh

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History) -> StepResult:
        s, s_next = sigma_pair(sigmas, i)
        denoised = denoise(x, s)
        eps = (x - denoised) / s
        order = min(self.order, len(history) + 1)
        past = [eps] + [r["eps"] for r in reversed(history[-(order - 1):])] if order > 1 else [eps]
        eps_comb = sum(w * e for w, e in zip(AB_WEIGHTS[order], past))
        record = {"denoised": denoised, "eps": eps, "eps_comb": eps_comb, "denoised_comb": x - s * eps_comb}
        return StepResult(x + (s_next - s) * eps_comb, record)
