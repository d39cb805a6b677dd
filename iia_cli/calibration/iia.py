"""IIA calibration (Zhang, Niwa, Kleijn, ICLR 2024, eqs. 14 and 19): one greedy least-squares pass, a guard on
the final error and end-to-end validation, resumable from checkpoints. Its parts live next to it: ``teacher``
(the high-accuracy solve and its cache), ``lstsq`` (the per-step normal equations), ``guard`` (the shrink factor)
and ``coefficients`` (the coefficient files).

At step i the quantities q_k are computed from the current states z_i and the coefficients solve
``min_c sum_b || sum_k c_k q_k^b - (x_target^b - x_base^b) ||^2`` through the normal equations ``G c = g``
accumulated in float64 over chunks of the batch (and over torchrun ranks). The target ``x_target`` is

* ``local`` (the paper's fine-grained reference, eqs. 14 and 19): the same base solver over M sub-steps of
  [sigma_i, sigma_{i+1}] from the same coarse state;
* ``trajectory``: the teacher's state at sigma_{i+1} on its trajectory from the same noise (a high-accuracy
  solve through the coarse sigmas), so that a step also removes the error accumulated before it.

The coefficients are applied and the pass goes on: B x (NFE + fine or teacher NFE) denoiser calls, never a
re-simulation from noise. The guard then shrinks all corrections by one factor alpha in [0, 1], chosen by the
final samples' error against the teacher on the calibration noises (alpha = 0 is the base solver, so the
result is never worse than the base there), and the held-out noises report base and IIA honestly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iia_cli import __version__
from iia_cli.core.grids import subdivide
from iia_cli.core.methods import Method
from iia_cli.core.sampling import (BoundDenoiser, Coefficients, advance, commit, corrected_steps, format_seeds,
                                   noise_and_conditioning, propose, sample_batches)
from iia_cli.core.solvers.base import History
from iia_cli.models.base import Denoiser, capabilities
from iia_cli.runtime import dist
from iia_cli.runtime.errors import ConfigError, IIARuntimeError

from .checkpoint import CalibrationCheckpoint, decode_history, encode_history, identity_key, tensor
from .coefficients import FORMAT_VERSION
from .guard import GUARD_FOLDS, choose_alpha, final_rmse, fold_rmse, scale_coefficients
from .lstsq import accumulate_normal_equations, solve_least_squares
from .teacher import Teacher, TeacherCache, teacher_trajectory

TARGETS = ("local", "trajectory")


def fine_reference(method: Method, denoise: BoundDenoiser, x: torch.Tensor, sigmas: torch.Tensor, i: int,
                   history: History, substeps: int, model: Denoiser | None = None) -> torch.Tensor:
    """The same base solver over M sub-steps of [sigma_i, sigma_{i+1}], uniform in its time variable
    (the model's time for discrete-time models), from state x_i and the coarse history."""
    variable = "t" if capabilities(model).discrete_sigmas is not None else method.solver.time_variable
    sub = subdivide(float(sigmas[i]), float(sigmas[i + 1]), substeps, variable, model)
    solver = method.solver.reference_solver()
    reference = Method(solver.name, solver)
    for j in range(substeps):
        x, history, _ = advance(reference, denoise, x, sub, j, history)
    return x


@dataclass
class PassResult:
    coeffs: Coefficients
    residual_base: list[float]  # per step: mean over samples of ||x_base - x_target||^2
    residual_iia: list[float]  # per step: mean over samples of ||x_iia - x_target||^2
    calls: int  # denoiser calls per sample of the coarse steps and the local fine reference
    seconds: float
    teacher_calls: int = 0  # denoiser calls per sample of the teacher
    seeds: list[int] = field(default_factory=list)  # this process's noises, in chunk order
    finals: list[torch.Tensor] = field(default_factory=list)  # final IIA states per chunk
    teacher_finals: list[torch.Tensor] = field(default_factory=list)  # the teacher's final states per chunk


@dataclass(frozen=True)
class CalibrationSetup:
    """What every pass of one calibration shares: the method on its sigmas, the model, the target and its
    teacher, how the noises are chunked, the device and dtype, the ridge, the class label and where lines go."""

    method: Method
    model: Denoiser
    sigmas: torch.Tensor
    substeps: int  # M: the local target's fine sub-steps per coarse step
    chunk: int  # noises per model call
    device: torch.device
    state_dtype: torch.dtype
    ridge: float = 1e-8
    class_label: int | None = None
    target: str = "local"  # one of TARGETS
    teacher: Teacher | None = None  # required for the trajectory target; the guard and validation use it too
    teachers: TeacherCache | None = None  # with ``fingerprint``: the teacher's trajectories are reused from it
    fingerprint: str = ""  # the model's (Prepared.fingerprint): keys the teacher cache and the checkpoint
    log: Callable[[str], None] | None = None  # progress lines (the per-step ones only when verbose)
    warn: Any = None  # how an ill-conditioned fit is reported (None: warnings.warn)

    def say(self, msg: str) -> None:
        """A progress line to ``log`` (dropped without one)."""
        if self.log is not None:
            self.log(msg)


@dataclass
class _PassState:
    """A greedy pass's chunks of noises with, per chunk, the current state, bound denoiser, history and
    labels; and the coefficients and per-step residuals so far."""

    chunks: list[list[int]]
    states: list[torch.Tensor] = field(default_factory=list)
    denoisers: list[BoundDenoiser] = field(default_factory=list)
    histories: list[History] = field(default_factory=list)
    labels: list[torch.Tensor | None] = field(default_factory=list)
    fitted: Coefficients = field(default_factory=list)
    res_base: list[float] = field(default_factory=list)
    res_iia: list[float] = field(default_factory=list)


def greedy_pass(setup: CalibrationSetup, seeds: list[int], coeffs: Coefficients | None = None, verbose: bool = False,
                checkpoint: CalibrationCheckpoint | None = None, part: str = "fit") -> PassResult:
    """One greedy pass over the noises of ``seeds``: fits coefficients step by step (``coeffs`` None) or
    applies given ones (validation), recording per-step residuals against ``setup.target`` (``local``: M fine
    sub-steps of the base solver from the coarse state; ``trajectory``: the teacher's state at sigma_{i+1}).
    A ``setup.teacher`` (required for ``trajectory``) runs along in the same pass from the same noises; its final
    states are returned for the end-to-end error. With ``setup.teachers`` and the model's ``setup.fingerprint``
    the teacher's trajectory is taken from (and kept in) that cache. ``verbose``: a line per step to
    ``setup.log``. With a ``checkpoint``, the teacher's chunks (parts ``{part}-teacher-c{k}``) and the pass's
    progress after each step (part ``{part}``) are kept there, and what it holds of them is taken instead of
    computed again."""
    _check_pass(setup)
    n = len(seeds)
    seeds = dist.split(seeds, by_shard=False)  # under torchrun: this rank's noises; G, g are all-reduced
    if not seeds:
        raise ConfigError(f"{n} calibration noises cannot be split over {dist.context().world} processes")
    t0 = time.perf_counter()
    method, sigmas = setup.method, setup.sigmas
    n_steps = len(sigmas) - 1
    sig = sigmas.to(torch.float64)
    st = _start_pass(setup, seeds, sig)
    ck = checkpoint or CalibrationCheckpoint.off()
    teacher_states, teacher_calls = _teacher_states(setup, st, sig, ck, part)
    from iia_cli.runtime.progress import ImageProgress

    skipped = corrected_steps(method, sigmas)
    n_fit = n_steps - len(skipped)  # the progress counts the steps fitted (or validated)
    bar = ImageProgress(n_fit, f"{'calibrating' if coeffs is None else 'validating'} {method.name} "
                        f"({n} noises)", unit="steps").__enter__()  # ends itself after the last step
    start = _restore_pass(ck, part, st.states, st.histories, st.denoisers, st.fitted, st.res_base, st.res_iia,
                          setup.device)
    if start:
        bar.resume(sum(1 for i in range(start) if i not in skipped))
    for i in range(start, n_steps):
        corrected = _pass_step(setup, st, sig, i, coeffs, teacher_states, n)
        if verbose and setup.log is not None and corrected:
            setup.log(f"  step {i:2d}  sigma {float(sig[i]):9.4f} -> {float(sig[i + 1]):9.4f}  "
                      f"c = [{', '.join(f'{v:+.4f}' for v in st.fitted[-1])}]  residual base {st.res_base[-1]:.4g} "
                      f"-> iia {st.res_iia[-1]:.4g}")
        if corrected:
            bar.advance(1)
        if ck.enabled:
            _save_pass(ck, part, i + 1, st.states, st.histories, st.denoisers[0].calls, st.fitted, st.res_base,
                       st.res_iia)
    for s in st.states:
        if not bool(torch.isfinite(s).all()):
            raise IIARuntimeError(f"{method.name}: non-finite states during calibration (NaN/Inf)")
    return PassResult(st.fitted, st.res_base, st.res_iia, st.denoisers[0].calls, time.perf_counter() - t0,
                      teacher_calls, seeds, st.states, teacher_states[-1] if setup.teacher is not None else [])


def _check_pass(setup: CalibrationSetup) -> None:
    """Refuse a pass whose method has no coefficients, whose target is unknown or lacks the teacher it needs."""
    if not setup.method.is_iia:
        raise ConfigError(f"method {setup.method.name} has no IIA coefficients to calibrate")
    if setup.target not in TARGETS:
        raise ConfigError(f"calibration.target={setup.target!r} is not valid; choose one of {', '.join(TARGETS)}")
    if setup.target == "trajectory" and setup.teacher is None:
        raise ConfigError("calibration.target=trajectory needs a teacher (calibration.teacher)")
    if setup.teacher is not None:
        setup.teacher.check(setup.model)


def _start_pass(setup: CalibrationSetup, seeds: list[int], sig: torch.Tensor) -> _PassState:
    """The pass's chunks of this process's noises, each at sigma_0 with its own denoiser and empty history."""
    # All states stay in memory (B x d); model calls go chunk by chunk.
    st = _PassState([seeds[k : k + setup.chunk] for k in range(0, len(seeds), setup.chunk)])
    for c in st.chunks:
        noise, lab = noise_and_conditioning(setup.model, c, setup.device, setup.class_label)
        st.states.append(noise.to(setup.state_dtype) * float(sig[0]))
        st.denoisers.append(BoundDenoiser(setup.model, lab))
        st.histories.append(())
        st.labels.append(lab)
    return st


def _teacher_states(setup: CalibrationSetup, st: _PassState, sig: torch.Tensor, ck: CalibrationCheckpoint,
                    part: str) -> tuple[list[list[torch.Tensor]], int]:
    """The teacher's states at every coarse sigma for the pass's chunks and its calls per noise (none without a
    teacher), from the cache or the checkpoint where they are there; every chunk ends up in the checkpoint."""
    teacher = setup.teacher
    if teacher is None:
        return [], 0
    n_steps = len(sig) - 1
    done, done_calls = _restore_teacher(ck, part, len(st.chunks), n_steps, setup.device)
    solved: set[int] = set(done)

    def on_chunk(k: int, xs: list[torch.Tensor], calls: int) -> None:
        solved.add(k)
        ck.put(f"{part}-teacher-c{k}", {f"s{i}": x for i, x in enumerate(xs)}, {"calls": calls}, collective=False)

    if setup.teachers is not None and setup.fingerprint:
        teacher_states, teacher_calls = setup.teachers.trajectory(
            setup.fingerprint, teacher, setup.model, sig, st.chunks, st.states, st.labels, setup.class_label, done,
            done_calls, on_chunk)
    else:
        teacher_states, teacher_calls = teacher_trajectory(teacher, setup.model, sig, st.chunks, st.states,
                                                           st.labels, setup.class_label, done, done_calls, on_chunk)
    for k in range(len(st.chunks)):  # found in the cache: kept in the checkpoint too
        if k not in solved:
            on_chunk(k, [teacher_states[i + 1][k] for i in range(n_steps)], teacher_calls)
    return teacher_states, teacher_calls


def _pass_step(setup: CalibrationSetup, st: _PassState, sig: torch.Tensor, i: int, coeffs: Coefficients | None,
               teacher_states: list[list[torch.Tensor]], n: int) -> bool:
    """Step i of the pass over all chunks: propose, fit (or take) its coefficients, apply them and record the
    mean residuals over the ``n`` noises. Returns whether the step is corrected."""
    stash, G, g = _propose_step(setup, st, sig, i, coeffs, teacher_states)
    corrected = stash[0][0].quantities is not None
    if coeffs is None and corrected:
        G, g = dist.all_reduce_sum(G), dist.all_reduce_sum(g)
        c_i = solve_least_squares(G, g, setup.ridge, step=i, warn=setup.warn).tolist()
    elif coeffs is None:
        c_i = []
    else:
        c_i = list(coeffs[i])
    st.fitted.append(c_i)
    rb = ri = 0.0
    for k, (step, residual) in enumerate(stash):
        st.states[k], st.histories[k] = commit(step, st.histories[k], c_i)
        if corrected:
            rb += float(residual.to(torch.float64).flatten(1).pow(2).sum(1).sum())
            ri += float((st.states[k] - step.x_base - residual).to(torch.float64).flatten(1).pow(2).sum(1).sum())
    rb, ri = dist.all_reduce_floats(rb, ri) if corrected else (rb, ri)
    st.res_base.append(rb / n if corrected else float("nan"))
    st.res_iia.append(ri / n if corrected else float("nan"))
    return corrected


def _propose_step(setup: CalibrationSetup, st: _PassState, sig: torch.Tensor, i: int, coeffs: Coefficients | None,
                  teacher_states: list[list[torch.Tensor]]) -> tuple[list[tuple[Any, torch.Tensor | None]],
                                                                      torch.Tensor | None, torch.Tensor | None]:
    """Each chunk's proposal of step i and its residual to the target, and (fitting) this process's normal
    equations G, g summed over the chunks."""
    G = g = None
    stash = []
    for k in range(len(st.chunks)):
        x, den, hist = st.states[k], st.denoisers[k], st.histories[k]
        step = propose(setup.method, den, x, sig, i, hist)
        residual = None
        if step.quantities is not None:
            reference = (fine_reference(setup.method, den, x, sig, i, hist, setup.substeps, setup.model)
                         if setup.target == "local" else teacher_states[i + 1][k])
            residual = reference - step.x_base
            if coeffs is None:
                if G is None:
                    G = torch.zeros(len(step.quantities), len(step.quantities), dtype=torch.float64)
                    g = torch.zeros(len(step.quantities), dtype=torch.float64)
                accumulate_normal_equations(step.quantities, residual, G, g)
        stash.append((step, residual))
    return stash, G, g


def _restore_teacher(ck: CalibrationCheckpoint, part: str, n_chunks: int, n_steps: int,
                     device: torch.device) -> tuple[dict[int, list[torch.Tensor]], int]:
    """The teacher's chunks a checkpoint holds (states of steps 1..n_steps) and its calls per noise."""
    done: dict[int, list[torch.Tensor]] = {}
    calls = 0
    try:
        for k in range(n_chunks):
            data = ck.get(f"{part}-teacher-c{k}")
            if data is not None:
                done[k] = [tensor(data, f"s{i}", device) for i in range(n_steps)]
                calls = int(data["meta"]["calls"])
    except Exception as exc:  # noqa: BLE001 (a damaged part: computed afresh)
        ck.discard(exc)
        return {}, 0
    return done, calls


def _save_pass(ck: CalibrationCheckpoint, part: str, step: int, states: list[torch.Tensor],
               histories: list[History], calls: int, fitted: Coefficients, res_base: list[float],
               res_iia: list[float]) -> None:
    """The greedy pass's progress after ``step`` steps: each chunk's state and history, the coefficients and
    residuals so far, and the denoiser calls per noise."""
    arrays: dict[str, Any] = {"residual_base": torch.tensor(res_base, dtype=torch.float64),
                              "residual_iia": torch.tensor(res_iia, dtype=torch.float64)}
    specs = []
    for k, (x, hist) in enumerate(zip(states, histories)):
        spec, tensors = encode_history(hist, f"h{k}")
        arrays[f"x{k}"] = x
        arrays.update(tensors)
        specs.append(spec)
    ck.put(part, arrays, {"step": step, "calls": calls, "coefficients": [list(c) for c in fitted],
                          "histories": specs})


def _restore_pass(ck: CalibrationCheckpoint, part: str, states: list[torch.Tensor], histories: list[History],
                  denoisers: list[BoundDenoiser], fitted: Coefficients, res_base: list[float], res_iia: list[float],
                  device: torch.device) -> int:
    """Fill the pass's lists from a checkpoint's progress (in place); returns the step to go on from (0: none)."""
    data = ck.get(part)
    if data is None:
        return 0
    try:
        meta = data["meta"]
        step = int(meta["step"])
        xs = [tensor(data, f"x{k}", device) for k in range(len(states))]
        hs = [decode_history(spec, data, device) for spec in meta["histories"]]
        cs = [[float(v) for v in c] for c in meta["coefficients"]]
        rb, ri = data["residual_base"].tolist(), data["residual_iia"].tolist()
        if not (len(hs) == len(states) and len(cs) == len(rb) == len(ri) == step) or any(
                x.shape != s.shape or x.dtype != s.dtype for x, s in zip(xs, states)):
            raise ValueError(f"part {part} does not fit this pass")
    except Exception as exc:  # noqa: BLE001 (a damaged part: computed afresh)
        ck.discard(exc)
        return 0
    states[:], histories[:] = xs, hs
    fitted[:], res_base[:], res_iia[:] = cs, [float(v) for v in rb], [float(v) for v in ri]
    for den in denoisers:
        den.calls = int(meta["calls"])
    return step


def sample_finals(setup: CalibrationSetup, seeds: list[int], coeffs: Coefficients | None) -> list[torch.Tensor]:
    """Final states of a plain sampling pass over this process's ``seeds``, in the greedy pass's chunks."""
    return [x for _, x in sample_batches(setup.model, setup.method, setup.sigmas, seeds, setup.chunk, coeffs,
                                         setup.device, setup.state_dtype, setup.class_label)]


@dataclass
class CalibrationOutcome:
    fit: PassResult  # the greedy pass on the calibration noises (unguarded coefficients)
    coeffs: Coefficients  # after the guard
    alpha: float = 1.0
    guard_errors: dict[float, float] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)  # end-to-end final-sample RMSE vs the teacher
    val: PassResult | None = None  # the held-out greedy pass (per-step residuals)
    calls: int = 0  # denoiser calls on the calibration noises: fit, teacher, guard passes (all processes)
    val_calls: int = 0
    seconds: float = 0.0
    checkpoint: CalibrationCheckpoint | None = None  # remove() it once the coefficient file is written


