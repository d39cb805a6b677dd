"""What every base ODE solver shares: the step result, explicit history and NFE planning.

A step is a pure function of (denoise, state x, grid sigmas, step index i, history). ``history`` is a
tuple of the records of earlier steps (most recent last), so any step can be replayed from any state
on any sub-grid: IIA calibration relies on this.

A record is a frozen dataclass: :class:`StepRecord` (what every step knows) or a family's subclass that adds
what its later steps and its IIA quantities read. A solver names its record type (``Solver.record_type``), so
an IIA basis that needs fields the record lacks is refused when the method is built (``methods.make_method``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from iia_cli.core.grids import GridPlan
from iia_cli.runtime.errors import ConfigError, IIARuntimeError

# A noise level in a step: a Python float, or a 0-dim tensor when the grid carries gradient (see sigma_pair).
Sigma = Union[float, torch.Tensor]

# denoise(x [B, C, H, W], sigma) -> D(x; sigma), same dtype and device as x.
DenoiseFn = Callable[[torch.Tensor, Sigma], torch.Tensor]


@dataclass(frozen=True, slots=True, eq=False)
class StepRecord:
    """What every step records: sigma_i, the denoised estimate D_i = D(x_i; sigma_i) and eps_i = (x_i - D_i) /
    sigma_i (= dx/dsigma of the probability-flow ODE at x_i)."""

    sigma: Sigma
    denoised: torch.Tensor
    eps: torch.Tensor


Record = StepRecord  # any solver's record (a StepRecord subclass)
History = tuple[StepRecord, ...]

HISTORY_KEEP = 4  # records kept: enough for 4th-order Adams-Bashforth and IIA with r <= 3

# NFE/grid conventions (``sampler.convention``):
# * ``iia`` (default): K denoiser calls = K sigmas from sigma_max to sigma_min plus a final step to
#   sigma = 0 (EDM, k-diffusion); EDM Heun and DPM-Solver-2 have their own rules (see their plans).
# * ``diff-sampler``: the settings of diff-sampler's published tables (Zhou et al., zju-pi/diff-sampler):
#   K + 1 sigmas ending at sigma_min, no final denoise (2 calls a step for Heun and DPM-Solver-2, so an
#   even K), and multistep DPM-Solver++ lowers its order at the last steps.
CONVENTIONS = ("iia", "diff-sampler")
DEFAULT_CONVENTION = "iia"

# ``sampler.thresholding``: ``dynamic`` is diff-sampler's rule for its data-prediction solvers (DPM-Solver++ and
# UniPC), the dynamic thresholding of Saharia et al. 2022 (Imagen) that Lu et al. 2022b (DPM-Solver++, Section 5)
# apply to D: per sample, s = max(1, the 99.5 % quantile of |D|), then D <- clamp(D, -s, s) / s.
THRESHOLDINGS = ("none", "dynamic")
THRESHOLD_QUANTILE = 0.995


def dynamic_threshold(denoised: torch.Tensor, quantile: float = THRESHOLD_QUANTILE) -> torch.Tensor:
    """Dynamic thresholding of D [B, ...]: per sample s = max(1, quantile of |D|), D clamped to [-s, s] and divided
    by s (so a sample whose |D| stays within 1 at that quantile is only clipped at 1, never rescaled)."""
    flat = denoised.abs().flatten(1)
    s = torch.quantile(flat, quantile, dim=1).clamp(min=1.0).reshape(-1, *([1] * (denoised.dim() - 1)))
    return torch.maximum(torch.minimum(denoised, s), -s) / s


def afs_denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The analytical first step's D (AFS; Zhou et al. 2024, AMED-Solver, and diff-sampler's samplers): at
    sigma_max, x is nearly pure noise, so eps = dx/dsigma is taken as x / sqrt(1 + sigma^2) without a model call,
    i.e. D = x - sigma x / sqrt(1 + sigma^2)."""
    return x - sigma * (x / math.sqrt(1.0 + sigma * sigma))


@dataclass
class StepResult:
    x_next: torch.Tensor  # the base solver's update [B, C, H, W]
    record: StepRecord  # quantities of this step that later steps (and IIA) use


def push(history: History, record: Record) -> History:
    return (history + (record,))[-HISTORY_KEEP:]


def steps_to_zero(sigmas: torch.Tensor, i: int) -> float:
    """Steps left until the final denoise to sigma = 0 (inf on a grid that ends above 0)."""
    return len(sigmas) - 1 - i if float(sigmas[-1].detach()) == 0 else math.inf


