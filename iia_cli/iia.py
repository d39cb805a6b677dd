"""IIA calibration (METHOD.md section 1): one greedy least-squares pass, and the coefficient files.

At step i the quantities q_k are computed from the current states z_i, the base solver is run over M
sub-steps of [sigma_i, sigma_{i+1}] from the same states (the fine reference), and the correction
coefficients solve ``min_c sum_b || sum_k c_k q_k^b - (x_fine^b - x_base^b) ||^2`` through the normal
equations ``G c = g`` accumulated in float64 over chunks of the batch. The coefficients are applied and
the pass goes on: B x (NFE + fine NFE) denoiser calls in all, never a re-simulation from noise.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from . import dist
from .atomic import write_text_atomic
from .errors import ConfigError, IIARuntimeError, MissingFileError
from .grids import subdivide
from .methods import Method
from .sampling import BoundDenoiser, Coefficients, apply_correction, noise_and_conditioning
from .solvers import History, push

FORMAT_VERSION = 2  # 2: dpm-solver++-3m is the published 3M; version 1 files had the exact-integral form


class IllConditionedWarning(UserWarning):
    pass


def accumulate_normal_equations(quantities: list[torch.Tensor], target: torch.Tensor,
                                G: torch.Tensor, g: torch.Tensor) -> None:
    """G += Q Q^T, g += Q r for one chunk, in float64. quantities: K tensors [b, ...]; target [b, ...]."""
    Q = torch.stack([q.reshape(-1) for q in quantities]).to(torch.float64)  # [K, b*d]
    G += (Q @ Q.T).cpu()
    g += (Q @ target.reshape(-1).to(torch.float64)).cpu()


def solve_least_squares(G: torch.Tensor, g: torch.Tensor, ridge: float = 1e-8, step: int | None = None,
                        warn: Any = None) -> torch.Tensor:
    """Solve (G + lambda I) c = g with lambda = ridge * trace(G) / K; warn when G is ill-conditioned."""
    K = G.shape[0]
    scale = float(torch.trace(G)) / K
    if not math.isfinite(scale):
        raise IIARuntimeError(f"IIA calibration: non-finite normal equations at step {step}")
    if scale == 0:
        return torch.zeros(K, dtype=torch.float64)
    A = G + ridge * scale * torch.eye(K, dtype=torch.float64)
    c = torch.linalg.solve(A, g)
    # Nearly collinear quantities (e.g. D_i - D_{i-1} and eps_i - eps_{i-1} at high sigma) make G singular to
    # working precision; the ridge then picks the smallest coefficients among equally good fits. Warn only
    # where that choice costs fit: the residual the ridge solution removes (2 c.g - c^T G c) falls short of the
    # best fit over G's numerically resolved eigen-directions.
    w, V = torch.linalg.eigh(G)
    keep = w > w.max() * K * torch.finfo(torch.float64).eps
    proj = V.T @ g
    best = float((proj[keep] ** 2 / w[keep]).sum())
    removed = float(2 * c @ g - c @ G @ c)
    if best > 0 and removed < (1 - 1e-3) * best:
        msg = (f"IIA step {step}: the correction directions are nearly collinear (condition number "
               f"{float(w.max() / w.min().clamp(min=1e-300)):.1e}) and the ridge {ridge:g} x trace(G)/K removes "
               f"{100 * (1 - removed / best):.1f}% less of the residual than the best fit; lower calibration.ridge "
               f"for a closer fit or raise it for smaller coefficients")
        if warn is None:
            warnings.warn(msg, IllConditionedWarning, stacklevel=2)
        else:
            warn(f"warning: {msg}")
    return c


def fine_reference(method: Method, denoise: BoundDenoiser, x: torch.Tensor, sigmas: torch.Tensor, i: int,
                   history: History, substeps: int, model: Any = None) -> torch.Tensor:
    """The same base solver over M sub-steps of [sigma_i, sigma_{i+1}], uniform in its time variable
    (the model's time for discrete-time models), from state x_i and the coarse history."""
    variable = "t" if getattr(model, "discrete_sigmas", None) is not None else method.solver.time_variable
    sub = subdivide(float(sigmas[i]), float(sigmas[i + 1]), substeps, variable, model)
    solver = method.solver.reference_solver()
    for j in range(substeps):
        res = solver.step(denoise, x, sub, j, history)
        history, x = push(history, res.record), res.x_next
    return x


@dataclass
class PassResult:
    coeffs: Coefficients
    residual_base: list[float]  # per step: mean over samples of ||x_base - x_fine||^2
    residual_iia: list[float]  # per step: mean over samples of ||x_iia - x_fine||^2
    calls: int  # denoiser calls per sample (coarse + fine)
    seconds: float


def greedy_pass(method: Method, model: Any, sigmas: torch.Tensor, seeds: list[int], substeps: int,
                chunk: int, device: torch.device, state_dtype: torch.dtype, coeffs: Coefficients | None = None,
                ridge: float = 1e-8, class_label: int | None = None, log: Any = None,
                warn: Any = None) -> PassResult:
    """One greedy pass over the noises of ``seeds``: fits coefficients step by step (``coeffs`` None) or
    applies given ones (validation), recording per-step residuals against the fine reference."""
    if not method.is_iia:
        raise ConfigError(f"method {method.name} has no IIA coefficients to calibrate")
    n = len(seeds)
    seeds = dist.split(seeds, by_shard=False)  # under torchrun: this rank's noises; G, g are all-reduced
    if not seeds:
        raise ConfigError(f"{n} calibration noises cannot be split over {dist.context().world} processes")
    t0 = time.perf_counter()
    n_steps = len(sigmas) - 1
    sig = sigmas.to(torch.float64)
    # All states stay in memory (B x d); model calls go chunk by chunk.
    chunks = [seeds[k : k + chunk] for k in range(0, len(seeds), chunk)]
    states, denoisers, histories = [], [], []
    for c in chunks:
        noise, labels = noise_and_conditioning(model, c, device, class_label)
        states.append(noise.to(state_dtype) * float(sig[0]))
        denoisers.append(BoundDenoiser(model, labels))
        histories.append(())
    fitted: Coefficients = []
    res_base, res_iia = [], []
    from .progress import ImageProgress

    bar = ImageProgress(n_steps, f"{'calibrating' if coeffs is None else 'validating'} {method.name} "
                        f"({n} noises)", unit="steps").__enter__()  # ends itself after the last step
    for i in range(n_steps):
        G = g = None
        stash = []
        for k in range(len(chunks)):
            x, den, hist = states[k], denoisers[k], histories[k]
            res = method.solver.step(den, x, sig, i, hist)
            q = method.quantities(x, res.record, hist, sig, i)
            target = None
            if q is not None:
                target = fine_reference(method, den, x, sig, i, hist, substeps, model) - res.x_next
                if coeffs is None:
                    if G is None:
                        G = torch.zeros(len(q), len(q), dtype=torch.float64)
                        g = torch.zeros(len(q), dtype=torch.float64)
                    accumulate_normal_equations(q, target, G, g)
            stash.append((res, q, target))
        corrected = stash[0][1] is not None
        if coeffs is None and corrected:
            G, g = dist.all_reduce_sum(G), dist.all_reduce_sum(g)
            c_i = solve_least_squares(G, g, ridge, step=i, warn=warn).tolist()
        elif coeffs is None:
            c_i = []
        else:
            c_i = list(coeffs[i])
        fitted.append(c_i)
        rb = ri = 0.0
        for k, (res, q, target) in enumerate(stash):
            states[k] = apply_correction(res.x_next, q, c_i) if corrected else res.x_next
            histories[k] = push(histories[k], res.record)
            if corrected:
                rb += float(target.to(torch.float64).flatten(1).pow(2).sum(1).sum())
                ri += float((states[k] - res.x_next - target).to(torch.float64).flatten(1).pow(2).sum(1).sum())
        rb, ri = dist.all_reduce_floats(rb, ri) if corrected else (rb, ri)
        res_base.append(rb / n if corrected else float("nan"))
        res_iia.append(ri / n if corrected else float("nan"))
        if log is not None and corrected:
            log(f"  step {i:2d}  sigma {float(sig[i]):9.4f} -> {float(sig[i + 1]):9.4f}  "
                f"c = [{', '.join(f'{v:+.4f}' for v in c_i)}]  residual base {res_base[-1]:.4g} -> iia {res_iia[-1]:.4g}")
        bar.advance(1)
    for s in states:
        if not bool(torch.isfinite(s).all()):
            raise IIARuntimeError(f"{method.name}: non-finite states during calibration (NaN/Inf)")
    calls = denoisers[0].calls
    return PassResult(fitted, res_base, res_iia, calls, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# Coefficient files
# ----------------------------------------------------------------------------------------------------


@dataclass
class CoefficientSet:
    """One human-readable JSON per (model, method, grid, NFE)."""

    method: str
    method_params: dict[str, Any]
    model_kind: str
    model_sha256: str
    grid_kind: str
    grid_params: dict[str, Any]
    sigmas: list[float]
    nfe: int
    substeps: int
    samples: int
    seeds: str
    ridge: float
    coefficients: Coefficients
    residual_base: list[float | None]
    residual_iia: list[float | None]
    val_seeds: str = ""
    convention: str = "iia"  # the NFE/grid convention (sampler.convention); also in method_params when not iia
    val_residual_base: list[float | None] = field(default_factory=list)
    val_residual_iia: list[float | None] = field(default_factory=list)
    paper_coefficients: Coefficients = field(default_factory=list)  # (b)iia-edm: the paper's b / g per step
    calibration_calls: int = 0
    calibration_seconds: float = 0.0
    tool_version: str = __version__
    format_version: int = FORMAT_VERSION
    created: str = ""

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        for key in ("residual_base", "residual_iia", "val_residual_base", "val_residual_iia"):
            data[key] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in data[key]]
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> CoefficientSet:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError("coefficient file", path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            _check_coefficient_fields(data)
            return cls(**data)
        except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            msg = " ".join(str(exc).split())[:200]
            raise IIARuntimeError(f"coefficient file {path} is not a valid iia_cli coefficient file ({msg})") from None

    def mismatches(self, method: str, method_params: dict[str, Any], model_sha256: str, grid_kind: str,
                   sigmas: torch.Tensor, nfe: int) -> list[str]:
        """What differs between this file and the run that wants to use it (empty = it fits)."""
        out = []
        if self.method != method:
            out.append(f"method {self.method} != {method}")
        elif method == "iia-dpm-solver++-3m" and self.format_version < 2:
            out.append("made for the former dpm-solver++-3m, now dpm-solver++-3m-exact (recalibrate)")
        if self.convention != method_params.get("convention", "iia"):
            out.append(f"convention {self.convention} != {method_params.get('convention', 'iia')}")
        elif self.method_params != method_params:
            out.append(f"method parameters {self.method_params} != {method_params}")
        if self.model_sha256 != model_sha256:
            out.append(f"model fingerprint {self.model_sha256[:12]} != {model_sha256[:12]} (another model)")
        if self.nfe != nfe:
            out.append(f"NFE {self.nfe} != {nfe}")
        if self.grid_kind != grid_kind:
            out.append(f"grid {self.grid_kind} != {grid_kind}")
        theirs = torch.tensor(self.sigmas, dtype=torch.float64)
        if theirs.shape != sigmas.shape or not torch.allclose(theirs, sigmas.to(torch.float64), rtol=1e-9, atol=0):
            out.append("grid sigmas differ")
        return out


def _check_coefficient_fields(data: dict[str, Any]) -> None:
    """Types of the fields a run reads from a coefficient file; raises TypeError/ValueError naming the first bad one."""
    def real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("method", "model_sha256", "grid_kind"):
        if key in data and not isinstance(data[key], str):
            raise TypeError(f"{key} must be a string")
    for key in ("method_params", "grid_params"):
        if key in data and not isinstance(data[key], dict):
            raise TypeError(f"{key} must be an object")
    for key in ("nfe", "substeps", "samples"):
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], int)):
            raise TypeError(f"{key} must be an integer")
    if "ridge" in data and not real(data["ridge"]):
        raise TypeError("ridge must be a finite number")
    sigmas, coeffs = data.get("sigmas"), data.get("coefficients")
    if not isinstance(sigmas, list) or len(sigmas) < 2 or not all(real(v) for v in sigmas):
        raise TypeError("sigmas must be a list of at least two finite numbers")
    if not isinstance(coeffs, list) or not all(isinstance(c, list) and all(real(v) for v in c) for c in coeffs):
        raise TypeError("coefficients must be a list (one per step) of lists of finite numbers")
    if len(coeffs) != len(sigmas) - 1:
        raise ValueError(f"{len(coeffs)} coefficient steps for {len(sigmas) - 1} grid steps")


