"""EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) and its two NFE conventions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iia_cli.core.grids import GridPlan
from iia_cli.runtime.errors import ConfigError

from .base import DenoiseFn, History, Solver, StepRecord, StepResult, sigma_pair


@dataclass(frozen=True, slots=True, eq=False)
class HeunRecord(StepRecord):
    """A Heun step's quantities of the IIA paper's eq. (18) and Algorithm 2: u_i = x_i - D_i,
    v_i = D_i - D(x_i + h_i eps_i; sigma_{i+1}) (None on a step that is Euler only) and the averaged slope S_i
    (eps_i on an Euler-only step)."""

    u: torch.Tensor
    v: torch.Tensor | None
    slope: torch.Tensor


class Heun(Solver):
    """Heun steps; a step to sigma = 0 is Euler only (one call).

    Odd NFE K follows EDM: (K + 1) / 2 sigmas, (K - 1) / 2 Heun steps and a final Euler step to 0.
    Even NFE K takes K / 2 Heun steps ending at sigma_min without a final denoise (diff-sampler), under
    either convention; ``sampler.convention=diff-sampler`` refuses odd K.
    """

    name = "edm"
    order = 2
    calls_per_step = 2
    record_type = HeunRecord

    def _plan(self, nfe: int) -> GridPlan:
        if nfe < 2:
            raise ConfigError(f"{self.name}: NFE must be at least 2, got {nfe}")
        if self.convention == "diff-sampler" and nfe % 2:
            raise ConfigError(f"{self.name} under sampler.convention=diff-sampler takes an even NFE (2 calls a step, "
                              f"no final denoise); got {nfe}, nearest valid: {nfe - 1 if nfe > 2 else 4} or {nfe + 1}")
        if nfe % 2 == 1:
            return GridPlan(n_points=(nfe + 1) // 2, append_zero=True)
        return GridPlan(n_points=nfe // 2 + 1, append_zero=False)

    def _grid_calls(self, sigmas: torch.Tensor) -> int:
        return sum(2 if float(s) > 0 else 1 for s in sigmas[1:])

    def grid_note(self, sigmas: torch.Tensor) -> str:
        if float(sigmas[-1]) == 0:
            return "EDM convention: Heun steps, final Euler step to sigma=0"
        return ("even NFE: Heun steps ending at sigma_min, no final denoise (EDM's own sampler takes odd NFEs; "
                "this is how diff-sampler's tables run Heun at an even NFE)")

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History) -> StepResult:
        s, s_next = sigma_pair(sigmas, i)
        h = s_next - s
        denoised = denoise(x, s)
        d = (x - denoised) / s
        x_euler = x + h * d  # Euler step.
        u = x - denoised
        if s_next == 0:
            return StepResult(x_euler, HeunRecord(s, denoised, d, u=u, v=None, slope=d))
        # Apply 2nd order correction.
        denoised_next = denoise(x_euler, s_next)
        d_next = (x_euler - denoised_next) / s_next
        slope = 0.5 * (d + d_next)
        return StepResult(x + h * slope, HeunRecord(s, denoised, d, u=u, v=denoised - denoised_next, slope=slope))