def calibrate_coefficients(setup: CalibrationSetup, seeds: list[int], val_seeds: list[int], guard: bool = True,
                           verbose: bool = False, checkpoint_dir: Path | None = None,
                           checkpoint_every: float = 30.0) -> CalibrationOutcome:
    """Fit (one greedy pass against ``setup.target``), guard (shrink by the final error on the calibration
    noises) and validate end to end on the held-out ``val_seeds``. The teacher runs only when the target, the
    guard or the validation needs it; ``setup.teachers`` and the model's ``setup.fingerprint``: reuse its
    trajectories (:class:`TeacherCache`). ``verbose``: a line per fitted step to ``setup.log``.

    With ``checkpoint_dir`` (and a ``fingerprint``) the calibration checkpoints its progress under it (a
    directory named by the hash of everything the coefficients depend on, :mod:`iia_cli.calibration.checkpoint`)
    every ``checkpoint_every`` seconds and on any exception, and continues from such a checkpoint, to the same
    bits; the caller deletes it (``outcome.checkpoint.remove()``) once the coefficient file is written."""
    use_teacher = setup.teacher if (setup.target == "trajectory" or guard or val_seeds) else None
    setup = dataclasses.replace(setup, teacher=use_teacher)
    ck = _open_checkpoint(setup, seeds, val_seeds, guard, checkpoint_dir, checkpoint_every)
    try:
        out = _calibrate(setup, seeds, val_seeds, guard, verbose, ck)
    except BaseException:
        ck.flush()  # Ctrl-C, SIGTERM or a crash: what was reached since the last write is kept
        raise
    out.checkpoint = ck
    return out