def paper_coefficients(method: str, sigmas: torch.Tensor, coeffs: Coefficients) -> Coefficients:
    """The paper's parameterisation of IIA-EDM (eq. 18, b = Lemma 1's Heun coefficients + c on u_i, v_i) and
    of BIIA-EDM (Alg. 2, g = 1 + c on S_i); empty for the other methods, whose coefficients are the paper's."""
    if method not in ("iia-edm", "biia-edm"):
        return []
    out: Coefficients = []
    for i, c in enumerate(coeffs):
        b = list(c)
        if b:
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            if method == "iia-edm":
                b[0] += (s_next - s) / s
                b[1] += (s_next - s) / (2 * s_next)
            else:
                b[0] += 1.0
        out.append(b)
    return out


def coefficient_filename(model_kind: str, model_sha256: str, method: str, method_params: dict[str, Any],
                         grid_kind: str, nfe: int, substeps: int, sigmas: torch.Tensor | None = None) -> str:
    """``{model}-{sha8}_{method}[-r1]_{grid}-{gridsha6}_nfe{K}_M{M}.json``."""
    extra = "".join(f"-{k[0]}{v}" for k, v in sorted(method_params.items()))
    grid_tag = grid_kind
    if sigmas is not None:
        import hashlib

        grid_tag += "-" + hashlib.sha256(sigmas.to(torch.float64).numpy().tobytes()).hexdigest()[:6]
    return f"{model_kind}-{model_sha256[:8]}_{method}{extra}_{grid_tag}_nfe{nfe}_M{substeps}.json"
