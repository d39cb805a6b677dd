"""Library entry points behind the CLI: ``sample``, ``calibrate`` (and ``evaluate`` in experiments/evaluate.py).

Usable from a notebook: ``from iia_cli.api import load_config, sample, calibrate``. These functions raise
typed errors (``iia_cli.runtime.errors``) and never exit.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration.coefficients import CoefficientSet, calibration_tag, coefficient_filename, paper_coefficients
from .calibration.iia import CalibrationSetup, calibrate_coefficients
from .calibration.teacher import Teacher, TeacherCache
# load_config: not used here, imported for the notebook API (``from iia_cli.api import load_config``)
from .config.experiment import ExperimentConfig, GridConfig, check_nfe, load_config  # noqa: F401
from .core.gridfile import check_grid_file, load_grid_file
from .core.grids import list_grid, make_grid
from .core.methods import IIA_METHODS, PARAM_KEYS, Method, make_method
from .core.sampling import (Coefficients, corrected_steps, format_seeds, parse_seeds, resolve_device,
                            resolve_state_dtype, sample_batches, to_images, uncorrected_text)
from .io import layout
from .io.atomic import atomic_write, savez_atomic
from .io.images import quantize, save_grid_png, save_png
from .io.layout import where
from .models.base import Denoiser, capabilities, label_dim
from .models.registry import load_model, model_fingerprint
from .models.speed import auto_batch, optimize
from .runtime import dist, envvars
from .runtime.errors import ConfigError, IIARuntimeError, MissingFileError
from .runtime.progress import ImageProgress, log as default_log

LogFn = Callable[[str], None]


class ModelMemo:
    """What a process keeps between runs on one model: the automatic batch size (per device) and the IIA teacher's
    trajectories (:class:`~iia_cli.calibration.teacher.TeacherCache`). Keyed by the model's fingerprint, never by the Python
    object (``id()`` is reused after garbage collection) and never stored on the user's model object.

    :func:`prepare` uses :data:`MEMO`, the process's one, so that ``iia evaluate``'s methods on one grid share
    the teacher; pass ``memo=ModelMemo()`` to keep a run apart."""

    def __init__(self, teachers: int = 4) -> None:
        self.teachers = TeacherCache(teachers)
        self._batch: dict[tuple[str, str], int] = {}

    def auto_batch(self, fingerprint: str, model: Denoiser, device: torch.device) -> int:
        """``sampler.batch: auto``, probed once per model and device."""
        key = (fingerprint, str(device))
        if key not in self._batch:
            self._batch[key] = int(auto_batch(model, device))
        return self._batch[key]

    def clear(self) -> None:
        self.teachers.clear()
        self._batch.clear()


MEMO = ModelMemo()


@dataclass
class Prepared:
    """Everything a run needs, resolved from a config: model, method, grid, device."""

    cfg: ExperimentConfig
    model: Denoiser
    method: Method
    sigmas: torch.Tensor
    nfe: int
    device: torch.device
    state_dtype: torch.dtype
    fingerprint: str
    batch: int = 64
    note: str = ""
    memo: ModelMemo = field(default_factory=lambda: MEMO)


def build_grid(cfg: ExperimentConfig, method: Method, model: Denoiser, nfe: int, fingerprint: str | None = None,
               grid: GridConfig | None = None) -> tuple[torch.Tensor, int]:
    """The sigma grid for ``nfe`` denoiser calls, or an explicit list grid and the NFE it implies, or a grid file's
    sigmas (checked against the model ``fingerprint``, the method's solver and convention, and ``nfe``).
    ``grid``: the grid section to use instead of ``cfg.grid``."""
    g = cfg.grid if grid is None else grid
    if g.kind == "list":
        sigmas = list_grid(g.sigmas or [])
        return sigmas, method.solver.nfe_of_grid(sigmas)
    if g.kind == "file":
        if fingerprint is None:
            raise IIARuntimeError("internal: a grid file is checked against the model's fingerprint; pass it")
        grid_file = load_grid_file(g.path or "")
        check_grid_file(grid_file, fingerprint, method.solver.name, method.convention, nfe)
        sigmas = grid_file.tensor()
        if method.solver.nfe_of_grid(sigmas) != nfe:
            raise ConfigError(f"grid file {grid_file.path}: its {len(sigmas)} sigmas make "
                              f"{method.solver.nfe_of_grid(sigmas)} denoiser calls with {method.solver.name}, "
                              f"not the NFE {nfe} it records")
        return sigmas, nfe
    plan = method.solver.plan(nfe)
    sigmas = make_grid(g, plan, model)
    return sigmas, method.solver.nfe_of_grid(sigmas)


def prepare(cfg: ExperimentConfig, method: str | None = None, nfe: int | None = None, model: Denoiser | None = None,
            fingerprint: str | None = None, memo: ModelMemo | None = None, grid: GridConfig | None = None) -> Prepared:
    """Load the model (unless given) and build the method and grid of ``cfg`` (or the overrides). ``memo``: where
    the automatic batch size and the teacher's trajectories are kept (default :data:`MEMO`). ``grid``: a grid
    section that replaces ``cfg.grid`` for this run only (``iia evaluate``'s reference solve asks for its own fine
    grid this way; ``Prepared.cfg`` stays ``cfg``)."""
    memo = MEMO if memo is None else memo
    s = cfg.sampler
    device = resolve_device(s.device)
    state_dtype = resolve_state_dtype(s.state_dtype, device)
    if model is None:
        model = optimize(load_model(cfg.model.kind, cfg.model.params, device), s.compile, s.channels_last)
    meth = make_method(method or s.method, **{k: getattr(s, k) for k in PARAM_KEYS},
                       guided=capabilities(model).guided, convention=s.convention,
                       thresholding=s.thresholding, afs=s.afs)
    cl = s.class_label
    if cl is not None:
        n_labels = label_dim(model)
        if n_labels == 0:
            raise ConfigError(f"--class / sampler.class_label={cl} given but the model is unconditional (label_dim 0)")
        if not 0 <= cl < n_labels:
            raise ConfigError(f"class label {cl} is out of range; choose 0..{n_labels - 1}")
    if fingerprint is None:
        fingerprint = model_fingerprint(model, cfg.model.kind, cfg.model.params)
    sigmas, real_nfe = build_grid(cfg, meth, model, check_nfe(s.nfe if nfe is None else nfe, "nfe"), fingerprint, grid)
    batch = s.batch if isinstance(s.batch, int) else memo.auto_batch(fingerprint, model, device)
    notes = [meth.solver.grid_note(sigmas)] + (["dynamic thresholding of D"] if s.thresholding != "none" else []) \
        + (["AFS: the first step's D is analytical, no model call"] if s.afs else [])
    return Prepared(cfg, model, meth, sigmas, real_nfe, device, state_dtype, fingerprint, batch,
                    "; ".join(n for n in notes if n), memo)


def grid_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The grid settings recorded in coefficient files and result-row identities (besides the exact sigmas)."""
    g = cfg.grid
    if g.kind == "karras":
        return {"rho": g.rho, "sigma_min": g.sigma_min, "sigma_max": g.sigma_max}
    if g.kind in ("logsnr", "time-uniform"):
        return {"sigma_min": g.sigma_min, "sigma_max": g.sigma_max}
    if g.kind == "discrete":
        return {"spacing": g.spacing}
    if g.kind == "file":  # the grid's content hash (not its path: a moved file keeps its rows)
        return {"sha256": load_grid_file(g.path or "").sha256}
    return {}


def default_coefficient_path(p: Prepared) -> Path:
    c = p.cfg.calibration
    tag = calibration_tag(c.target, c.substeps, c.guard, Teacher(c.teacher, c.teacher_substeps).tag)
    name = coefficient_filename(p.cfg.model.kind, p.fingerprint, p.method.name, p.method.params, p.cfg.grid.kind,
                                p.nfe, c.substeps, p.sigmas, tag=tag)
    return Path(c.out_dir) / name


def calibrate(cfg: ExperimentConfig, method: str | None = None, nfe: int | None = None, out: str | Path | None = None,
              prepared: Prepared | None = None, log: LogFn = default_log, verbose: bool = True) -> tuple[CoefficientSet, Path]:
    """Fit IIA coefficients by one greedy pass of per-step least squares (the paper's eqs. 14 and 19) against the
    configured target (the paper's local fine reference or the teacher's trajectory), shrink them by the guard,
    validate end to end on held-out noises and write the coefficient file. Returns the set and its path."""
    p = prepared or prepare(cfg, method, nfe)
    if not p.method.is_iia:
        raise ConfigError(f"method {p.method.name} is a base solver; calibrate an IIA method "
                          f"({', '.join(IIA_METHODS)})")
    skipped = corrected_steps(p.method, p.sigmas)
    n_steps = len(p.sigmas) - 1
    if len(skipped) == n_steps:
        raise ConfigError(f"{p.method.name} at NFE {p.nfe} has nothing to calibrate: its {n_steps} step(s) stay "
                          f"uncorrected ({uncorrected_text(skipped)}); {_fittable_hint(cfg, p)}")
    c = cfg.calibration
    seeds = list(range(c.seed_start, c.seed_start + c.samples))
    val_seeds = list(range(c.val_seed_start, c.val_seed_start + c.val_samples)) if c.val_samples > 0 else []
    chunk = int(p.batch if c.batch is None else c.batch)
    teacher = Teacher(c.teacher, c.teacher_substeps)
    log(f"calibrating {p.method.name} {p.method.params or ''} at NFE {p.nfe} on {cfg.model.kind}: "
        f"B={c.samples} noises, target {c.target} ("
        + (f"M={c.substeps} sub-steps" if c.target == "local" else f"teacher {teacher.tag}")
        + f"), guard {'on' if c.guard else 'off'}, grid {cfg.grid.kind} ({len(p.sigmas)} sigmas)"
        + (f"; {p.note}" if p.note else ""))
    if skipped:
        log(f"fitting {n_steps - len(skipped)} of {n_steps} steps; uncorrected (the base step): "
            f"{uncorrected_text(skipped)}")
    setup = CalibrationSetup(p.method, p.model, p.sigmas, c.substeps, chunk, p.device, p.state_dtype, ridge=c.ridge,
                             class_label=cfg.sampler.class_label, target=c.target, teacher=teacher,
                             teachers=p.memo.teachers, fingerprint=p.fingerprint, log=log, warn=log)
    res = calibrate_coefficients(setup, seeds, val_seeds, guard=c.guard, verbose=verbose,
                                 checkpoint_dir=layout.partial_dir(), checkpoint_every=checkpoint_interval())
    fit, val = res.fit, res.val
    if not val_seeds:
        log("no held-out check (calibration.val_samples = 0; iia evaluate's integration_rmse compares IIA with its "
            "base on held-out seeds)")
    if val is not None:
        tb, ti = _nansum(val.residual_base), _nansum(val.residual_iia)
        log(f"held-out per-step residual (sum over steps of mean ||x - x_target||^2, {len(val_seeds)} noises): "
            f"base {tb:.4g} -> iia {ti:.4g} (x{ti / tb if tb else float('nan'):.3f}); "
            f"calibration set: base {_nansum(fit.residual_base):.4g} -> iia {_nansum(fit.residual_iia):.4g}")
    teacher_used = c.target == "trajectory" or c.guard or bool(val_seeds)
    cs = CoefficientSet(
        method=p.method.name, method_params=dict(p.method.params), model_kind=cfg.model.kind,
        model_sha256=p.fingerprint, grid_kind=cfg.grid.kind, grid_params=grid_params(cfg),
        convention=p.method.convention,
        sigmas=[float(v) for v in p.sigmas], nfe=p.nfe, substeps=c.substeps, samples=c.samples,
        seeds=format_seeds(seeds), ridge=c.ridge, coefficients=res.coeffs,
        paper_coefficients=paper_coefficients(p.method.name, p.sigmas, res.coeffs),
        residual_base=fit.residual_base, residual_iia=fit.residual_iia,
        val_seeds=format_seeds(val_seeds) if val_seeds else "",
        val_residual_base=val.residual_base if val else [], val_residual_iia=val.residual_iia if val else [],
        calibration_calls=res.calls, calibration_seconds=round(res.seconds, 3),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        target=c.target, teacher=teacher.tag if teacher_used else "", guard=c.guard, guard_alpha=res.alpha,
        guard_errors={f"{a:g}": e for a, e in res.guard_errors.items()}, fitted_coefficients=fit.coeffs,
        validation=res.validation,
    )
    if cs.warning:
        log(cs.warning)
    path = Path(out) if out else default_coefficient_path(p)
    if dist.context().is_main:
        cs.save(path)
    dist.barrier()
    if res.checkpoint is not None:
        res.checkpoint.remove()  # the coefficient file holds it all now
    log(f"wrote {path}")
    return cs, path


def _fittable_hint(cfg: ExperimentConfig, p: Prepared) -> str:
    """How to get a grid with a step to correct: the smallest larger NFE that has one."""
    if cfg.grid.kind == "list":
        return "give grid.sigmas more steps"
    for nfe in range(p.nfe + 1, p.nfe + 16):
        sigmas, real = build_grid(cfg, p.method, p.model, nfe)
        if len(corrected_steps(p.method, sigmas)) < len(sigmas) - 1:
            return f"use --nfe {real} or more"
    return "use a larger --nfe"


def _nansum(values: list[float | None]) -> float:
    return float(sum(v for v in values if v is not None and v == v))


class MissingCoefficientsError(IIARuntimeError):
    """No coefficient file for an IIA run; the CLI replaces ``command`` by the one the user typed."""

    def __init__(self, method: str, nfe: int, path: Path, command: str, why: str = "") -> None:
        self.method, self.nfe, self.path, self.why = method, nfe, path, why or f"looked for {path}"
        super().__init__(self.with_command(command))

    def with_command(self, command: str) -> str:
        return (f"no coefficients for {self.method} at NFE {self.nfe} on this model and grid "
                f"({self.why}); create them with `{command}` or add --calibrate")


@dataclass
class ResolvedCoefficients:
    """The IIA coefficients a run uses: their values, the file, its parsed content and its sha256."""

    values: Coefficients
    path: Path
    cs: CoefficientSet
    sha256: str


# Calibration settings that do not change the coefficients (where they go, how the work is chunked, the
# held-out validation) and the ones a coefficient file records under another name.
# target, teacher and guard are compared by ``CoefficientSet.mismatches`` (the file stores the teacher's tag).
_CALIBRATION_NOT_IN_COEFFICIENTS = ("out_dir", "batch", "val_samples", "val_seed_start", "target", "teacher",
                                    "teacher_substeps", "guard")


def calibration_mismatches(cs: CoefficientSet, cfg: ExperimentConfig) -> list[str]:
    """How the calibration settings recorded in a coefficient file differ from ``cfg.calibration``: B, M,
    ridge, seeds, and every other calibration setting that the file records under the same name."""
    c = cfg.calibration
    want = {"samples": c.samples, "substeps": c.substeps, "ridge": c.ridge,
            "seeds": format_seeds(range(c.seed_start, c.seed_start + c.samples))}
    for name in type(c).model_fields:
        if name not in _CALIBRATION_NOT_IN_COEFFICIENTS and name not in want and name != "seed_start" \
                and hasattr(cs, name):
            want[name] = getattr(c, name)
    return [f"calibration.{k} {getattr(cs, k)!r} in the file, {v!r} in the config"
            for k, v in want.items() if getattr(cs, k, None) != v]


def find_coefficients(p: Prepared, coeffs_path: str | Path | None = None,
                      match_calibration: bool = False) -> tuple[ResolvedCoefficients | None, str]:
    """The coefficient file of an IIA run (explicit path or the default name), if it exists and fits the run
    (and, with ``match_calibration``, was calibrated with the config's calibration settings).
    Returns (coefficients or None, why not)."""
    path = Path(coeffs_path) if coeffs_path else default_coefficient_path(p)
    if not path.is_file():
        if coeffs_path:
            raise MissingFileError("coefficient file", path)
        return None, f"no coefficient file {where(path)}"
    cs = CoefficientSet.load(path)
    diff = cs.mismatches(p.method.name, dict(p.method.params), p.fingerprint, p.cfg.grid.kind, p.sigmas, p.nfe,
                         calibration=p.cfg.calibration)
    if diff and coeffs_path:
        raise ConfigError(f"coefficient file {path} does not fit this run: {'; '.join(diff)}")
    if not diff and match_calibration:
        diff = calibration_mismatches(cs, p.cfg)
    if diff:
        return None, f"{path} does not fit this run ({'; '.join(diff)})"
    return ResolvedCoefficients(cs.coefficients, path, cs, coefficient_digest(cs)), ""


def coefficient_digest(cs: CoefficientSet) -> str:
    """sha256 of a coefficient file's content without its creation time, timing and tool version: the same
    for two calibrations that fit the same coefficients (e.g. SLURM array tasks calibrating independently)."""
    import hashlib
    import json

    data = {k: v for k, v in dataclasses.asdict(cs).items() if k not in ("created", "calibration_seconds", "tool_version")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def resolve_coefficients(p: Prepared, coeffs_path: str | Path | None = None, calibrate_missing: bool = False,
                         log: LogFn = default_log, match_calibration: bool = False) -> ResolvedCoefficients | None:
    """The coefficients of an IIA run (None for a base solver): an explicit file, else the default file when
    it fits, else (``calibrate_missing``) a fresh calibration written to the default file."""
    if not p.method.is_iia:
        if coeffs_path:
            raise ConfigError(f"--coeffs given but method {p.method.name} is a base solver without coefficients")
        return None
    found, why = find_coefficients(p, coeffs_path, match_calibration)
    if found is not None:
        if found.cs.warning:
            log(found.cs.warning)
        return found
    if not calibrate_missing:
        cmd = f"iia calibrate{' --config ' + p.cfg.source if p.cfg.source else ''} --method {p.method.name} --nfe {p.nfe}"
        raise MissingCoefficientsError(p.method.name, p.nfe, default_coefficient_path(p) if not coeffs_path
                                       else Path(coeffs_path), cmd, why)
    log(f"{p.method.name} nfe={p.nfe}: calibrating ({why})")
    _, path = calibrate(p.cfg, prepared=p, log=log, verbose=False)
    found, why = find_coefficients(p, path, match_calibration)
    if found is None:
        raise IIARuntimeError(f"internal: fresh coefficients {path} do not fit the run ({why})")
    return found


@dataclass
class SampleResult:
    seeds: list[int]
    nfe: int
    method: str
    seconds: float
    out: Path | None = None
    coeffs_path: Path | None = None
    images: np.ndarray | None = None  # uint8 [N, H, W, C] when kept in memory
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # e.g. "= edm (guard)": an IIA method whose guard turned every correction off


def base_note(method: Method, cs: CoefficientSet) -> str:
    """``= <base> (guard)`` when the guard of a coefficient file chose alpha = 0 (every correction off, so the IIA
    method samples exactly its base solver), else ""."""
    if cs.guard and cs.guard_alpha == 0:
        return f"= {method.solver.name} (guard): the guard chose alpha = 0, every correction is off"
    return ""


def checkpoint_interval() -> float:
    """Seconds between partial-progress checkpoints (env ``IIA_CHECKPOINT_EVERY_S``, default 30; a bad value is a
    ConfigError naming the variable). Read it once per run, before the sampling loop."""
    return envvars.checkpoint_every_s()


def save_checkpoint(save: Callable[[], None], path: Path, log: LogFn) -> bool:
    """Write a checkpoint with ``save()``. One that cannot be written is a warning, not an error: checkpoints only
    save time on a rerun, so sampling goes on (the caller stops checkpointing). Returns whether it was written."""
    try:
        save()
    except OSError as exc:
        log(f"warning: could not write the checkpoint {path} ({exc.strerror or exc}); sampling goes on without "
            "checkpoints, so an interruption now restarts from the last checkpoint written")
        return False
    return True


def _png_path(out_dir: Path, seed: int, subdirs: bool) -> Path:
    return (out_dir / f"{seed - seed % 1000:06d}" if subdirs else out_dir) / f"{seed:06d}.png"


def _shard_path(path: Path) -> Path:
    ctx = dist.context()
    return path.with_name(f"{path.stem}.shard-{ctx.shard[0]}-of-{ctx.shard[1]}{path.suffix}") if ctx.shard else path


@dataclass
class _SamplePlan:
    """Where one sampling run writes (a PNG directory, an .npz with its partial checkpoint, or nowhere) and its
    seeds: this process's, those still to sample, and those done (resumed or sampled, kept in memory)."""

    out_path: Path | None
    to_npz: bool
    subdirs: bool
    collect: bool  # keep each sample in memory (an .npz, keep, a grid PNG)
    mine: list[int]
    meta: dict[str, Any]
    todo: list[int] = field(default_factory=list)
    # seed -> (x float32 [C, H, W], image uint8 [H, W, C])
    done: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    partial: Path | None = None


def sample(cfg: ExperimentConfig, method: str | None = None, nfe: int | None = None, seeds: Any = None,
           batch: int | None = None, out: str | Path | None = None, grid_png: str | Path | None = None,
           coeffs: str | Path | None = None, calibrate_missing: bool = False, keep: bool = False,
           prepared: Prepared | None = None, log: LogFn = default_log, progress: bool = True) -> SampleResult:
    """Sample images; write PNGs (``out`` a directory) or an .npz (``out`` ending in .npz).

    Under torchrun each rank samples its share of the seeds (rank 0 writes the .npz); with ``--shard i/n``
    this process takes every n-th seed and writes ``<out>.shard-i-of-n.npz``. An interrupted run resumes:
    PNGs already written are skipped, and an .npz run continues from its last checkpoint."""
    p = prepared or prepare(cfg, method, nfe)
    seed_list = parse_seeds(seeds if seeds is not None else cfg.sampler.seeds)
    batch = int(p.batch if batch is None else batch)
    if batch < 1:
        raise ConfigError(f"batch={batch} must be at least 1")
    out = out if out is not None else cfg.output.path
    grid_png = grid_png if grid_png is not None else cfg.output.grid_png
    resolved = resolve_coefficients(p, coeffs or cfg.sampler.coeffs, calibrate_missing, log)
    coeff_values, coeff_path = (resolved.values, resolved.path) if resolved else (None, None)
    note = base_note(p.method, resolved.cs) if resolved else ""
    plan = _plan_output(cfg, p, Path(out) if out else None, seed_list, bool(keep or grid_png), log)
    log(f"sampling {len(seed_list)} images with {p.method.name} at NFE {p.nfe}, batch {batch}, "
        f"{p.device}/{str(p.state_dtype).removeprefix('torch.')}" + (f" ({p.note})" if p.note else "")
        + (f", coefficients {coeff_path.resolve()}" if coeff_path else "") + (f" ({note})" if note else "")
        + (f", {dist.context().world} processes" if dist.context().distributed else ""))
    seconds = _sample_seeds(cfg, p, plan, batch, coeff_values, progress, log)
    gathered, order, images = _gather(plan, seed_list)
    if plan.to_npz and dist.context().is_main:
        images = _write_npz(p, plan, gathered, order, images, len(seed_list), log)
    if plan.partial is not None:
        dist.barrier()
        plan.partial.unlink(missing_ok=True)
    if grid_png and images is not None and len(images) and dist.context().is_main:
        _write_grid_png(cfg, p, grid_png, order, images, note, log)
    if plan.out_path is not None:
        log(f"wrote {len(seed_list)} images to {plan.out_path} ({seconds:.1f} s, "
            f"{len(plan.todo) / max(seconds, 1e-9):.1f} img/s)")
    return SampleResult(seed_list, p.nfe, p.method.name, seconds, plan.out_path, coeff_path,
                        images if keep else None, note=note)


def _plan_output(cfg: ExperimentConfig, p: Prepared, out_path: Path | None, seed_list: list[int], keep: bool,
                 log: LogFn) -> _SamplePlan:
    """Where the run writes (this shard's .npz, or the PNG directory, made) and which of this process's seeds
    are left: PNGs already written and an .npz run's partial checkpoint are taken as done."""
    to_npz = out_path is not None and out_path.suffix == ".npz"
    if to_npz:
        out_path = _shard_path(out_path)
    elif out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    mine = dist.split(seed_list)  # this process's seeds
    meta = dict(method=np.asarray(p.method.name), nfe=np.asarray(p.nfe), sigmas=p.sigmas.numpy(),
                grid=np.asarray(cfg.grid.kind), model_sha256=np.asarray(p.fingerprint))
    plan = _SamplePlan(out_path, to_npz, cfg.output.subdirs, to_npz or keep, mine, meta)
    if to_npz:
        ctx = dist.context()
        plan.partial = out_path.with_name(f".{out_path.stem}.partial-r{ctx.rank}of{ctx.world}.npz")
        plan.done = _load_partial(plan.partial, p, set(mine))
    plan.todo = [s for s in mine if s not in plan.done]
    if out_path is not None and not to_npz:
        plan.todo = [s for s in mine if not _png_path(out_path, s, plan.subdirs).is_file()]
    if len(plan.todo) < len(mine):
        log(f"resuming: {len(mine) - len(plan.todo)} of {len(mine)} images are already done")
    return plan


def _sample_seeds(cfg: ExperimentConfig, p: Prepared, plan: _SamplePlan, batch: int,
                  coeff_values: Coefficients | None, progress: bool, log: LogFn) -> float:
    """Sample the plan's seeds left, writing each PNG as it comes and keeping the samples the plan collects,
    with a partial checkpoint of an .npz run every checkpoint interval; returns the seconds it took."""
    every = checkpoint_interval() if plan.partial is not None else math.inf
    t0 = last_checkpoint = time.perf_counter()
    with ImageProgress(len(plan.todo), f"{p.method.name} nfe={p.nfe}", enabled=progress) as bar:
        for chunk, x in sample_batches(p.model, p.method, p.sigmas, plan.todo, batch, coeff_values, p.device,
                                       p.state_dtype, cfg.sampler.class_label, bar):
            u8 = quantize(to_images(p.model, x)).numpy()
            x32 = x.to(torch.float32).cpu().numpy()
            for k, seed in enumerate(chunk):
                if plan.out_path is not None and not plan.to_npz:
                    path = _png_path(plan.out_path, seed, plan.subdirs)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, lambda tmp, im=u8[k]: save_png(im, tmp, "PNG"))
                if plan.collect:
                    plan.done[seed] = (x32[k] if plan.to_npz else np.empty(0, np.float32), u8[k])
            if plan.partial is not None and time.perf_counter() - last_checkpoint >= every:
                partial = plan.partial
                written = save_checkpoint(lambda: _save_partial(partial, plan.done, plan.meta), partial, log)
                last_checkpoint = time.perf_counter() if written else math.inf
    return time.perf_counter() - t0


def _gather(plan: _SamplePlan, seed_list: list[int]) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[int],
                                                               np.ndarray | None]:
    """Every process's collected samples, their seeds in order (this shard's) and their images (None: none)."""
    gathered: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for part in dist.gather_objects(plan.done) if plan.collect else []:
        gathered.update(part)
    order = [s for s in (seed_list if not dist.context().shard else dist.split(seed_list, by_rank=False))
             if s in gathered]
    images = np.stack([gathered[s][1] for s in order]) if order else None
    return gathered, order, images


