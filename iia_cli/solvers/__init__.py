"""Base ODE solvers, one file per family, and the registry whose keys drive the CLI choices."""

from __future__ import annotations

from ..errors import ConfigError
from .base import DenoiseFn, GridPlan, History, Record, Solver, StepResult, push
from .dpm import DPMSolver2, DPMSolverPPMultistep
from .euler import DDIM
from .heun import Heun
from .ipndm import IPNDM



def make_solver(name: str) -> Solver:
    """A fresh base solver by name (aliases: euler = ddim, heun = edm)."""
    factories = {
        "ddim": DDIM,
        "edm": Heun,
        "dpm-solver-2": DPMSolver2,
        "dpm-solver++-2m": lambda: DPMSolverPPMultistep(2),
        "dpm-solver++-3m": lambda: DPMSolverPPMultistep(3),
        "ipndm": IPNDM,
    }
    name = SOLVER_ALIASES.get(name, name)
    if name not in factories:
        raise ConfigError(f"unknown solver {name!r}; choose one of {', '.join(BASE_SOLVER_NAMES)}")
    return factories[name]()


SOLVER_ALIASES = {"euler": "ddim", "heun": "edm"}
BASE_SOLVER_NAMES = ("ddim", "edm", "dpm-solver-2", "dpm-solver++-2m", "dpm-solver++-3m", "ipndm")

__all__ = ["DenoiseFn", "GridPlan", "History", "Record", "Solver", "StepResult", "push", "make_solver",
           "BASE_SOLVER_NAMES", "SOLVER_ALIASES"]
