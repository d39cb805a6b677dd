"""Sampling methods: a base solver, optionally with IIA basis quantities (Zhang, Niwa, Kleijn,
ICLR 2024: IIA-EDM/BIIA-EDM eq. (18) and Algorithms 1-2, IIA-DDIM eqs. (6) and (8), IIA-DPM-Solver eq. (23),
the PNDM family Appendix G).

An IIA step is ``x_{i+1} = base_update + sum_k c[i, k] q_k``: the coefficients are corrections on top
of the base solver, so zero coefficients reproduce it exactly. For IIA-EDM this is eq. (18) with
``b = b_Heun + c`` (Lemma 1: b^u_i0 = h_i / sigma_i, b^v_i0 = h_i / (2 sigma_{i+1})); the least-squares
fit of ``c`` against ``x_fine - base_update`` equals the paper's fit of ``b`` against ``x_fine - x_i``.
A step is left uncorrected (its basis is ``None``) when its quantities do not exist yet, and the final
denoise step to sigma = 0 is never corrected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .solvers import BASE_SOLVER_NAMES, DEFAULT_CONVENTION, SOLVER_ALIASES, History, Record, Solver
from .solvers import make_solver as _make_solver

# basis(x_i, record_i, history, sigmas, i) -> list of quantities [B, C, H, W], or None (uncorrected step)
BasisFn = Callable[[torch.Tensor, Record, History, torch.Tensor, int], "list[torch.Tensor] | None"]


@dataclass
class Method:
    name: str
    solver: Solver
    basis: BasisFn | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_iia(self) -> bool:
        return self.basis is not None

    @property
    def convention(self) -> str:
        """The NFE/grid convention (``sampler.convention``); in ``params`` when not the default."""
        return self.solver.convention

    def quantities(self, x: torch.Tensor, record: Record, history: History, sigmas: torch.Tensor,
                   i: int) -> list[torch.Tensor] | None:
        if self.basis is None or float(sigmas[i + 1]) == 0:
            return None
        return self.basis(x, record, history, sigmas, i)


def _iia_edm_basis(r: int) -> BasisFn:
    """Eq. (18): u and v of the current step and of the r previous steps (step 0 stays Heun if r >= 1)."""

    def basis(x, record, history, sigmas, i):
        if record["v"] is None or len(history) < min(r, 1):
            return None
        recs = [record] + list(reversed(history))[: min(r, len(history))]
        return [q for rec in recs for q in (rec["u"], rec["v"])]

    return basis


def _biia_edm_basis(r: int) -> BasisFn:
    """Algorithm 2: h_i times the averaged Heun slopes S_i, ..., S_{i-r}."""

    def basis(x, record, history, sigmas, i):
        if record["v"] is None or len(history) < min(r, 1):
            return None
        h = float(sigmas[i + 1] - sigmas[i])
        recs = [record] + list(reversed(history))[: min(r, len(history))]
        return [h * rec["slope"] for rec in recs]

    return basis


def _difference_basis(d_key: str, eps_key: str, quantities: int) -> BasisFn:
    """IIA-DDIM eq. (6) (and IIA-iPNDM on the combined estimates): D_i - D_{i-1}, eps_i - eps_{i-1}."""

    def basis(x, record, history, sigmas, i):
        if not history:
            return None
        prev = history[-1]
        q = [record[d_key] - prev[d_key], record[eps_key] - prev[eps_key]]
        return q[:quantities]

    return basis


def _guided_eps_basis(x, record, history, sigmas, i):
    """Guided IIA-DDIM (eq. 8): one coefficient per step on the classifier-free-guided eps."""
    return [record["eps"]]


def _dpm_basis(x, record, history, sigmas, i):
    """IIA-DPM-Solver eq. (23): the state x_i and the current denoised estimate D_i (for i >= 1).
    iia-unipc uses the same pair: the (UniC-corrected) state its step advances, and D at sigma_i."""
    if not history:
        return None
    return [x, record["denoised"]]


IIA_METHODS = ("iia-edm", "biia-edm", "iia-ddim", "iia-dpm-solver++-2m", "iia-dpm-solver++-3m",
               "iia-dpm-solver++-3m-exact", "iia-ipndm", "iia-unipc")
METHOD_NAMES = BASE_SOLVER_NAMES + IIA_METHODS
R_CHOICES = {"iia-edm": (0, 1, 2), "biia-edm": (0, 1)}
R_DEFAULT = {"iia-edm": 1, "biia-edm": 0}


def canonical_method(name: str) -> str:
    name = SOLVER_ALIASES.get(name, name)
    if name not in METHOD_NAMES:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)} "
                          f"(aliases: {', '.join(f'{a}={b}' for a, b in SOLVER_ALIASES.items())})")
    return name


def make_method(name: str, r: int | None = None, quantities: int = 2, guided: bool = False,
                convention: str = DEFAULT_CONVENTION) -> Method:
    """Build a method by its CLI/config name. ``r`` for (b)iia-edm, ``quantities`` (1 or 2) for
    iia-ddim / iia-ipndm (1 = the one-quantity ablation, eq. 25). ``guided``: the model applies
    classifier-free guidance, and iia-ddim takes its guided form (eq. 8). ``convention``: the NFE/grid
    convention of the base solver (``iia`` or ``diff-sampler``)."""
    method = _make_method(canonical_method(name), r, quantities, guided, convention)
    if convention != DEFAULT_CONVENTION:
        method.params["convention"] = convention
    return method


def _make_method(name: str, r: int | None, quantities: int, guided: bool, convention: str) -> Method:
    def make_solver(base: str) -> Solver:
        return _make_solver(base, convention)

    if name in BASE_SOLVER_NAMES:
        return Method(name, make_solver(name))
    if quantities not in (1, 2):
        raise ConfigError(f"sampler.quantities={quantities} is not valid; choose 1 or 2")
    if name in R_CHOICES:
        r = R_DEFAULT[name] if r is None else int(r)
        if r not in R_CHOICES[name]:
            raise ConfigError(f"sampler.r={r} is not valid for {name}; choose one of "
                              f"{', '.join(map(str, R_CHOICES[name]))}")
        make = _iia_edm_basis if name == "iia-edm" else _biia_edm_basis
        return Method(name, make_solver("edm"), make(r), {"r": r})
    if name == "iia-ddim" and guided:
        return Method(name, make_solver("ddim"), _guided_eps_basis, {"form": "guided"})
    if name == "iia-ddim":
        return Method(name, make_solver("ddim"), _difference_basis("denoised", "eps", quantities),
                      {"quantities": quantities})
    if name == "iia-ipndm":
        return Method(name, make_solver("ipndm"), _difference_basis("denoised_comb", "eps_comb", quantities),
                      {"quantities": quantities})
    return Method(name, make_solver(name.removeprefix("iia-")), _dpm_basis)
