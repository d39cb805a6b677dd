"""Sampling methods: a base solver, optionally with IIA basis quantities (Zhang, Niwa, Kleijn,
ICLR 2024: IIA-EDM/BIIA-EDM eq. (18) and Algorithms 1-2, IIA-DDIM eqs. (6) and (8), IIA-DPM-Solver eq. (23),
the PNDM family Appendix G).

An IIA step is ``x_{i+1} = base_update + sum_k c[i, k] q_k``: the coefficients are corrections on top
of the base solver, so zero coefficients reproduce it exactly. For IIA-EDM this is eq. (18) with
``b = b_Heun + c`` (Lemma 1: b^u_i0 = h_i / sigma_i, b^v_i0 = h_i / (2 sigma_{i+1})); the least-squares
fit of ``c`` against ``x_fine - base_update`` equals the paper's fit of ``b`` against ``x_fine - x_i``.
A step is left uncorrected (its basis is ``None``) when its quantities do not exist yet, and the final
denoise step to sigma = 0 is never corrected.

:data:`METHODS` is the registry: every base solver of ``solvers.SOLVERS`` under its own name, and the IIA
methods, each with its base solver, basis, parameters (choices, default) and a help line. The method names, the
CLI's method help and the error messages derive from it. A basis declares the record type it reads, so a
basis on a solver that does not return it fails when the method is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch

from iia_cli.runtime.errors import ConfigError

from .solvers.base import DEFAULT_CONVENTION, History, Solver, StepRecord
from .solvers.heun import HeunRecord
from .solvers.ipndm import IPNDMRecord
from .solvers.registry import SOLVERS, SOLVER_ALIASES, make_solver as _make_solver

# basis(x_i, record_i, history, sigmas, i) -> list of quantities [B, C, H, W], or None (uncorrected step)
BasisFn = Callable[[torch.Tensor, Any, History, torch.Tensor, int], "list[torch.Tensor] | None"]


@dataclass(frozen=True)
class Basis:
    """An IIA method's quantities of a step, and the record type they read (``needs``): the base solver's
    ``record_type`` must be that class or a subclass, which :class:`Method` checks when it is built."""

    needs: type[StepRecord]
    fn: BasisFn

    def __call__(self, x: torch.Tensor, record: StepRecord, history: History, sigmas: torch.Tensor,
                 i: int) -> list[torch.Tensor] | None:
        return self.fn(x, record, history, sigmas, i)


@dataclass
class Method:
    name: str
    solver: Solver
    basis: Basis | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.basis is not None and not issubclass(self.solver.record_type, self.basis.needs):
            have = {f.name for f in fields(self.solver.record_type)}
            missing = [f.name for f in fields(self.basis.needs) if f.name not in have]
            raise ConfigError(f"method {self.name}: its IIA quantities read {self.basis.needs.__name__} "
                              f"({', '.join(missing)}), but solver {self.solver.name} records "
                              f"{self.solver.record_type.__name__}; base it on a solver that records them")

    @property
    def is_iia(self) -> bool:
        return self.basis is not None

    @property
    def convention(self) -> str:
        """The NFE/grid convention (``sampler.convention``); in ``params`` when not the default."""
        return self.solver.convention

    def quantities(self, x: torch.Tensor, record: StepRecord, history: History, sigmas: torch.Tensor,
                   i: int) -> list[torch.Tensor] | None:
        if self.basis is None or float(sigmas[i + 1].detach()) == 0:
            return None
        return self.basis(x, record, history, sigmas, i)


def _iia_edm_basis(r: int) -> Basis:
    """Eq. (18): u and v of the current step and of the r previous steps (step 0 stays Heun if r >= 1)."""

    def basis(x: torch.Tensor, record: HeunRecord, history: History, sigmas: torch.Tensor, i: int):
        if record.v is None or len(history) < min(r, 1):
            return None
        recs: list[HeunRecord] = [record] + list(reversed(history))[: min(r, len(history))]
        return [q for rec in recs for q in (rec.u, rec.v)]

    return Basis(HeunRecord, basis)


def _biia_edm_basis(r: int) -> Basis:
    """Algorithm 2: h_i times the averaged Heun slopes S_i, ..., S_{i-r}."""

    def basis(x: torch.Tensor, record: HeunRecord, history: History, sigmas: torch.Tensor, i: int):
        if record.v is None or len(history) < min(r, 1):
            return None
        h = sigmas[i + 1] - sigmas[i] if sigmas.requires_grad else float(sigmas[i + 1] - sigmas[i])  # grad: ld3
        recs: list[HeunRecord] = [record] + list(reversed(history))[: min(r, len(history))]
        return [h * rec.slope for rec in recs]

    return Basis(HeunRecord, basis)


def _difference_basis(needs: type[StepRecord], d_field: str, eps_field: str, quantities: int) -> Basis:
    """IIA-DDIM eq. (6) (and IIA-iPNDM on the combined estimates): D_i - D_{i-1}, eps_i - eps_{i-1}, read from
    the fields ``d_field`` and ``eps_field`` of ``needs``."""
    missing = sorted({d_field, eps_field} - {f.name for f in fields(needs)})
    if missing:
        raise TypeError(f"{needs.__name__} has no field {', '.join(missing)}")

    def basis(x: torch.Tensor, record: StepRecord, history: History, sigmas: torch.Tensor, i: int):
        if not history:
            return None
        prev = history[-1]
        q = [getattr(record, d_field) - getattr(prev, d_field), getattr(record, eps_field) - getattr(prev, eps_field)]
        return q[:quantities]

    return Basis(needs, basis)


def _guided_eps_basis(x: torch.Tensor, record: StepRecord, history: History, sigmas: torch.Tensor, i: int):
    """Guided IIA-DDIM (eq. 8): one coefficient per step on the classifier-free-guided eps."""
    return [record.eps]


def _dpm_basis(x: torch.Tensor, record: StepRecord, history: History, sigmas: torch.Tensor, i: int):
    """IIA-DPM-Solver eq. (23): the state x_i and the current denoised estimate D_i (for i >= 1).
    iia-unipc uses the same pair: the (UniC-corrected) state its step advances, and D at sigma_i."""
    if not history:
        return None
    return [x, record.denoised]


@dataclass(frozen=True)
class Param:
    """A method parameter, set by ``sampler.<key>``: its valid values and its default. ``always_shown``: table
    labels name it even at its default (the paper writes "IIA-EDM r=1"); otherwise only when it differs."""

    choices: tuple[int, ...]
    default: int
    always_shown: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its base solver (a key of ``solvers.SOLVERS``), a one-line help, and for an IIA
    method the factory of its basis (called with the method's parameters as keywords), the parameters, and
    the basis it takes on a classifier-free-guided model (``guided``; None: the same as unguided).
    ``paper_offset(sigma_i, sigma_next)``: where the paper writes the coefficients as the base solver's own plus
    the correction, the base's values of the first ones (added for ``paper_coefficients`` in coefficient files)."""

    base: str
    help: str
    basis: Callable[..., Basis] | None = None
    params: Mapping[str, Param] = field(default_factory=dict)
    guided: Basis | None = None
    paper_offset: Callable[[float, float], list[float]] | None = None

    @property
    def is_iia(self) -> bool:
        return self.basis is not None


