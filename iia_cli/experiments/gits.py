"""GITS-style search of a sampler's time grid (Chen et al., ICML 2024, "On the Trajectory Regularity of ODE-based
Diffusion Sampling", Sec. 4: dynamic programming over a fine candidate grid against teacher trajectories).

1. Teacher: a few noises are solved finely through C candidate sigmas (a Karras rho-7 grid over the run's
   [sigma_min, sigma_max], clipped to the model's range): ``teacher_substeps`` Heun steps per candidate interval,
   uniform in log sigma (:class:`iia_cli.calibration.teacher.Teacher`). The teacher states x*_i at every candidate are kept.
2. Step costs: for every pair i < j, one step of the cost solver from x*_i at sigma_i to sigma_j, compared with
   x*_j: ``cost[i, j]`` = mean over the noises of ||x_step - x*_j||_2 (GITS's cost).
3. Dynamic programming: the cheapest path from the first candidate (sigma_max) to the last (sigma_min) with
   exactly the number of steps the solver's NFE plan asks for (``Solver.plan``), in denoiser calls: each step
   costs the solver's ``calls_per_step`` calls (EDM's Heun and DPM-Solver-2: 2). The step to sigma = 0 of the
   ``iia`` convention (a final denoise, or EDM's final Euler step) is appended after sigma_min and not searched:
   from the teacher's state at sigma_min it costs the same on every path.

Which step is costed: single-step solvers (``ddim``, ``edm``, ``dpm-solver-2``) cost their own step. Multistep
solvers (``ipndm``, ``dpm-solver++-2m``/``-3m``/``-3m-exact``, ``unipc``) would make a step's cost depend on the
path before it; like GITS, which searches with DDIM's one-step cost and then samples with iPNDM, they are costed
with DDIM's (Euler's) step, which is also their own first step from an empty history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iia_cli.calibration.teacher import Teacher
from iia_cli.config.experiment import ExperimentConfig, GridConfig
from iia_cli.core.gridfile import GridFile
from iia_cli.core.grids import make_karras_grid
from iia_cli.core.sampling import BoundDenoiser, format_seeds, noise_and_conditioning
from iia_cli.core.solvers.base import Solver
from iia_cli.core.solvers.registry import make_solver
from iia_cli.models.base import Denoiser, round_sigmas
from iia_cli.runtime.errors import ConfigError, IIARuntimeError
from iia_cli.runtime.progress import ImageProgress, log as default_log

SEARCH_KINDS = ("gits",)
SINGLE_STEP_SOLVERS = ("ddim", "edm", "dpm-solver-2")  # a step depends on its state only, not on history
DEFAULT_CANDIDATES = 100
DEFAULT_NOISES = 64
DEFAULT_TEACHER_SUBSTEPS = 5
SEARCH_SEED_START = 3_000_000_000  # teacher noises: disjoint from evaluation (0..), calibration (1e9) and validation (2e9)

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class SearchSettings:
    """How a GITS search runs: ``candidates`` sigmas, ``noises`` teacher trajectories (seeds from ``seed_start``),
    ``teacher_substeps`` Heun steps per candidate interval, ``batch`` noises per model call, ``coeff`` the weight
    growth of the path's later steps (:func:`cheapest_path`; GITS runs 1.15, 1 weighs every step alike)."""

    candidates: int = DEFAULT_CANDIDATES
    noises: int = DEFAULT_NOISES
    teacher_substeps: int = DEFAULT_TEACHER_SUBSTEPS
    seed_start: int = SEARCH_SEED_START
    batch: int = 64
    coeff: float = 1.0

    def __post_init__(self) -> None:
        for name, low in (("candidates", 3), ("noises", 1), ("teacher_substeps", 1), ("batch", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least {low}")
        check_coeff(self.coeff)


def check_coeff(coeff: float) -> None:
    """GITS's weight growth must be a positive number (ConfigError naming --coeff otherwise)."""
    if not (math.isfinite(coeff) and coeff > 0):
        raise ConfigError(f"--coeff={coeff} must be a positive number (GITS: 1.15; 1: no weighting)")


def cheapest_path(cost: np.ndarray, budget: int, calls: np.ndarray | int = 1,
                  coeff: float = 1.0) -> tuple[list[int], float]:
    """The cheapest path 0 = i_0 < i_1 < ... < i_S = C - 1 through a [C, C] cost matrix (``cost[i, j]``: the step
    from candidate i to j, i < j; the rest is ignored) whose steps use exactly ``budget`` calls, ``calls[i, j]``
    each (an int: the same for every step). Dynamic programming over (last candidate, calls used), O(C^2 budget).
    ``coeff``: GITS's weighting, the s-th step (s = 0, 1, ...) costs ``coeff ** s`` times its entry (GITS runs
    1.15: later, low-sigma steps weigh more, a patch for local errors that do not add up to the global one); it
    needs the same calls for every step. Returns (the candidate indices, the path's weighted total cost); ties go
    to the smaller predecessor index."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n) or n < 2:
        raise ValueError(f"cost must be a square matrix of at least 2 candidates, got shape {cost.shape}")
    check_coeff(coeff)
    if coeff != 1.0 and np.ndim(calls) != 0:
        raise ValueError("a coeff other than 1 needs the same number of calls for every step")
    calls_m = np.broadcast_to(np.asarray(calls, dtype=np.int64), (n, n))
    if (calls_m < 1).any():
        raise ValueError("every step needs at least one call")
    best = np.full((budget + 1, n), math.inf)  # best[b, j]: cheapest path from 0 to j using b calls
    prev = np.full((budget + 1, n), -1, dtype=np.int64)
    best[0, 0] = 0.0
    for b in range(1, budget + 1):
        for j in range(1, n):
            k = calls_m[:j, j]
            ok = k <= b
            if not ok.any():
                continue
            cand = np.full(j, math.inf)
            weight = coeff ** ((b - k[ok]) // k[ok])  # the step's index: the steps taken before it
            cand[ok] = best[b - k[ok], np.arange(j)[ok]] + weight * cost[:j, j][ok]
            i = int(np.argmin(cand))
            if cand[i] < best[b, j]:
                best[b, j], prev[b, j] = cand[i], i
    if not math.isfinite(best[budget, n - 1]):
        raise ConfigError(f"no path over {n} candidates uses exactly {budget} denoiser calls; use more candidates")
    path, b, j = [n - 1], budget, n - 1
    while j != 0:
        i = int(prev[b, j])
        b, j = b - int(calls_m[i, j]), i
        path.append(j)
    return path[::-1], float(best[budget, n - 1])


def cost_solver(solver: Solver) -> Solver:
    """The solver whose step is costed: the solver itself when single-step, else DDIM (see the module doc)."""
    return solver if solver.name in SINGLE_STEP_SOLVERS else make_solver("ddim", solver.convention)


class _ReuseFirstCall:
    """A denoiser that computes D(x_i; sigma_i) once for all the steps that start from the teacher state x_i (every
    step's first call), and counts the calls it really makes."""

    def __init__(self, denoise: BoundDenoiser, x: torch.Tensor, sigma: float) -> None:
        self.denoise, self.x, self.sigma = denoise, x, sigma
        self.first: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if x is self.x and sigma == self.sigma:
            if self.first is None:
                self.first, self.calls = self.denoise(x, sigma), self.calls + 1
            return self.first
        self.calls += 1
        return self.denoise(x, sigma)


def candidate_sigmas(grid: GridConfig, model: Denoiser, n: int) -> torch.Tensor:
    """C candidates: a Karras rho-7 grid over ``grid``'s [sigma_min, sigma_max] clipped to the model's range and
    rounded by the model's ``round_sigma`` (when it has one); strictly descending, all positive."""
    s_min = max(float(grid.sigma_min), float(model.sigma_min))
    s_max = min(float(grid.sigma_max), float(model.sigma_max))
    if not s_min < s_max:
        raise ConfigError(f"grid sigma range [{s_min}, {s_max}] is empty after clipping to the model's range")
    sig = make_karras_grid(n, s_min, s_max, 7.0)
    sig = round_sigmas(model, sig)
    if not bool((sig[:-1] > sig[1:]).all()):
        raise ConfigError(f"{n} candidates collapse on this model's sigmas (round_sigma); use fewer candidates")
    return sig


def teacher_states(model: Denoiser, cand: torch.Tensor, seeds: list[int], settings: SearchSettings,
                   device: torch.device, state_dtype: torch.dtype,
                   class_label: int | None = None) -> tuple[list[torch.Tensor], list[Any], int]:
    """The teacher's states at every candidate, per chunk of noises: ``states[k]`` is [C, b, ...] for chunk k;
    also the chunks' conditioning and the teacher's denoiser calls (all chunks)."""
    teacher = Teacher("edm", settings.teacher_substeps)
    chunks = [seeds[k:k + settings.batch] for k in range(0, len(seeds), settings.batch)]
    states, labels, calls = [], [], 0
    with ImageProgress(len(chunks) * (len(cand) - 1), f"GITS teacher {teacher.tag} ({len(seeds)} noises)",
                       unit="steps") as bar:
        for chunk in chunks:
            noise, lab = noise_and_conditioning(model, chunk, device, class_label)
            den, hist = BoundDenoiser(model, lab), ()
            x = noise.to(state_dtype) * float(cand[0])
            traj = [x]
            for i in range(len(cand) - 1):
                x, hist = teacher.run(model, den, x, hist, float(cand[i]), float(cand[i + 1]))
                traj.append(x)
                bar.advance(1)
            states.append(torch.stack(traj))
            labels.append(lab)
            calls += den.calls * len(chunk)
    return states, labels, calls


def step_costs(solver: Solver, model: Denoiser, cand: torch.Tensor, states: list[torch.Tensor],
               labels: list[Any]) -> tuple[np.ndarray, int]:
    """``cost[i, j]`` (i < j; inf elsewhere): mean over the noises of ||step(x*_i; sigma_i -> sigma_j) - x*_j||_2,
    one step of ``solver`` from the teacher state, and the denoiser calls it took (per noise, summed)."""
    n = len(cand)
    total = np.zeros((n, n))
    calls = 0
    with ImageProgress(n - 1, f"GITS step costs ({solver.name} steps, {n} candidates)", unit="steps") as bar:
        for i in range(n - 1):
            for traj, lab in zip(states, labels):
                x_i = traj[i]
                den = _ReuseFirstCall(BoundDenoiser(model, lab), x_i, float(cand[i]))
                for j in range(i + 1, n):
                    x_step = solver.step(den, x_i, torch.stack([cand[i], cand[j]]), 0, ()).x_next
                    total[i, j] += float(torch.linalg.vector_norm((x_step - traj[j]).flatten(1), dim=1).sum())
                calls += den.calls * traj.shape[1]
            bar.advance(1)
    count = sum(t.shape[1] for t in states)
    cost = np.full((n, n), math.inf)
    upper = np.triu_indices(n, 1)
    cost[upper] = total[upper] / count
    return cost, calls


def search_gits(cfg: ExperimentConfig, method: str, nfe: int, settings: SearchSettings = SearchSettings(),
                log: LogFn = default_log) -> GridFile:
    """Search the grid of ``method`` at ``nfe`` on the config's model (GITS, see the module doc). The run's sigma
    range is ``cfg.grid``'s [sigma_min, sigma_max] (whatever its kind). Returns the grid file (not yet saved)."""
    from iia_cli.api import prepare  # api imports the grid-file loader; the search is a layer above it

    t0 = time.perf_counter()
    g = cfg.grid
    fine = GridConfig(kind="karras", rho=7.0, sigma_min=g.sigma_min, sigma_max=g.sigma_max)
    p = prepare(cfg, method, nfe, grid=fine)
    solver = p.method.solver
    plan = solver.plan(nfe)
    steps = plan.n_points - 1  # steps from sigma_max to sigma_min; the step to 0 (if any) is not searched
    cand = candidate_sigmas(g, p.model, settings.candidates)
    if steps > len(cand) - 1:
        raise ConfigError(f"{p.method.name} at NFE {nfe} takes {steps} steps to sigma_min but {len(cand)} candidates "
                          f"allow at most {len(cand) - 1}; use --candidates {steps + 1} or more")
    costed = cost_solver(solver)
    seeds = list(range(settings.seed_start, settings.seed_start + settings.noises))
    log(f"GITS search for {p.method.name} at NFE {nfe} on {cfg.model.kind}: {len(cand)} Karras candidates "
        f"[{float(cand[-1]):.4g}, {float(cand[0]):.4g}], {settings.noises} teacher noises (edm, "
        f"{settings.teacher_substeps} Heun steps per candidate interval), step cost of {costed.name}, "
        f"{steps} steps of {solver.calls_per_step} call(s)" + (" + the step to 0" if plan.append_zero else ""))
    states, labels, teacher_calls = teacher_states(p.model, cand, seeds, settings, p.device, p.state_dtype,
                                                   cfg.sampler.class_label)
    cost, cost_calls = step_costs(costed, p.model, cand, states, labels)
    if not np.isfinite(cost[np.triu_indices(len(cand), 1)]).all():
        raise IIARuntimeError("GITS: a step cost is not finite (NaN/Inf in a solver step); check the model")
    path, path_cost = cheapest_path(cost, steps * solver.calls_per_step, solver.calls_per_step, settings.coeff)
    sigmas = cand[path]
    if plan.append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    if solver.nfe_of_grid(sigmas) != nfe:
        raise IIARuntimeError(f"internal: the GITS grid makes {solver.nfe_of_grid(sigmas)} calls, not {nfe}")
    uniform = [round(k * (len(cand) - 1) / steps) for k in range(steps + 1)]
    uniform_cost = float(sum(settings.coeff ** k * cost[a, b] for k, (a, b) in enumerate(zip(uniform, uniform[1:]))))
    seconds = time.perf_counter() - t0
    log(f"GITS path cost {path_cost:.4g} (evenly spaced candidates, ~Karras: {uniform_cost:.4g}); sigmas "
        + ", ".join(f"{float(s):.4g}" for s in sigmas) + f"; {teacher_calls + cost_calls} denoiser calls, "
        f"{seconds:.1f} s")
    search = {
        "kind": "gits",
        "candidates": {"kind": "karras", "rho": 7.0, "n": len(cand), "sigma_min": float(cand[-1]),
                       "sigma_max": float(cand[0])},
        "teacher": Teacher("edm", settings.teacher_substeps).tag,
        "noises": settings.noises,
        "seeds": format_seeds(seeds),
        "step_cost": costed.name,
        "cost": "mean over the noises of ||one step from the teacher state - the teacher state||_2",
        "coeff": settings.coeff,
        "path": path,
        "path_cost": path_cost,
        "evenly_spaced_cost": uniform_cost,
        "denoiser_calls": {"teacher": teacher_calls, "costs": cost_calls},
        "state_dtype": str(p.state_dtype).removeprefix("torch."),
        "seconds": round(seconds, 3),
    }
    return GridFile(sigmas=[float(s) for s in sigmas], nfe=nfe, method=p.method.name, solver=solver.name,
                    convention=solver.convention, model_kind=cfg.model.kind, model_sha256=p.fingerprint,
                    search=search)


def search_grid(cfg: ExperimentConfig, method: str, nfe: int, kind: str = "gits",
                settings: SearchSettings = SearchSettings(), log: LogFn = default_log) -> GridFile:
    """A searched grid of ``kind`` (:data:`SEARCH_KINDS`)."""
    if kind not in SEARCH_KINDS:
        raise ConfigError(f"--search {kind!r} is not valid; choose one of {', '.join(SEARCH_KINDS)}")
    if cfg.sampler.afs or cfg.sampler.thresholding != "none":
        raise ConfigError("iia grid --search gits costs plain solver steps: it does not model sampler.afs or "
                          "sampler.thresholding yet; search with sampler.afs=false and sampler.thresholding=none")
    return search_gits(cfg, method, nfe, settings, log)