def _write_npz(p: Prepared, plan: _SamplePlan, gathered: dict[int, tuple[np.ndarray, np.ndarray]], order: list[int],
               images: np.ndarray | None, n_seeds: int, log: LogFn) -> np.ndarray | None:
    """Write the .npz of the gathered samples (an empty one for a shard without seeds); returns its images."""
    out_path = plan.out_path
    assert out_path is not None
    if not order:  # a shard with no seeds of its own (more shards than seeds) writes an empty file
        log(f"shard {dist.context().shard} has none of the {n_seeds} seeds: writing an empty {out_path}")
        x0 = torch.zeros((1, *p.model.shape), dtype=p.state_dtype, device=p.device)
        gathered_x = np.zeros((0, *p.model.shape), np.float32)
        images = quantize(to_images(p.model, x0)).numpy()[:0]
    else:
        gathered_x = np.stack([gathered[s][0] for s in order])
    extra = {}
    if callable(getattr(p.model, "prompt_of", None)):  # text-to-image: the caption of each seed
        extra["prompts"] = np.asarray([p.model.prompt_of(s) for s in order], dtype=str)
    savez_atomic(out_path, rescue=True, what=f"{len(order)} samples", x=gathered_x, images=images,
                 seeds=np.asarray(order, dtype=np.int64), **plan.meta, **extra)
    return images


