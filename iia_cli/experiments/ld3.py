"""LD3-style learned time grid (Tong et al., ICLR 2025, "Learning to Discretize Denoising Diffusion ODEs").

The sigmas of a solver at one NFE are learned by gradient descent *through the solver* against a teacher's final
samples:

1. Parameterisation: the plan's ``S + 1`` sigmas from sigma_max to sigma_min (``Solver.plan``; the step to
   sigma = 0 of the ``iia`` convention is appended and not learned) are
   ``log sigma_k = log sigma_max + (log sigma_min - log sigma_max) * sum_{j<k} softmax(theta)_j``: strictly
   descending for any theta, the end points fixed exactly. theta starts at the log of the start grid's
   increments in log sigma, so the first grid is the start grid (up to the rounding of exp(log)): the run's
   ``grid`` when it is ``karras``, ``logsnr`` or ``time-uniform`` (e.g. a solver's best fixed grid), else
   Karras rho 7 over the run's range.
2. Teacher: the final samples of ``noises`` training and ``val_noises`` validation noises (seeds from 3e9, as
   GITS's teacher: disjoint from evaluation and calibration seeds; the validation seeds follow the training ones)
   by EDM's Heun sampler, ``teacher_substeps`` steps uniform
   in log sigma per interval of a ``teacher_steps``-interval Karras grid over the same range (and the same step
   to 0 when the student ends at 0), or the model's closed-form solution (``teacher="exact"``, the Gaussian
   test model).
3. Training: Adam on theta, one minibatch of ``batch`` training noises an iteration, the loss differentiated
   through :func:`iia_cli.core.sampling.run_steps` (every solver step is autograd-friendly in the sigmas). Two losses:

   * ``mse``: the mean squared error of the student's final samples against the teacher's;
   * ``soft`` (LD3's soft teacher, the paper's Sec. 3.2): the student may start from a perturbed noise
     ``z + delta_b`` with ``||delta_b||_2 <= slack * sqrt(d)`` (a ball around each training noise, ``delta_b``
     learned with theta by Adam and projected back on the ball after each step), and the loss is the MSE of
     its final sample against the teacher's from ``z``. The slack keeps the grid from overfitting a few
     noises: it only has to bring the student close to the teacher's map, not onto each sample. (LD3 states its
     ball as radius r sigma_T around x_T; here the radius is relative to the noise's typical norm sqrt(d), so
     ``slack`` reads as an RMS perturbation per pixel.)

4. Validation: every ``val_every`` iterations (and before the first) the plain MSE against the teacher on the
   validation noises, unperturbed, with the grid as floats (exactly the sampling path); the best grid by that
   loss is kept, the start included, so a search never returns a grid that validates worse than its start.

Denoiser calls are counted per image: teacher, training forward calls (each has a backward pass through the
model as well) and validation calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from iia_cli.calibration.teacher import Teacher
from iia_cli.config.experiment import ExperimentConfig, GridConfig
from iia_cli.core.gridfile import GridFile
from iia_cli.core.grids import make_karras_grid
from iia_cli.core.sampling import BoundDenoiser, format_seeds, noise_and_conditioning, run_steps
from iia_cli.models.base import Denoiser, capabilities, round_sigmas
from iia_cli.runtime.errors import ConfigError, IIARuntimeError
from iia_cli.runtime.progress import ImageProgress, log as default_log

LogFn = Callable[[str], None]
START_KINDS = ("karras", "logsnr", "time-uniform")  # grid kinds a search can start from


def grid_label(g: GridConfig) -> str:
    """``Karras`` (rho 7), ``Karras rho 5``, ``logsnr``, ``time-uniform``: how the start grid is named in the log."""
    return (("Karras" if g.rho == 7.0 else f"Karras rho {g.rho:g}") if g.kind == "karras" else g.kind)
SEARCH_SEED_START = 3_000_000_000  # as GITS's teacher noises: disjoint from evaluation, calibration and validation
LOSSES = ("soft", "mse")
DEFAULT_ITERATIONS = 150
DEFAULT_LR = 0.05
DEFAULT_NOISES = 64
DEFAULT_VAL_NOISES = 32
DEFAULT_LOSS = "soft"
DEFAULT_SLACK = 0.05
DEFAULT_TEACHER_STEPS = 40
DEFAULT_TEACHER_SUBSTEPS = 3
DEFAULT_BATCH = 16


@dataclass(frozen=True)
class LearnSettings:
    """How an LD3 search runs (see the module doc): ``iterations`` Adam steps of learning rate ``lr`` on
    minibatches of ``batch`` of the ``noises`` training noises, validation on ``val_noises`` every ``val_every``
    iterations, the ``loss`` (``soft`` with radius ``slack``, or ``mse``), the teacher (``teacher``: ``edm`` with
    ``teacher_steps`` Karras intervals of ``teacher_substeps`` Heun steps, or ``exact``)."""

    iterations: int = DEFAULT_ITERATIONS
    lr: float = DEFAULT_LR
    noises: int = DEFAULT_NOISES
    val_noises: int = DEFAULT_VAL_NOISES
    batch: int = DEFAULT_BATCH
    val_every: int = 5
    loss: str = DEFAULT_LOSS
    slack: float = DEFAULT_SLACK
    teacher: str = "edm"
    teacher_steps: int = DEFAULT_TEACHER_STEPS
    teacher_substeps: int = DEFAULT_TEACHER_SUBSTEPS
    seed_start: int = SEARCH_SEED_START

    def __post_init__(self) -> None:
        for name, low in (("iterations", 0), ("noises", 1), ("val_noises", 1), ("batch", 1), ("val_every", 1),
                          ("teacher_steps", 1), ("teacher_substeps", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least {low}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr={self.lr} must be a positive number")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r} is not valid; choose one of {', '.join(LOSSES)}")
        if not (math.isfinite(self.slack) and self.slack >= 0):
            raise ConfigError(f"--slack={self.slack} must be a number >= 0")
        if self.teacher not in ("edm", "exact"):
            raise ConfigError(f"--teacher {self.teacher!r} is not valid; choose edm or exact")


def logits_of(sigmas: torch.Tensor) -> torch.Tensor:
    """theta whose grid (:func:`grid_of`) is ``sigmas`` (descending, positive): the log of the increments in
    log sigma."""
    inc = -torch.diff(torch.log(sigmas.to(torch.float64)))
    return torch.log(inc / inc.sum())


def grid_of(theta: torch.Tensor, sigma_max: float, sigma_min: float, append_zero: bool) -> torch.Tensor:
    """The grid of theta [S]: S + 1 sigmas strictly descending from ``sigma_max`` to ``sigma_min`` (both exact),
    log-spaced by softmax(theta), then 0 when ``append_zero``. Differentiable in theta."""
    frac = torch.cumsum(torch.softmax(theta, 0), 0)[:-1]
    inner = torch.exp(math.log(sigma_max) + (math.log(sigma_min) - math.log(sigma_max)) * frac)
    parts = [theta.new_tensor([sigma_max]), inner, theta.new_tensor([sigma_min])]
    if append_zero:
        parts.append(theta.new_zeros(1))
    return torch.cat(parts)


@dataclass
class _Chunk:
    """A chunk of noises: unit noise [b, ...] (state dtype), conditioning, the teacher's final states."""

    seeds: list[int]
    noise: torch.Tensor
    labels: Any
    target: torch.Tensor