def _open_checkpoint(setup: CalibrationSetup, seeds: list[int], val_seeds: list[int], guard: bool,
                     checkpoint_dir: Path | None, checkpoint_every: float) -> CalibrationCheckpoint:
    """The calibration's checkpoint under ``checkpoint_dir``, named by everything the coefficients depend on (off
    without a directory or a fingerprint); says what it resumes from."""
    if checkpoint_dir is None or not setup.fingerprint:
        return CalibrationCheckpoint.off()
    method, sigmas, teacher, ctx = setup.method, setup.sigmas, setup.teacher, dist.context()
    identity = {"model": setup.fingerprint, "method": method.name, "method_params": dict(method.params),
                "convention": method.convention, "sigmas": [float(v) for v in sigmas.to(torch.float64)],
                "seeds": format_seeds(seeds), "val_seeds": format_seeds(val_seeds), "substeps": setup.substeps,
                "chunk": setup.chunk, "device": str(setup.device), "state_dtype": str(setup.state_dtype),
                "ridge": setup.ridge, "class_label": setup.class_label, "target": setup.target, "guard": guard,
                "teacher": [teacher.name, teacher.substeps] if teacher else None,
                "rank": ctx.rank, "world": ctx.world, "coefficient_format": FORMAT_VERSION,
                "tool_version": __version__}
    directory = Path(checkpoint_dir) / f"calibration-{identity_key(identity)}-r{ctx.rank}of{ctx.world}"
    ck = CalibrationCheckpoint(directory, identity, checkpoint_every, setup.say)
    _agree_on_resume(ck)
    if ck.loaded:
        setup.say(f"resuming calibration of {method.name} nfe={method.solver.nfe_of_grid(sigmas)}: "
                  f"{_resume_summary(ck, method, sigmas, val_seeds)} (checkpoint {directory})")
    return ck