def _heun_uv_coefficients(s: float, s_next: float) -> list[float]:
    """Lemma 1: Heun's own coefficients on u_i and v_i, b^u = h / sigma_i and b^v = h / (2 sigma_{i+1})."""
    return [(s_next - s) / s, (s_next - s) / (2 * s_next)]


_QUANTITIES = Param((1, 2), 2)  # 2: both differences; 1: the one-quantity ablation (eq. 25)


def _dpm_method(base: str) -> MethodSpec:
    return MethodSpec(base, "IIA-DPM-Solver, eq. (23)", lambda: Basis(StepRecord, _dpm_basis))


# The IIA methods (the base solvers join them below, from solvers.SOLVERS). A new IIA method: its basis above
# and one entry here.
_IIA_METHODS: dict[str, MethodSpec] = {
    "iia-edm": MethodSpec("edm", "IIA-EDM, eq. (18)", _iia_edm_basis, {"r": Param((0, 1, 2), 1, True)},
                          paper_offset=_heun_uv_coefficients),
    "biia-edm": MethodSpec("edm", "BIIA-EDM, Algorithm 2", _biia_edm_basis, {"r": Param((0, 1), 0, True)},
                           paper_offset=lambda s, s_next: [1.0]),  # g = 1 + c on the averaged slope S_i
    "iia-ddim": MethodSpec("ddim", "IIA-DDIM, eq. (6), eq. (8) if guided",
                           lambda quantities: _difference_basis(StepRecord, "denoised", "eps", quantities),
                           {"quantities": _QUANTITIES}, guided=Basis(StepRecord, _guided_eps_basis)),
    "iia-dpm-solver++-2m": _dpm_method("dpm-solver++-2m"),
    "iia-dpm-solver++-3m": _dpm_method("dpm-solver++-3m"),
    "iia-dpm-solver++-3m-exact": _dpm_method("dpm-solver++-3m-exact"),
    "iia-ipndm": MethodSpec("ipndm", "IIA-iPNDM, Appendix G",
                            lambda quantities: _difference_basis(IPNDMRecord, "denoised_comb", "eps_comb", quantities),
                            {"quantities": _QUANTITIES}),
    "iia-unipc": MethodSpec("unipc", "eq. (23)'s x_i, D_i", lambda: Basis(StepRecord, _dpm_basis)),
}
METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {name: MethodSpec(name, spec.help) for name, spec in SOLVERS.items()} | _IIA_METHODS)
METHOD_NAMES = tuple(METHODS)
IIA_METHODS = tuple(name for name, spec in METHODS.items() if spec.is_iia)
PARAM_KEYS = tuple(sorted({key for spec in METHODS.values() for key in spec.params}))  # sampler.<key> of methods


