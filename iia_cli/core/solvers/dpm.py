"""DPM-Solver family in EDM's x-space (alpha = 1, lambda = -log sigma).

* ``dpm-solver-2``: single-step second-order DPM-Solver, noise prediction, midpoint in lambda
  (Lu et al. 2022, Algorithm 1 with r1 = 1/2).
* ``dpm-solver++-2m``: multistep DPM-Solver++ with data prediction (Lu et al. 2022b, Algorithm 2).
* ``dpm-solver++-3m``: the published third-order multistep DPM-Solver++(3M), as k-diffusion's
  ``sample_dpmpp_3m_sde`` with eta = 0 computes it (Lu et al. 2022b, Appendix B): the second difference is
  weighted by phi_3; the first step is first order, the second ``x' + phi_2 D1``, then full order up to the
  final denoise.
* ``dpm-solver++-3m-exact``: the second difference weighted by 2 phi_3, the exact integral of the quadratic
  Newton interpolant of D in lambda (third order as steps shrink, where the public weighting is second
  order); warm-up with DPM-Solver++(2M) and lower order at the last step before the final denoise.

Under ``sampler.convention=diff-sampler`` both 3M forms warm up with the 2M update and lower their order at
the last steps, ``min(order, steps left)``, as diff-sampler's and diffusers' DPM-Solver++ do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iia_cli.core.grids import GridPlan
from iia_cli.runtime.errors import ConfigError

from .base import DenoiseFn, History, Sigma, Solver, StepRecord, StepResult, expm1, log, sigma_pair, sqrt, steps_to_zero


@dataclass(frozen=True, slots=True, eq=False)
class LambdaRecord(StepRecord):
    """A multistep record in lambda = -log sigma: the later steps' divided differences of D need lambda_i."""

    lam: Sigma


class DPMSolver2(Solver):
    name = "dpm-solver-2"
    order = 2
    calls_per_step = 2
    time_variable = "lambda"

    def _plan(self, nfe: int) -> GridPlan:
        """Both conventions: NFE / 2 steps ending at sigma_min, no final denoise."""
        if nfe < 2 or nfe % 2:
            lo, hi = max(2, nfe - nfe % 2), nfe + 2 - nfe % 2
            near = f"{lo} or {hi}" if nfe % 2 else f"{hi}"
            raise ConfigError(f"{self.name} takes an even NFE (2 calls a step); got {nfe}, nearest valid: {near}")
        return GridPlan(n_points=nfe // 2 + 1, append_zero=False)

    def _grid_calls(self, sigmas: torch.Tensor) -> int:
        return sum(2 if float(s) > 0 else 1 for s in sigmas[1:])

    def grid_note(self, sigmas: torch.Tensor) -> str:
        return "steps end at sigma_min, no final denoise" if float(sigmas[-1]) > 0 else ""

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History) -> StepResult:
        s, s_next = sigma_pair(sigmas, i)
        denoised = denoise(x, s)
        eps = (x - denoised) / s
        record = StepRecord(s, denoised, eps)
        if s_next == 0:  # lambda = inf: the step is a plain denoise (Euler).
            return StepResult(denoised, record)
        s_mid = sqrt(s * s_next)  # midpoint in lambda
        u = x + (s_mid - s) * eps  # first-order step to the midpoint
        eps_mid = (u - denoise(u, s_mid)) / s_mid
        return StepResult(x + (s_next - s) * eps_mid, record)


def multistep_data_update(x: torch.Tensor, s: Sigma, s_next: Sigma, past: list[tuple[Sigma, torch.Tensor]],
                          order: int, second: str = "2m", d2_weight: float = 1.0) -> torch.Tensor:
    """One DPM-Solver++ multistep update of the given order.

    ``past`` holds (lambda_j, D_j) pairs, most recent (the current point) first. With phi_1 = expm1(-h),
    phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2 and the divided differences D1, D2 of D in lambda:
    order 1: ``x' = (s'/s) x - phi_1 D_0``; order 2: ``x' - phi_1 D1_0 / 2`` (``second="2m"``, DPM-Solver++(2M))
    or ``x' + phi_2 D1_0`` (``second="phi2"``, k-diffusion's 3M warm-up); order 3:
    ``x' + phi_2 D1 - d2_weight * phi_3 D2`` (1: the published 3M; 2: the exact integral of the quadratic).
    """
    lam_0, d_0 = past[0]
    if s_next == 0:
        return d_0
    h = log(s / s_next)
    phi_1 = expm1(-h)
    x_next = (s_next / s) * x - phi_1 * d_0
    if order == 1:
        return x_next
    phi_2 = phi_1 / h + 1
    lam_1, d_1 = past[1]
    r0 = (lam_0 - lam_1) / h
    d1_0 = (d_0 - d_1) / r0
    if order == 2:
        return x_next + phi_2 * d1_0 if second == "phi2" else x_next - phi_1 * 0.5 * d1_0
    lam_2, d_2 = past[2]
    r1 = (lam_1 - lam_2) / h
    d1_1 = (d_1 - d_2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_3 = phi_2 / h - 0.5
    return x_next + phi_2 * d1 - d2_weight * phi_3 * d2


class DPMSolverPPMultistep(Solver):
    """``variant``: "public" (k-diffusion's 3M rules under the iia convention) or "exact" (2 phi_3)."""

    time_variable = "lambda"
    record_type = LambdaRecord
    thresholdable = True  # data prediction: diff-sampler thresholds its D (sampler.thresholding)

    def __init__(self, order: int, variant: str = "public", convention: str = "iia",
                 lower_final: bool = True) -> None:
        self.order = order
        self.variant = variant
        self.convention = convention
        self.lower_final = lower_final  # False for IIA's fine reference on a sub-grid
        self.name = f"dpm-solver++-{order}m" + ("-exact" if variant == "exact" else "")
        if order == 3 and variant == "public":
            self.revision = 2  # before it became the published 3M, this name computed the exact-integral form

    def reference_solver(self) -> Solver:
        return self.same_rules(DPMSolverPPMultistep(self.order, self.variant, self.convention, lower_final=False))

    def _order(self, sigmas: torch.Tensor, i: int, history: History) -> tuple[int, str]:
        """The order of step i and the form of its second-order update."""
        order = min(self.order, len(history) + 1)
        if self.convention == "diff-sampler":  # diff-sampler / diffusers: min(order, steps left)
            return (min(order, len(sigmas) - 1 - i) if self.lower_final else order), "2m"
        if self.order == 3 and self.variant == "public":  # k-diffusion: full order up to the final denoise
            return order, "phi2"
        return int(min(order, steps_to_zero(sigmas, i))), "2m"

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History) -> StepResult:
        s, s_next = sigma_pair(sigmas, i)
        denoised = denoise(x, s)
        lam = -log(s)
        order, second = self._order(sigmas, i, history)
        past = [(lam, denoised)] + [(r.lam, r.denoised) for r in reversed(history[len(history) - order + 1:])] \
            if order > 1 else [(lam, denoised)]
        x_next = multistep_data_update(x, s, s_next, past, order, second, 2.0 if self.variant == "exact" else 1.0)
        return StepResult(x_next, LambdaRecord(s, denoised, (x - denoised) / s, lam=lam))