def _agree_on_resume(ck: CalibrationCheckpoint) -> None:
    """Under torchrun every process must resume from the same point (the normal equations are summed over
    them): a fresh start unless all processes' checkpoints hold the same parts at the same progress."""
    if not dist.context().distributed:
        return
    mine = sorted((name, part["meta"].get("step", -1), len(part["meta"].get("alphas", [])))
                  for name, part in ck.loaded.items() if "-teacher-c" not in name)  # teacher chunks: each its own
    if any(other != mine for other in dist.gather_objects(mine)):
        ck.discard(ValueError("the processes' checkpoints are at different points"))


def _resume_summary(ck: CalibrationCheckpoint, method: Method, sigmas: torch.Tensor, val_seeds: list[int]) -> str:
    """What a checkpoint holds, in words: ``teacher done, 4 of 6 steps fitted, guard: 2 alphas``."""
    skipped = corrected_steps(method, sigmas)
    n_fit = len(sigmas) - 1 - len(skipped)
    words = []
    for part, what in (("fit", "fitted"), ("val", "validated")):
        teacher_chunks = sum(1 for name in ck.loaded if name.startswith(f"{part}-teacher-c"))
        if teacher_chunks:
            words.append(f"{'held-out ' if part == 'val' else ''}teacher: {teacher_chunks} chunk(s) done")
        data = ck.get(part)
        if data is not None:
            step = int(data["meta"].get("step", 0))
            words.append(f"{sum(1 for i in range(step) if i not in skipped)} of {n_fit} steps {what}")
        if part == "fit" and ck.get("guard") is not None:
            words.append(f"guard: base and {len(ck.get('guard')['meta'].get('alphas', []))} alpha(s) done")
    if ck.get("val-end") is not None:
        words.append("held-out base error done")
    return ", ".join(words) or "nothing usable"