def shown_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The method parameters of ``params`` that a table label names: every ``always_shown`` one, the others when
    they differ from their default (:class:`Param`); other entries (convention, ...) are not method parameters."""
    out = {}
    for key, value in params.items():
        specs = [spec.params[key] for spec in METHODS.values() if key in spec.params]
        if specs and (any(p.always_shown for p in specs) or all(value != p.default for p in specs)):
            out[key] = value
    return out


R_CHOICES = {name: spec.params["r"].choices for name, spec in METHODS.items() if "r" in spec.params}
ALIASES_TEXT = ", ".join(f"{a}={b}" for a, b in SOLVER_ALIASES.items())


def param_choices(key: str) -> tuple[int, ...]:
    """Every value some method accepts for ``sampler.<key>`` (e.g. for a config schema)."""
    return tuple(sorted({c for spec in METHODS.values() if key in spec.params for c in spec.params[key].choices}))


def methods_help() -> str:
    """One line per method: its name, the base solver of an IIA method, its help, its parameters."""
    lines = []
    for name, spec in METHODS.items():
        params = "".join(f"; sampler.{k}: {'|'.join(map(str, p.choices))} (default {p.default})"
                         for k, p in spec.params.items())
        lines.append(f"{name:<26}{f'on {spec.base}: ' if spec.is_iia else ''}{spec.help}{params}")
    return "\n".join(lines)


def canonical_method(name: str) -> str:
    """A method name or alias -> its canonical name; an unknown name is an error that suggests the closest ones."""
    name = SOLVER_ALIASES.get(name, name)
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(name), [*METHOD_NAMES, *SOLVER_ALIASES], n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        if "," in str(name):
            hint += "one method here (several go in evaluate.methods or --methods, as a,b or [a, b]); "
        raise ConfigError(f"unknown method {name!r}; {hint}choose one of {', '.join(METHOD_NAMES)} "
                          f"(aliases: {ALIASES_TEXT})")
    return name


def make_method(name: str, guided: bool = False, convention: str = DEFAULT_CONVENTION, thresholding: str = "none",
                afs: bool = False, **method_params: Any) -> Method:
    """Build a method by its CLI/config name from :data:`METHODS`. ``method_params``: values of the registered
    method parameters (:data:`PARAM_KEYS`, e.g. ``r`` of (b)iia-edm, ``quantities`` of iia-ddim / iia-ipndm; None
    or absent: the method's default); a method ignores the parameters it does not take. ``guided``: the model applies classifier-free guidance, and iia-ddim takes its guided form
    (eq. 8). ``convention``: the NFE/grid convention of the base solver (``iia`` or ``diff-sampler``).
    ``thresholding`` (``none`` | ``dynamic``) and ``afs``: diff-sampler's dynamic thresholding of D and analytical
    first step (:class:`~iia_cli.core.solvers.base.Solver`). Like the convention, each enters ``params`` (so row
    identities and coefficient files) only when not the default.
    Raises ConfigError for an invalid parameter, or a basis whose record its solver does not provide."""
    name = canonical_method(name)
    spec = METHODS[name]
    unknown = sorted(set(method_params) - set(PARAM_KEYS))
    if unknown:
        raise ConfigError(f"unknown method parameter(s) {', '.join(unknown)}; the registered ones are "
                          f"{', '.join(PARAM_KEYS)}")
    given = method_params
    params: dict[str, Any] = {}
    for key, param in spec.params.items():
        value = param.default if given.get(key) is None else given[key]
        if value not in param.choices:
            raise ConfigError(f"sampler.{key}={value} is not valid for {name}; choose one of "
                              f"{', '.join(map(str, param.choices))}")
        params[key] = int(value)
    solver = _make_solver(spec.base, convention, thresholding, afs)
    if spec.basis is None:
        method = Method(name, solver)
    elif guided and spec.guided is not None:
        method = Method(name, solver, spec.guided, {"form": "guided"})
    else:
        method = Method(name, solver, spec.basis(**params), params)
    if convention != DEFAULT_CONVENTION:
        method.params["convention"] = convention
    if thresholding != "none":
        method.params["thresholding"] = thresholding
    if afs:
        method.params["afs"] = True
    return method