class Solver:
    """A base ODE solver in EDM's sigma parameterisation.

    ``time_variable``: the variable in which IIA's fine reference sub-steps are uniform.
    ``reference_solver()``: the solver IIA's fine reference runs on the sub-grid, continuing from the
    coarse history (the solver itself, or its variable-step form for fixed-weight multistep methods).
    ``record_type``: the record class its steps return (what an IIA basis on this solver can read).
    ``calls_per_step``: denoiser calls of a step that does not end at sigma = 0 (2 for Heun and DPM-Solver-2).
    ``revision``: bumped when the solver's definition changes its results, so that result rows computed
    before the change are not reused (1 is left out of row identities).
    ``thresholdable``: whether ``sampler.thresholding=dynamic`` is defined for it (diff-sampler applies it to
    its data-prediction solvers only: DPM-Solver++ and UniPC).
    ``thresholding`` and ``afs``: the run's ``sampler.thresholding`` and ``sampler.afs``, applied by
    :meth:`denoiser` to the denoiser a step sees; ``afs`` also shifts the NFE accounting (:meth:`plan`).
    Subclasses define :meth:`_plan` and :meth:`_grid_calls` (model calls without AFS).
    """

    record_type: ClassVar[type[StepRecord]] = StepRecord
    name: str = ""
    order: int = 1
    time_variable: str = "sigma"
    convention: str = DEFAULT_CONVENTION
    calls_per_step: int = 1
    revision: int = 1
    thresholdable: ClassVar[bool] = False
    thresholding: str = "none"
    afs: bool = False

    def plan(self, nfe: int) -> GridPlan:
        """The grid plan of ``nfe`` denoiser calls. With AFS the first step's first D is free, so the plan is
        the one of ``nfe + 1`` calls without it (diff-sampler: ``nfe = num_steps - 2``, or ``2 (num_steps - 1)
        - 1`` for 2-call steps)."""
        if not self.afs:
            return self._plan(nfe)
        try:
            return self._plan(nfe + 1)
        except ConfigError:
            valid = [n for n in range(max(1, nfe - 3), nfe + 5) if n != nfe and self._valid(n + 1)]
            near = " or ".join(map(str, sorted(valid, key=lambda n: (abs(n - nfe), n))[:2]))
            raise ConfigError(f"{self.name} with sampler.afs=true cannot make NFE {nfe} (the first step's first "
                              f"call is free, so it plans {nfe + 1} calls); nearest valid: {near or 'none'}") from None

    def _valid(self, nfe: int) -> bool:
        try:
            self._plan(nfe)
        except ConfigError:
            return False
        return True

    def nfe_of_grid(self, sigmas: torch.Tensor) -> int:
        """Denoiser calls on ``sigmas``: the model calls, less the free first one under AFS."""
        return self._grid_calls(sigmas) - int(self.afs)

    def _plan(self, nfe: int) -> GridPlan:
        """K denoiser calls = K steps: K sigmas from sigma_max to sigma_min plus a final 0 (``iia``), or
        K + 1 sigmas ending at sigma_min without a final denoise (``diff-sampler``)."""
        if nfe < 1:
            raise ConfigError(f"{self.name}: NFE must be at least 1, got {nfe}")
        if self.convention == "diff-sampler":
            return GridPlan(n_points=nfe + 1, append_zero=False)
        return GridPlan(n_points=nfe, append_zero=True)

    def _grid_calls(self, sigmas: torch.Tensor) -> int:
        return len(sigmas) - 1

    def reference_solver(self) -> Solver:
        return self

    def same_rules(self, other: Solver) -> Solver:
        """``other`` (a new solver, e.g. a reference form) under this solver's convention, thresholding and AFS."""
        other.convention, other.thresholding, other.afs = self.convention, self.thresholding, self.afs
        return other

    def denoiser(self, denoise: DenoiseFn, sigmas: torch.Tensor, i: int, history: History) -> DenoiseFn:
        """The denoiser step i sees: ``denoise`` itself by default. With AFS the first call of the first step
        (i = 0, no history: the call at x_0 and sigma_0) is :func:`afs_denoised`, no model call; with dynamic
        thresholding every D is :func:`dynamic_threshold`-ed (the AFS one too, as diff-sampler does)."""
        first = self.afs and i == 0 and not history
        if not first and self.thresholding == "none":
            return denoise
        pending = [first]

        def wrapped(x: torch.Tensor, sigma: float) -> torch.Tensor:
            if pending[0]:
                pending[0] = False
                if float(sigma) != float(sigmas[0]):
                    raise IIARuntimeError(f"internal: {self.name}'s first call is at sigma {sigma}, not sigma_0")
                d = afs_denoised(x, float(sigma))
            else:
                d = denoise(x, sigma)
            return dynamic_threshold(d) if self.thresholding == "dynamic" else d

        return wrapped

    def grid_note(self, sigmas: torch.Tensor) -> str:
        return ""

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History) -> StepResult:
        raise NotImplementedError


def sigma_pair(sigmas: torch.Tensor, i: int) -> tuple[Sigma, Sigma]:
    """(sigma_i, sigma_{i+1}): Python floats, exactly as every sampling run uses them; 0-dim tensors when ``sigmas``
    requires grad (a learned grid, :mod:`iia_cli.experiments.ld3`), so that the step stays differentiable in the
    sigmas."""
    if sigmas.requires_grad:
        return sigmas[i], sigmas[i + 1]
    return float(sigmas[i]), float(sigmas[i + 1])


# The scalar functions of the step formulas for either kind of sigma: math on floats (bit for bit what the solvers
# always computed), torch on tensors (differentiable).
def log(s: Sigma) -> Sigma:
    return torch.log(s) if isinstance(s, torch.Tensor) else math.log(s)


def sqrt(s: Sigma) -> Sigma:
    return torch.sqrt(s) if isinstance(s, torch.Tensor) else math.sqrt(s)


def expm1(s: Sigma) -> Sigma:
    return torch.expm1(s) if isinstance(s, torch.Tensor) else math.expm1(s)