def _calibrate(setup: CalibrationSetup, seeds: list[int], val_seeds: list[int], guard: bool, verbose: bool,
               ck: CalibrationCheckpoint) -> CalibrationOutcome:
    """:func:`calibrate_coefficients`'s work (fit, guard, validate), each finished part kept in (and taken
    from) ``ck``."""
    t0 = time.perf_counter()
    fit = greedy_pass(setup, seeds, verbose=verbose, checkpoint=ck, part="fit")
    calls = _report_fit(setup, fit, len(seeds))
    out = CalibrationOutcome(fit, fit.coeffs)
    validation: dict[str, Any] = {}
    if setup.teacher is not None:
        calls += _end_to_end(setup, fit, len(seeds), guard, ck, out, validation)
    if val_seeds:
        _validate(setup, val_seeds, fit, ck, out, validation)
    out.validation = validation
    out.calls = int(calls)
    out.seconds = time.perf_counter() - t0 + ck.elapsed_before
    return out


def _report_fit(setup: CalibrationSetup, fit: PassResult, B: int) -> int:
    """Say what the fit cost; returns its denoiser calls over the ``B`` calibration noises (teacher included)."""
    target, teacher = setup.target, setup.teacher
    what = f"M={setup.substeps} fine sub-steps" if target == "local" else f"teacher {teacher.tag if teacher else ''}"
    setup.say(f"calibration ({target} target, {what}): {fit.calls * B} denoiser calls ({fit.calls} per noise x {B})"
              + (f" + teacher {teacher.tag}: {fit.teacher_calls * B} ({fit.teacher_calls} per noise x {B})"
                 if teacher else "") + f", {fit.seconds:.1f} s")
    return (fit.calls + fit.teacher_calls) * B


