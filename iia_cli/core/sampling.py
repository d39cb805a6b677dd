"""The one sampling loop for every solver, per-seed noise, and batching.

An image depends only on its seed: its noise comes from its own generator
(``torch.Generator(device).manual_seed(seed)``; a class label, when needed, is drawn next from the same
generator, as EDM does), and the solver treats each image independently (bit for bit for the built-in
models; up to float32 rounding in networks whose summation order depends on the batch size). Solver state is float64 on the
CPU (float32 allowed on GPUs); the model runs in its own dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from iia_cli.models.base import Denoiser, capabilities, label_dim, model_dtype
from iia_cli.runtime import devices
from iia_cli.runtime.errors import ConfigError, IIARuntimeError
from iia_cli.runtime.limits import MAX_SEEDS, SEED_LIMIT

from .methods import Method
from .solvers.base import History, Record, push

Coefficients = list[list[float]]  # per step; an empty list = uncorrected step




def _seed_range_error(text: str) -> ConfigError:
    return ConfigError(f"seeds {text!r} are out of range: seeds are integers 0 .. 2^63-1 (9223372036854775807), "
                       f"at most {MAX_SEEDS:,} per command")


def parse_seeds(spec: Any) -> list[int]:
    """'0-999', '0,3,10-19', 7 or a list -> a list of distinct ints in 0 .. 2^63-1 (order kept), at most
    MAX_SEEDS of them."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 <= spec < SEED_LIMIT:
            raise _seed_range_error(str(spec))
        return [spec]
    if isinstance(spec, (list, tuple)):
        seeds = [s for item in spec for s in parse_seeds(item)]
        if len(seeds) > MAX_SEEDS:
            raise _seed_range_error(f"{len(seeds)} seeds")
        return seeds
    text = str(spec).strip()
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not m:
            raise ConfigError(f"seeds {text[:60]!r} are not valid; write e.g. 0-999 or 0,5,10-19")
        if max(len(g or "") for g in m.groups()) > 19:  # > 2^63 (and int() refuses > 4300 digits)
            raise _seed_range_error(text if len(text) <= 60 else text[:57] + "...")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"seed range {part!r} is descending; write {hi}-{lo}")
        if hi >= SEED_LIMIT or len(seeds) + (hi - lo + 1) > MAX_SEEDS:
            raise _seed_range_error(text if len(text) <= 60 else text[:57] + "...")
        seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ConfigError("no seeds given; write e.g. --seeds 0-63")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {text!r} repeat a seed")
    return seeds


def format_seeds(seeds: Sequence[int]) -> str:
    """Compact text form of a seed list: [0,1,2,5] -> '0-2,5'."""
    parts, start = [], None
    for k, s in enumerate(seeds):
        if start is None:
            start = s
        if k + 1 == len(seeds) or seeds[k + 1] != s + 1:
            parts.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ",".join(parts)


def resolve_device(device: str) -> torch.device:
    """``sampler.device`` as a torch device (:func:`iia_cli.runtime.devices.resolve_device`)."""
    return devices.resolve_device(device, "use --set sampler.device=cpu")


def resolve_state_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float64 if device.type == "cpu" else torch.float32
    return {"float64": torch.float64, "float32": torch.float32}[name]


