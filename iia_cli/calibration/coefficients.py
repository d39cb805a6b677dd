"""IIA coefficient files: one human-readable JSON per (model, method, grid, NFE), its format, identity and name."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from iia_cli import __version__
from iia_cli.core.methods import METHODS
from iia_cli.core.sampling import Coefficients
from iia_cli.io.atomic import write_text_atomic
from iia_cli.runtime.errors import IIARuntimeError, MissingFileError

from .teacher import Teacher

FORMAT_VERSION = 3  # 2: dpm-solver++-3m is the published 3M (version 1 had the exact-integral form);
                    # 3: target, teacher, guard and end-to-end validation


def worse_warning(method: str, nfe: int, validation: dict[str, Any]) -> str | None:
    """The plain warning when IIA's final samples are worse than the base solver's on the held-out noises."""
    if not validation or not validation.get("iia_worse"):
        return None
    vb, vi = validation["rmse_base"], validation["rmse_iia"]
    ratio = f" (x{vi / vb:.2f})" if vb else ""
    return (f"warning: {method} at NFE {nfe} is WORSE than its base solver on {validation.get('noises', '?')} held-out "
            f"noises: final-sample RMSE vs the teacher {vi:.4g} against {vb:.4g}{ratio}; use the base "
            f"solver, or recalibrate with calibration.guard=true / calibration.target=trajectory")


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
    target: str = "local"  # local (the paper's fine reference) | trajectory (the teacher's trajectory)
    teacher: str = ""  # the teacher's tag (e.g. edm10: Heun, 10 sub-steps per interval; exact); "" = none ran
    guard: bool = False
    guard_alpha: float = 1.0  # coefficients = guard_alpha x fitted_coefficients
    guard_errors: dict[str, float] = field(default_factory=dict)  # alpha -> final RMSE on the calibration noises
    fitted_coefficients: Coefficients = field(default_factory=list)  # the least-squares fit before the guard
    validation: dict[str, Any] = field(default_factory=dict)  # end-to-end: final-sample RMSE vs the teacher
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

    @property
    def warning(self) -> str | None:
        """The plain warning when the held-out validation found IIA worse than its base solver."""
        return worse_warning(self.method, self.nfe, self.validation)

    def mismatches(self, method: str, method_params: dict[str, Any], model_sha256: str, grid_kind: str,
                   sigmas: torch.Tensor, nfe: int, calibration: Any = None) -> list[str]:
        """What differs between this file and the run that wants to use it (empty = it fits). With the run's
        ``calibration`` config, also the calibration target, the guard and the teacher they used."""
        out = []
        if calibration is not None:
            want = coefficient_identity(calibration.target, calibration.guard,
                                        Teacher(calibration.teacher, calibration.teacher_substeps).tag)
            have = coefficient_identity(self.target, self.guard, self.teacher)
            for key in want:
                if want[key] != have[key]:
                    out.append(f"calibration.{key} {have[key] or 'none'} != {want[key] or 'none'}")
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
    """The paper's parameterisation where it differs from ours (the method's ``paper_offset`` in the registry):
    IIA-EDM's b = Lemma 1's Heun coefficients + c on u_i, v_i (eq. 18) and BIIA-EDM's g = 1 + c on S_i (Alg. 2);
    empty for the other methods, whose coefficients are the paper's."""
    offset = METHODS[method].paper_offset
    if offset is None:
        return []
    out: Coefficients = []
    for i, c in enumerate(coeffs):
        b = list(c)
        if b:
            for k, base in enumerate(offset(float(sigmas[i]), float(sigmas[i + 1]))):
                b[k] += base
        out.append(b)
    return out


def coefficient_identity(target: str, guard: bool, teacher_tag: str) -> dict[str, Any]:
    """What of the calibration settings (besides M) changes the coefficients: the target, the guard, and the
    teacher when the target or the guard uses it."""
    return {"target": target, "guard": "on" if guard else "off",
            "teacher": teacher_tag if (target == "trajectory" or guard) else ""}


def calibration_tag(target: str, substeps: int, guard: bool, teacher_tag: str) -> str:
    """The file-name part for the calibration settings: ``M10``, ``traj-edm20``, ``M10_guard-edm20``,
    ``traj-edm20_guard``."""
    tag = f"M{substeps}" if target == "local" else f"traj-{teacher_tag}"
    if guard:
        tag += "_guard" if target == "trajectory" else f"_guard-{teacher_tag}"
    return tag


def coefficient_filename(model_kind: str, model_sha256: str, method: str, method_params: dict[str, Any],
                         grid_kind: str, nfe: int, substeps: int, sigmas: torch.Tensor | None = None,
                         tag: str | None = None) -> str:
    """``{model}-{sha8}_{method}[-r1]_{grid}-{gridsha6}_nfe{K}_{tag}.json``, tag from :func:`calibration_tag`
    (default ``M{M}``)."""
    extra = "".join(f"-{k[0]}{v}" for k, v in sorted(method_params.items()))
    grid_tag = grid_kind
    if sigmas is not None:
        import hashlib

        grid_tag += "-" + hashlib.sha256(sigmas.to(torch.float64).numpy().tobytes()).hexdigest()[:6]
    return f"{model_kind}-{model_sha256[:8]}_{method}{extra}_{grid_tag}_nfe{nfe}_{tag or f'M{substeps}'}.json"