def _end_to_end(setup: CalibrationSetup, fit: PassResult, B: int, guard: bool, ck: CalibrationCheckpoint,
                out: CalibrationOutcome, validation: dict[str, Any]) -> int:
    """The final-sample error against the teacher on the ``B`` calibration noises, base and fit, into
    ``validation``, then (``guard``) the shrink factor chosen by it; returns the denoiser calls this took."""
    saved = _guard_part(ck)
    if saved is None:
        base = sample_finals(setup, fit.seeds, None)
        e0, base_folds = final_rmse(base, fit.teacher_finals), fold_rmse(base, fit.teacher_finals, fit.seeds)
        done: dict[float, list[float]] = {}
    else:
        e0, base_folds, done = saved
    e1 = final_rmse(fit.finals, fit.teacher_finals)
    nfe = setup.method.solver.nfe_of_grid(setup.sigmas)

    def keep() -> None:
        ck.put("guard", {"base_folds": torch.tensor(base_folds, dtype=torch.float64),
                         "folds": torch.tensor([done[a] for a in done], dtype=torch.float64).reshape(
                             len(done), len(base_folds))},
               {"base_rmse": e0, "alphas": list(done)})

    if saved is None:
        keep()
    validation.update(calibration_rmse_base=e0, calibration_rmse_unguarded=e1, calibration_rmse_iia=e1)
    setup.say(f"final-sample RMSE vs the teacher on the {B} calibration noises: base {e0:.5g}, iia {e1:.5g} "
              f"(x{e1 / e0 if e0 else float('nan'):.3f})")
    if not guard:
        return nfe * B
    return nfe * B + _choose_guard(setup, fit, B, base_folds, done, keep, out, validation)