def noise_and_conditioning(model: Denoiser, seeds: Sequence[int], device: torch.device,
                           class_label: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-seed noise and the conditioning the model gets with it: one-hot class labels drawn from each
    seed's generator, or, for models with a ``condition(seeds)`` hook (text-to-image), its tensor."""
    noise, labels = make_noise(seeds, model.shape, device, label_dim(model), class_label)
    condition = capabilities(model).condition
    if condition is not None:
        labels = condition(list(seeds))
    return noise, labels


def to_images(model: Denoiser, x: torch.Tensor) -> torch.Tensor:
    """Final solver states -> images in [-1, 1]: the model's ``decode`` (e.g. a VAE) where it has one."""
    decode = capabilities(model).decode
    return x if decode is None else decode(x)


def make_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device, n_labels: int = 0,
               class_label: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit noise [B, C, H, W] (float32, like EDM) and one-hot labels [B, n_labels] (or None), per seed."""
    noise, labels = [], []
    for seed in seeds:
        g = torch.Generator(device).manual_seed(int(seed))
        noise.append(torch.randn(tuple(shape), generator=g, device=device))
        if n_labels:
            drawn = torch.randint(n_labels, (1,), generator=g, device=device)
            labels.append(int(drawn) if class_label is None else int(class_label))
    onehot = None
    if n_labels:
        if class_label is not None and not 0 <= class_label < n_labels:
            raise ConfigError(f"class label {class_label} is out of range; choose 0..{n_labels - 1}")
        onehot = torch.nn.functional.one_hot(torch.tensor(labels, device=device), n_labels).to(torch.float32)
    return torch.stack(noise), onehot


class BoundDenoiser:
    """``denoise(x, sigma)`` for one batch: casts to the model's dtype and back, adds the class labels,
    and counts calls (one call = one NFE for every image of the batch)."""

    def __init__(self, model: Denoiser, class_labels: torch.Tensor | None = None) -> None:
        self.model, self.class_labels = model, class_labels
        self.dtype = model_dtype(model)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        # Half-precision networks get float32 input: their adapters cast inside (after EDM's c_in scaling),
        # so the solver state is never rounded to 16 bits.
        full = self.dtype in (torch.float32, torch.float64)
        x_in = x.to(self.dtype if full else torch.float32)
        sig_dtype = self.dtype if full else torch.float32
        labels = self.class_labels
        if labels is not None and labels.shape[0] != x.shape[0]:
            raise IIARuntimeError("internal: class labels do not match the batch")
        if tracks_grad(x, sigma):
            # A learned grid (iia_cli.experiments.ld3): the call stays in the autograd graph, in x and in sigma. Whether
            # the model itself is differentiable is the model's affair (the analytic models are).
            sig = torch.as_tensor(sigma).to(device=x.device, dtype=sig_dtype).reshape(()).expand(x.shape[0])
            out = self.model(x_in, sig, labels) if labels is not None else self.model(x_in, sig)
            return out.to(x.dtype)
        sig = torch.full((x.shape[0],), float(sigma), dtype=sig_dtype, device=x.device)
        with torch.no_grad():
            out = self.model(x_in, sig, labels) if labels is not None else self.model(x_in, sig)
        return out.to(x.dtype)


def tracks_grad(x: torch.Tensor, sigma: Any) -> bool:
    """Whether a denoiser call must stay differentiable: grad mode is on and the state or sigma requires grad.
    Sampling never does (its states and sigmas are plain), so it keeps the ``no_grad`` path bit for bit."""
    return torch.is_grad_enabled() and (x.requires_grad
                                        or (isinstance(sigma, torch.Tensor) and sigma.requires_grad))


def apply_correction(x_next: torch.Tensor, quantities: list[torch.Tensor] | None, coeffs: Sequence[float]) -> torch.Tensor:
    """base update + sum_k c_k q_k."""
    if not quantities:
        return x_next
    if len(coeffs) != len(quantities):
        raise IIARuntimeError(f"coefficient file has {len(coeffs)} coefficients for a step with "
                              f"{len(quantities)} IIA quantities")
    for c, q in zip(coeffs, quantities):
        x_next = x_next + float(c) * q
    return x_next


@dataclass
class Step:
    """One proposed step from state x_i: the base solver's update, its record (what later steps and the IIA
    quantities read) and the IIA quantities q_k (None: an uncorrected step, or quantities not asked for)."""

    x_base: torch.Tensor
    record: Record
    quantities: list[torch.Tensor] | None


def propose(method: Method, denoise: Any, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History,
            with_quantities: bool = True) -> Step:
    """Step i of ``method`` from state x: the base update and (for IIA methods) the quantities of its correction.
    The step sees the solver's denoiser (:meth:`~iia_cli.core.solvers.base.Solver.denoiser`: ``denoise`` itself, or with
    ``sampler.thresholding`` / ``sampler.afs`` applied), so IIA's quantities and fine reference read the same D."""
    solver = method.solver
    res = solver.step(solver.denoiser(denoise, sigmas, i, history), x, sigmas, i, history)
    q = method.quantities(x, res.record, history, sigmas, i) if with_quantities and method.is_iia else None
    return Step(res.x_next, res.record, q)


def commit(step: Step, history: History, coeffs_i: Sequence[float] | None = None) -> tuple[torch.Tensor, History]:
    """The IIA update ``x_{i+1} = base update + sum_k c_k q_k`` (the base update when ``coeffs_i`` is None
    or the step is uncorrected) and the history with this step's record."""
    x_next = step.x_base if coeffs_i is None else apply_correction(step.x_base, step.quantities, coeffs_i)
    return x_next, push(history, step.record)


def corrected_steps(method: Method, sigmas: torch.Tensor) -> dict[int, str]:
    """Which steps of ``sigmas`` an IIA method leaves uncorrected, and why: {step: reason}. A dry run of the
    base solver with a zero denoiser on one pixel (the quantities exist or not regardless of the model): the
    final denoise step to sigma = 0 is never corrected, and a step whose quantities read earlier steps is not
    corrected before they exist."""
    sig = sigmas.to(torch.float64)
    x, history, skipped = torch.ones(1, 1, 1, 1, dtype=torch.float64) * float(sig[0]), (), {}
    for i in range(len(sig) - 1):
        step = propose(method, lambda z, sigma: torch.zeros_like(z), x, sig, i, history)
        if step.quantities is None:
            skipped[i] = ("the final step to sigma 0 is never corrected" if float(sig[i + 1]) == 0
                          else "its quantities need earlier steps")
        x, history = commit(step, history)
    return skipped


