"""DDIM (eta = 0), which in EDM's x-space is exactly Euler in sigma (Karras et al. 2022, Table 1;
the IIA paper's eq. (6) corrects this step)."""

from __future__ import annotations

import torch

from .base import DenoiseFn, History, Solver, StepRecord, StepResult, sigma_pair


class DDIM(Solver):
    name = "ddim"
    order = 1

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History) -> StepResult:
        s, s_next = sigma_pair(sigmas, i)
        denoised = denoise(x, s)
        eps = (x - denoised) / s  # dx/dsigma
        # Euler step in sigma (= DDIM update).
        return StepResult(x + (s_next - s) * eps, StepRecord(s, denoised, eps))