def _choose_guard(setup: CalibrationSetup, fit: PassResult, B: int, base_folds: list[float],
                  done: dict[float, list[float]], keep: Callable[[], None], out: CalibrationOutcome,
                  validation: dict[str, Any]) -> int:
    """The guard: the alpha whose scaled coefficients have the smallest worst-fold final error (``done``: the
    alphas' fold errors known, ``keep()`` checkpoints them), into ``out``; returns the denoiser calls it took."""
    nfe = setup.method.solver.nfe_of_grid(setup.sigmas)

    def error_at(alpha: float) -> list[float]:
        if alpha not in done:
            xs = sample_finals(setup, fit.seeds, scale_coefficients(fit.coeffs, alpha))
            done[alpha] = fold_rmse(xs, fit.teacher_finals, fit.seeds)
            keep()
        return done[alpha]

    g = choose_alpha(error_at, base_folds, fold_rmse(fit.finals, fit.teacher_finals, fit.seeds))
    out.alpha, out.guard_errors = g.alpha, g.errors
    out.coeffs = fit.coeffs if g.alpha == 1.0 else scale_coefficients(fit.coeffs, g.alpha)
    validation["calibration_rmse_iia"] = g.errors[g.alpha]
    setup.say(f"guard: alpha = {g.alpha:g} on all corrections (alpha: final RMSE on the calibration noises, worst "
              f"fold / base: " + ", ".join(f"{a:g}: {e:.5g} {g.worst_fold[a]:.3f}" for a, e in g.errors.items())
              + f"); {g.passes} extra sampling passes ({g.passes * nfe * B} denoiser calls)")
    return g.passes * nfe * B