def uncorrected_text(skipped: dict[int, str]) -> str:
    """``step 0 (its quantities need earlier steps), step 7 (the final step ...)`` with runs of one reason merged."""
    groups: list[tuple[list[int], str]] = []
    for i, why in sorted(skipped.items()):
        if groups and groups[-1][1] == why and groups[-1][0][-1] == i - 1:
            groups[-1][0].append(i)
        else:
            groups.append(([i], why))
    return "; ".join((f"step {g[0]}" if len(g) == 1 else f"steps {g[0]}-{g[-1]}") + f": {why}" for g, why in groups)


def advance(method: Method, denoise: Any, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History,
            coeffs: Coefficients | None = None) -> tuple[torch.Tensor, History, Step]:
    """One step: base solver step -> IIA quantities -> correction -> history. Sampling, the calibration pass,
    its fine reference and its teacher all go through this sequence (calibration splits it into
    :func:`propose` and :func:`commit` to fit the coefficients in between).
    Autograd-friendly: with ``sigmas`` that require grad (the solvers then compute in 0-dim tensors, not floats) or
    a state that does, the step is differentiable in both (a learned grid, :mod:`iia_cli.experiments.ld3`); plain sigmas
    and states take exactly the float and ``no_grad`` path of sampling.
    Returns (x_{i+1}, history after the step, the proposed step)."""
    step = propose(method, denoise, x, sigmas, i, history, with_quantities=coeffs is not None)
    x_next, history = commit(step, history, coeffs[i] if coeffs is not None and method.is_iia else None)
    return x_next, history, step


def run_steps(method: Method, denoise: Any, x: torch.Tensor, sigmas: torch.Tensor,
              coeffs: Coefficients | None = None, history: History = (), start: int = 0,
              stop: int | None = None, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The sampling loop: steps ``start .. stop - 1`` of ``sigmas`` from state x. IIA methods add their
    correction when ``coeffs`` are given (None = zero coefficients = the base solver). ``on_step(done, total)``
    is called after each step (a progress heartbeat inside a long batch)."""
    stop = len(sigmas) - 1 if stop is None else stop
    for i in range(start, stop):
        x, history, _ = advance(method, denoise, x, sigmas, i, history, coeffs)
        if on_step is not None:
            on_step(i + 1 - start, stop - start)
    return x


def sample_batches(model: Denoiser, method: Method, sigmas: torch.Tensor, seeds: Sequence[int], batch: int,
                   coeffs: Coefficients | None = None, device: torch.device | str = "cpu",
                   state_dtype: torch.dtype = torch.float64, class_label: int | None = None,
                   progress: Any = None, heartbeat: Any = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (seeds, final states [b, C, H, W] in state_dtype) batch by batch, in seed order. ``progress``
    (an ImageProgress) advances per batch; ``heartbeat`` (default: ``progress``) hears of every step inside a
    batch, so that a long batch is not silent.

    Raises IIARuntimeError (naming method, NFE and seeds) if a batch contains NaN or Inf."""
    if batch < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch}")
    device = torch.device(device)
    sig = sigmas.to(torch.float64)
    n_batches = math.ceil(len(seeds) / batch)
    for b in range(n_batches):
        chunk = list(seeds[b * batch : (b + 1) * batch])
        noise, labels = noise_and_conditioning(model, chunk, device, class_label)
        x = noise.to(state_dtype) * float(sig[0])
        beat = heartbeat if heartbeat is not None else progress
        on_step = (lambda i, n, size=len(chunk), beat=beat: beat.in_batch(size, i / n)) if beat is not None else None
        x = run_steps(method, BoundDenoiser(model, labels), x, sig, coeffs, on_step=on_step)
        if not bool(torch.isfinite(x).all()):
            bad = [s for s, ok in zip(chunk, torch.isfinite(x).flatten(1).all(1).tolist()) if not ok]
            raise IIARuntimeError(f"{method.name} at NFE {method.solver.nfe_of_grid(sig)}: non-finite samples (NaN/Inf) for seeds "
                                  f"{bad[:10]}{'...' if len(bad) > 10 else ''}; the run stopped and wrote no FID")
        if progress is not None:
            progress.advance(len(chunk))
        yield chunk, x
