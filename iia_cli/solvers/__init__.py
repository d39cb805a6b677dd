"""Base ODE solvers, one file per family, and the registry whose keys drive the CLI choices."""

from __future__ import annotations

from ..errors import ConfigError
from .base import CONVENTIONS, DEFAULT_CONVENTION, DenoiseFn, GridPlan, History, Record, Solver, StepResult, push
from .dpm import DPMSolver2, DPMSolverPPMultistep
from .euler import DDIM
from .heun import Heun
from .ipndm import IPNDM
from .unipc import UniPC


def make_solver(name: str, convention: str = DEFAULT_CONVENTION) -> Solver:
    """A fresh base solver by name (aliases: euler = ddim, heun = edm) under an NFE/grid convention."""
    factories = {
        "ddim": DDIM,
        "edm": Heun,
        "dpm-solver-2": DPMSolver2,
        "dpm-solver++-2m": lambda: DPMSolverPPMultistep(2, convention=convention),
        "dpm-solver++-3m": lambda: DPMSolverPPMultistep(3, "public", convention),
        "dpm-solver++-3m-exact": lambda: DPMSolverPPMultistep(3, "exact", convention),
        "ipndm": IPNDM,
        "unipc": UniPC,
    }
    name = SOLVER_ALIASES.get(name, name)
    if name not in factories:
        raise ConfigError(f"unknown solver {name!r}; choose one of {', '.join(BASE_SOLVER_NAMES)}")
    if convention not in CONVENTIONS:
        raise ConfigError(f"sampler.convention={convention!r} is not valid; choose one of {', '.join(CONVENTIONS)}")
    solver = factories[name]()
    solver.convention = convention
    return solver


SOLVER_ALIASES = {"euler": "ddim", "heun": "edm"}
BASE_SOLVER_NAMES = ("ddim", "edm", "dpm-solver-2", "dpm-solver++-2m", "dpm-solver++-3m", "dpm-solver++-3m-exact",
                     "ipndm", "unipc")

__all__ = ["DenoiseFn", "GridPlan", "History", "Record", "Solver", "StepResult", "push", "make_solver",
           "BASE_SOLVER_NAMES", "SOLVER_ALIASES", "CONVENTIONS", "DEFAULT_CONVENTION"]