def _validate(setup: CalibrationSetup, val_seeds: list[int], fit: PassResult, ck: CalibrationCheckpoint,
              out: CalibrationOutcome, validation: dict[str, Any]) -> None:
    """The held-out pass with the chosen coefficients and, with a teacher, the final-sample error of base,
    IIA and (guarded) the unguarded fit against it, into ``out`` and ``validation``."""
    val = greedy_pass(setup, val_seeds, coeffs=out.coeffs, checkpoint=ck, part="val")
    out.val = val
    V = len(val_seeds)
    out.val_calls = (val.calls + val.teacher_calls) * V
    if setup.teacher is None:
        return
    nfe = setup.method.solver.nfe_of_grid(setup.sigmas)
    end = _val_end_part(ck)
    if end.get("rmse_base") is None:
        end["rmse_base"] = final_rmse(sample_finals(setup, val.seeds, None), val.teacher_finals)
        ck.put("val-end", {}, end)
    vb, vi = end["rmse_base"], final_rmse(val.finals, val.teacher_finals)
    out.val_calls += nfe * V
    validation.update(noises=V, rmse_base=vb, rmse_iia=vi)
    if out.alpha != 1.0:
        if end.get("rmse_unguarded") is None:
            end["rmse_unguarded"] = final_rmse(sample_finals(setup, val.seeds, fit.coeffs), val.teacher_finals)
            ck.put("val-end", {}, end)
        validation["rmse_unguarded"] = end["rmse_unguarded"]
        out.val_calls += nfe * V
    else:
        validation["rmse_unguarded"] = vi
    validation["iia_worse"] = bool(vi > vb)
    setup.say(f"held-out final-sample RMSE vs the teacher ({V} noises): base {vb:.5g}, iia {vi:.5g} "
              f"(x{vi / vb if vb else float('nan'):.3f})"
              + (f"; without the guard {validation['rmse_unguarded']:.5g}" if out.alpha != 1.0 else ""))


def _guard_part(ck: CalibrationCheckpoint) -> tuple[float, list[float], dict[float, list[float]]] | None:
    """The guard's errors a checkpoint holds: the base RMSE, the base's fold errors and each alpha's."""
    data = ck.get("guard")
    if data is None:
        return None
    try:
        alphas = [float(a) for a in data["meta"]["alphas"]]
        folds = data["folds"].tolist()
        base_folds = [float(v) for v in data["base_folds"].tolist()]
        if len(folds) != len(alphas) or any(len(f) != len(base_folds) for f in folds) \
                or len(base_folds) != GUARD_FOLDS + 1:
            raise ValueError("the guard part does not fit")
        return float(data["meta"]["base_rmse"]), base_folds, {a: [float(v) for v in f] for a, f in zip(alphas, folds)}
    except Exception as exc:  # noqa: BLE001 (a damaged part: computed afresh)
        ck.discard(exc)
        return None


def _val_end_part(ck: CalibrationCheckpoint) -> dict[str, float | None]:
    """The held-out base (and unguarded) RMSE a checkpoint holds."""
    data = ck.get("val-end")
    out: dict[str, float | None] = {"rmse_base": None, "rmse_unguarded": None}
    if data is not None:
        try:
            for key in out:
                v = data["meta"].get(key)
                out[key] = None if v is None else float(v)
        except Exception as exc:  # noqa: BLE001 (a damaged part: computed afresh)
            ck.discard(exc)
            return {"rmse_base": None, "rmse_unguarded": None}
    return out
