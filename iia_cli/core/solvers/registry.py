"""Base ODE solvers, one file per family, and :data:`SOLVERS`, the registry whose keys drive the method names,
the CLI choices and the error messages. A new solver: its file here and one entry in :data:`SOLVERS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from iia_cli.runtime.errors import ConfigError
from .base import CONVENTIONS, DEFAULT_CONVENTION, THRESHOLDINGS, Solver
from .dpm import DPMSolver2, DPMSolverPPMultistep
from .euler import DDIM
from .heun import Heun
from .ipndm import IPNDM
from .unipc import UniPC


@dataclass(frozen=True)
class SolverSpec:
    """A registered base solver: ``build(convention)`` makes a fresh one, ``aliases`` are other names it takes,
    ``help`` is its one-line description."""

    build: Callable[[str], Solver]
    help: str
    aliases: tuple[str, ...] = ()


SOLVERS: dict[str, SolverSpec] = {
    "ddim": SolverSpec(lambda convention: DDIM(), "DDIM (eta = 0), i.e. Euler in sigma", ("euler",)),
    "edm": SolverSpec(lambda convention: Heun(), "EDM's Heun sampler (Karras et al. 2022, Algorithm 1)", ("heun",)),
    "dpm-solver-2": SolverSpec(lambda convention: DPMSolver2(), "single-step second-order DPM-Solver"),
    "dpm-solver++-2m": SolverSpec(lambda convention: DPMSolverPPMultistep(2, convention=convention),
                                  "multistep DPM-Solver++(2M)"),
    "dpm-solver++-3m": SolverSpec(lambda convention: DPMSolverPPMultistep(3, "public", convention),
                                  "the published DPM-Solver++(3M) (k-diffusion's weighting)"),
    "dpm-solver++-3m-exact": SolverSpec(lambda convention: DPMSolverPPMultistep(3, "exact", convention),
                                        "DPM-Solver++(3M) with the exact-integral weighting 2 phi_3"),
    "ipndm": SolverSpec(lambda convention: IPNDM(), "improved PNDM: Adams-Bashforth on eps up to order 4"),
    "unipc": SolverSpec(lambda convention: UniPC(), "UniPC-3 (bh2, data prediction)"),
}
BASE_SOLVER_NAMES = tuple(SOLVERS)
SOLVER_ALIASES = {alias: name for name, spec in SOLVERS.items() for alias in spec.aliases}


def teacher_choices() -> tuple[str, ...]:
    """Names ``calibration.teacher`` takes: every base solver, and ``exact`` (the model's closed-form solution)."""
    return BASE_SOLVER_NAMES + ("exact",)


def teacher_name(name: str, substeps: int) -> str:
    """The canonical teacher name (aliases resolved), or a ConfigError naming the valid choices."""
    canonical = SOLVER_ALIASES.get(name, name)
    if canonical not in teacher_choices():
        raise ConfigError(f"calibration.teacher={name!r} is not valid; choose one of "
                          f"{', '.join(teacher_choices())} (aliases heun=edm, euler=ddim)")
    if substeps < 1:
        raise ConfigError(f"calibration.teacher_substeps={substeps} must be at least 1")
    return canonical


def thresholdable_solvers() -> tuple[str, ...]:
    """The base solvers ``sampler.thresholding=dynamic`` is defined for (diff-sampler's DPM-Solver++ and UniPC)."""
    return tuple(name for name, spec in SOLVERS.items() if spec.build(DEFAULT_CONVENTION).thresholdable)


def make_solver(name: str, convention: str = DEFAULT_CONVENTION, thresholding: str = "none",
                afs: bool = False) -> Solver:
    """A fresh base solver by name or alias (``SOLVER_ALIASES``) under an NFE/grid convention, with
    ``sampler.thresholding`` (refused for a solver it is not defined for) and ``sampler.afs``."""
    name = SOLVER_ALIASES.get(name, name)
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; choose one of {', '.join(BASE_SOLVER_NAMES)}")
    if convention not in CONVENTIONS:
        raise ConfigError(f"sampler.convention={convention!r} is not valid; choose one of {', '.join(CONVENTIONS)}")
    if thresholding not in THRESHOLDINGS:
        raise ConfigError(f"sampler.thresholding={thresholding!r} is not valid; choose one of "
                          f"{', '.join(THRESHOLDINGS)}")
    solver = SOLVERS[name].build(convention)
    if thresholding != "none" and not solver.thresholdable:
        raise ConfigError(f"sampler.thresholding={thresholding} is defined for the data-prediction solvers "
                          f"{', '.join(thresholdable_solvers())} and their IIA methods (as diff-sampler applies it), "
                          f"not {name}; use sampler.thresholding=none for it")
    solver.convention, solver.thresholding, solver.afs = convention, thresholding, bool(afs)
    return solver


__all__ = ["BASE_SOLVER_NAMES", "SOLVERS", "SOLVER_ALIASES", "SolverSpec", "make_solver", "teacher_choices",
           "teacher_name", "thresholdable_solvers"]