def _write_grid_png(cfg: ExperimentConfig, p: Prepared, grid_png: str | Path, order: list[int], images: np.ndarray,
                    note: str, log: LogFn) -> None:
    """The grid PNG of the first 64 samples, titled with the method, NFE, seeds and model."""
    shown = order[:64]
    model = cfg.model.kind + (f" {Path(str(cfg.model.params['path'])).name}" if cfg.model.params.get("path") else "")
    title = (f"{p.method.name}" + (f" ({note.split(':')[0]})" if note else "") + f" | NFE {p.nfe} | "
             f"seeds {format_seeds(shown)} | {model}")
    save_grid_png(images[:64], Path(grid_png), title=title)
    log(f"wrote sample grid {grid_png}")


def _save_partial(path: Path, done: dict[int, tuple[np.ndarray, np.ndarray]], meta: dict[str, Any]) -> None:
    seeds = sorted(done)
    savez_atomic(path, done_seeds=np.asarray(seeds, dtype=np.int64), x=np.stack([done[s][0] for s in seeds]),
                 images=np.stack([done[s][1] for s in seeds]), **meta)


def _load_partial(path: Path, p: Prepared, wanted: set[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Images of an interrupted .npz run of the same model, method, NFE and grid (else nothing)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            same = (str(data["method"]) == p.method.name and int(data["nfe"]) == p.nfe
                    and str(data["model_sha256"]) == p.fingerprint and np.array_equal(data["sigmas"], p.sigmas.numpy()))
            if not same:
                return {}
            return {int(s): (x, im) for s, x, im in zip(data["done_seeds"], data["x"], data["images"]) if int(s) in wanted}
    except (OSError, KeyError, ValueError):
        return {}