def teacher_finals(model: Denoiser, teacher: Teacher, path: torch.Tensor, seeds: list[int], batch: int,
                   device: torch.device, state_dtype: torch.dtype, class_label: int | None,
                   bar: ImageProgress) -> tuple[list[_Chunk], int]:
    """The teacher's final states through ``path`` (sigma_max first) for ``seeds``, in chunks of ``batch``; and
    its denoiser calls (per image, summed)."""
    chunks, calls = [], 0
    for k in range(0, len(seeds), batch):
        part = seeds[k:k + batch]
        noise, lab = noise_and_conditioning(model, part, device, class_label)
        noise = noise.to(state_dtype)
        den, hist = BoundDenoiser(model, lab), ()
        x = noise * float(path[0])
        with torch.no_grad():
            for i in range(len(path) - 1):
                x, hist = teacher.run(model, den, x, hist, float(path[i]), float(path[i + 1]))
                bar.advance(1)
        chunks.append(_Chunk(part, noise, lab, x))
        calls += den.calls * len(part)
    return chunks, calls


def _differentiable(den: BoundDenoiser, kind: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``den``, refusing a model whose output drops out of the graph (it runs under no_grad or detaches): the
    solver's own terms would still carry gradient, silently without the model's part."""

    def call(x: torch.Tensor, sigma: Any) -> torch.Tensor:
        out = den(x, sigma)
        if not out.requires_grad:
            raise ConfigError(f"model.kind={kind}: its denoiser is not differentiable (it runs under no_grad or "
                              "detaches its output), so a grid cannot be learned through it; use --search gits")
        return out

    return call


def search_learned(cfg: ExperimentConfig, method: str, nfe: int, settings: LearnSettings = LearnSettings(),
                   log: LogFn = default_log, teacher_memo: dict[tuple, Any] | None = None) -> GridFile:
    """Learn the grid of ``method`` at ``nfe`` on the config's model (LD3, see the module doc) over ``cfg.grid``'s
    [sigma_min, sigma_max]. Returns the grid file (not yet saved). ``teacher_memo``: a dict where the teacher's
    final samples are kept between searches that share them (model fingerprint, teacher, its sigmas, seeds); the
    search then records the teacher's seconds of the search that solved it."""
    from iia_cli.api import prepare  # api imports the grid-file loader; the search is a layer above it

    t0 = time.perf_counter()
    g = cfg.grid
    start_grid = g if g.kind in START_KINDS else GridConfig(kind="karras", rho=7.0, sigma_min=g.sigma_min,
                                                             sigma_max=g.sigma_max)
    start_name = grid_label(start_grid)
    p = prepare(cfg, method, nfe, grid=start_grid)
    solver, model = p.method.solver, p.model
    plan = solver.plan(nfe)
    init = p.sigmas.to(torch.float64)
    s_max, s_min = float(init[0]), float(init[plan.n_points - 1])
    steps = plan.n_points - 1
    if steps < 1:
        raise ConfigError(f"{p.method.name} at NFE {nfe} takes no step between sigma_max and sigma_min: "
                          "there is no grid to learn; use a larger NFE")
    teacher = Teacher(settings.teacher, settings.teacher_substeps)
    teacher.check(model)
    path = (torch.tensor([s_max, s_min], dtype=torch.float64) if teacher.name == "exact"  # one closed-form jump
            else make_karras_grid(settings.teacher_steps + 1, s_min, s_max, 7.0))
    if plan.append_zero:
        path = torch.cat([path, path.new_zeros(1)])
    train_seeds = list(range(settings.seed_start, settings.seed_start + settings.noises))
    val_seeds = list(range(train_seeds[-1] + 1, train_seeds[-1] + 1 + settings.val_noises))
    loss_text = (f"soft teacher, slack {settings.slack:g}" if settings.loss == "soft" else "plain MSE")
    log(f"LD3 search for {p.method.name} at NFE {nfe} on {cfg.model.kind}: {steps} steps of "
        f"{solver.calls_per_step} call(s) over [{s_min:.4g}, {s_max:.4g}]"
        + (" + the step to 0" if plan.append_zero else "") + f", {settings.noises} training + "
        f"{settings.val_noises} validation noises, teacher {teacher.tag}"
        + ("" if teacher.name == "exact" else f" on {settings.teacher_steps} Karras intervals")
        + f", {loss_text}, Adam lr {settings.lr:g}, {settings.iterations} iterations of {settings.batch} noises")

    chunk_size = max(settings.batch, 1)
    n_teacher = math.ceil(settings.noises / chunk_size) + math.ceil(settings.val_noises / chunk_size)
    key = (p.fingerprint, teacher.tag, path.numpy().tobytes(), tuple(train_seeds), tuple(val_seeds), chunk_size,
           str(p.state_dtype), str(p.device), cfg.sampler.class_label)
    if teacher_memo is not None and key in teacher_memo:
        train, val, teacher_calls, teacher_s = teacher_memo[key]
    else:
        t_teacher = time.perf_counter()
        with ImageProgress(n_teacher * (len(path) - 1), f"LD3 teacher {teacher.tag} "
                           f"({settings.noises + settings.val_noises} noises)", unit="steps") as bar:
            train, calls_t1 = teacher_finals(model, teacher, path, train_seeds, chunk_size, p.device, p.state_dtype,
                                             cfg.sampler.class_label, bar)
            val, calls_t2 = teacher_finals(model, teacher, path, val_seeds, chunk_size, p.device, p.state_dtype,
                                           cfg.sampler.class_label, bar)
        teacher_calls, teacher_s = calls_t1 + calls_t2, time.perf_counter() - t_teacher
        if teacher_memo is not None:
            teacher_memo.clear()
            teacher_memo[key] = (train, val, teacher_calls, teacher_s)
    t_train = time.perf_counter()
    d = train[0].noise[0].numel()

    def validate(sigmas: torch.Tensor) -> tuple[float, int]:
        """Mean squared error per element on the validation noises, the grid as plain floats (sampling's path)."""
        total, calls = 0.0, 0
        with torch.no_grad():
            for c in val:
                den = BoundDenoiser(model, c.labels)
                x = run_steps(p.method, den, c.noise * s_max, sigmas)
                total += float(((x - c.target) ** 2).sum())
                calls += den.calls * len(c.seeds)
        return total / (settings.val_noises * d), calls

    theta = logits_of(init[: plan.n_points]).clone().requires_grad_(True)
    deltas = [torch.zeros_like(c.noise, requires_grad=settings.loss == "soft") for c in train]
    params = [{"params": [theta], "lr": settings.lr}]
    radius = settings.slack * math.sqrt(d)
    if settings.loss == "soft":
        params.append({"params": deltas, "lr": settings.lr * max(settings.slack, 1e-3)})
    opt = torch.optim.Adam(params)

    def current() -> torch.Tensor:
        with torch.no_grad():
            return grid_of(theta, s_max, s_min, plan.append_zero)

    first = current()
    val_loss, val_calls = validate(first)
    history = [{"iteration": 0, "val_mse": val_loss}]
    best = {"iteration": 0, "val_mse": val_loss, "sigmas": first}
    init_val = val_loss
    train_calls, train_loss, epoch_losses = 0, math.nan, []
    last_log = time.perf_counter()
    with ImageProgress(settings.iterations, f"LD3 training ({p.method.name}, NFE {nfe})", unit="iterations") as bar:
        for it in range(1, settings.iterations + 1):
            k = (it - 1) % len(train)
            c = train[k]
            sigmas = grid_of(theta, s_max, s_min, plan.append_zero)
            start = c.noise + deltas[k] if settings.loss == "soft" else c.noise
            den = BoundDenoiser(model, c.labels)
            x = run_steps(p.method, _differentiable(den, cfg.model.kind), start * s_max, sigmas)
            loss = ((x - c.target) ** 2).mean()
            if not bool(torch.isfinite(loss)):
                raise IIARuntimeError(f"LD3: the training loss became {float(loss)} at iteration {it}; "
                                      "use a smaller --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if settings.loss == "soft":
                with torch.no_grad():  # project each perturbation back on its ball
                    norm = deltas[k].flatten(1).norm(dim=1).clamp_min(1e-300)
                    deltas[k].mul_((radius / norm).clamp(max=1.0).view(-1, *[1] * (deltas[k].dim() - 1)))
            train_calls += den.calls * len(c.seeds)
            epoch_losses.append(float(loss.detach()))
            bar.advance(1)
            if it % settings.val_every == 0 or it == settings.iterations:
                train_loss = sum(epoch_losses) / len(epoch_losses)
                epoch_losses = []
                sig = current()
                val_loss, calls = validate(sig)
                val_calls += calls
                history.append({"iteration": it, "train_loss": train_loss, "val_mse": val_loss})
                if val_loss < best["val_mse"]:
                    best = {"iteration": it, "val_mse": val_loss, "sigmas": sig}
                if time.perf_counter() - last_log >= 30 or it == settings.iterations:
                    last_log = time.perf_counter()
                    log(f"LD3 iteration {it}/{settings.iterations}: train loss {train_loss:.4g}, validation MSE "
                        f"{val_loss:.4g} ({start_name} {init_val:.4g}, best {best['val_mse']:.4g} at "
                        f"{best['iteration']})")

    sigmas = best["sigmas"].detach().to(torch.float64)
    if capabilities(model).round_sigma is not None:
        sigmas = round_sigmas(model, sigmas)
        if plan.append_zero:
            sigmas[-1] = 0.0
    body = sigmas[:-1] if plan.append_zero else sigmas
    if not bool((body[:-1] > body[1:]).all()) or bool((body <= 0).any()):
        raise IIARuntimeError("LD3: the learned sigmas are not strictly descending (collapsed steps); "
                              "use a smaller --lr or fewer --iterations")
    if solver.nfe_of_grid(sigmas) != nfe:
        raise IIARuntimeError(f"internal: the learned grid makes {solver.nfe_of_grid(sigmas)} calls, not {nfe}")
    train_s = time.perf_counter() - t_train
    seconds = time.perf_counter() - t0
    log(f"LD3 best grid at iteration {best['iteration']}: validation MSE {best['val_mse']:.4g} ({start_name} "
        f"{init_val:.4g}, x{best['val_mse'] / init_val if init_val > 0 else math.nan:.2f}); sigmas "
        + ", ".join(f"{float(s):.4g}" for s in sigmas) + f"; {teacher_calls + train_calls + val_calls} denoiser "
        f"calls, {seconds:.1f} s")
    search = {
        "kind": "learned",
        "paper": "LD3 (Tong et al., ICLR 2025)",
        "parameterisation": "softmax increments in log sigma between fixed sigma_max and sigma_min",
        "init": {"kind": start_grid.kind, **({"rho": start_grid.rho} if start_grid.kind == "karras" else {}),
                 "sigma_min": s_min, "sigma_max": s_max},
        "teacher": teacher.tag if teacher.name == "exact" else f"{teacher.tag} on {settings.teacher_steps} "
                                                                "Karras intervals",
        "loss": settings.loss,
        "slack": settings.slack if settings.loss == "soft" else None,
        "loss_text": ("MSE of the final sample from noise z + delta (||delta||_2 <= slack sqrt(d), learned) against "
                      "the teacher's from z" if settings.loss == "soft"
                      else "MSE of the final sample against the teacher's"),
        "optimizer": {"kind": "adam", "lr": settings.lr, "iterations": settings.iterations, "batch": settings.batch},
        "noises": settings.noises,
        "seeds": format_seeds(train_seeds),
        "val_noises": settings.val_noises,
        "val_seeds": format_seeds(val_seeds),
        "val_every": settings.val_every,
        "best_iteration": best["iteration"],
        "val_mse": best["val_mse"],
        "val_mse_init": init_val,
        "train_loss_last": train_loss,
        "history": history,
        "denoiser_calls": {"teacher": teacher_calls, "training": train_calls, "validation": val_calls},
        "state_dtype": str(p.state_dtype).removeprefix("torch."),
        "seconds": round(seconds, 3),
        "teacher_seconds": round(teacher_s, 3),
        "training_seconds": round(train_s, 3),
    }
    search = {k: v for k, v in search.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    return GridFile(sigmas=[float(s) for s in sigmas], nfe=nfe, method=p.method.name, solver=solver.name,
                    convention=solver.convention, model_kind=cfg.model.kind, model_sha256=p.fingerprint,
                    search=search)
