"""diffusers ``UNet2DModel`` checkpoints (e.g. DDPM CIFAR-10) as denoisers in EDM's space.

A discrete-time VP model with training schedule ``abar_t`` (t = 0..T-1) maps into EDM's parameterisation
exactly (Karras et al. 2022, Table 1, "VP"):

* noise level ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (``discrete_sigmas``, ascending in t);
* state ``x = z / sqrt(abar)``, so the network input is ``z = x / sqrt(1 + sigma^2)``;
* model time ``t(sigma)`` by linear interpolation of ``log sigma`` over the training sigmas, which gives
  exactly the integer t at a training sigma (values within 1e-4 of an integer are snapped to it, so that
  float32 round trips of training sigmas still hit the model's own timesteps);
* denoiser, by the checkpoint's ``prediction_type``:
  epsilon: ``D = x - sigma * eps``;
  v_prediction (``v = sqrt(abar) eps - sqrt(1 - abar) x0``): ``D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v``;
  sample: ``D = x0``.

In this space DDIM (eta = 0) is exactly Euler in sigma: ``x' = x + (sigma' - sigma) (x - D) / sigma``.
diffusers (a core dependency) is imported lazily, on first use.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from iia_cli.io.hashing import sha256_of_file as sha256_file
from iia_cli.models.shared import DIFFUSERS_HINT, dtype_name, parse_dtype
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError, describe_error
from iia_cli.runtime.schema import NETWORK_DTYPES, Choice, ModelParams, OptChoice, RequiredStr

_WEIGHTS_PREFIX = "diffusion_pytorch_model"
_SNAP_T = 1e-4  # |t - round(t)| below this is snapped to the integer timestep
# Scheduler defaults when a bare UNet directory has no scheduler_config.json (DDPM, Ho et al. 2020).
_DEFAULT_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


class PredictionType(str, enum.Enum):
    """What the network predicts (diffusers' ``prediction_type``)."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"


class TimestepLookup(str, enum.Enum):
    """How a sigma becomes the model time fed to the network."""

    INTERP = "interp"  # fractional t, linear in log sigma between training sigmas
    NEAREST = "nearest"  # the nearest training timestep (in log sigma)


def _parse_enum(enum_cls: type[enum.Enum], value: Any, what: str, error: type[Exception] = ConfigError) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(m.value for m in enum_cls)
        raise error(f"unknown {what} {value!r}; valid: {valid}") from None


# --------------------------------------------------------------------------------------------------
# Noise schedules.


def make_betas(schedule: dict[str, Any]) -> torch.Tensor:
    """Betas [T] (float64) from a diffusers scheduler config, computed by diffusers itself.

    The scheduler class named by the config's ``_class_name`` (DDPMScheduler when absent: a bare UNet
    directory) is built from the config's schedule keys (``num_train_timesteps``, ``beta_start``,
    ``beta_end``, ``beta_schedule``, ``trained_betas``) and its ``betas`` are returned, so every schedule that
    scheduler knows (linear, scaled_linear, squaredcos_cap_v2, sigmoid, ...) is the checkpoint's own.
    """
    try:
        import diffusers
    except ImportError as err:
        raise IIARuntimeError(f"cannot import diffusers ({describe_error(err)}): {DIFFUSERS_HINT}") from err
    name = str(schedule.get("_class_name") or "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and name.endswith("Scheduler")):
        raise IIARuntimeError(f"scheduler config names {name!r}, not a scheduler of diffusers {diffusers.__version__}")
    accepted = inspect.signature(cls.__init__).parameters
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    kwargs = {k: schedule[k] for k in keys if k in schedule and k in accepted}
    kind = schedule.get("beta_schedule", "linear")
    try:
        scheduler = cls(**kwargs)
    except NotImplementedError as err:  # diffusers' answer to an unknown beta_schedule
        raise IIARuntimeError(f"unsupported beta_schedule {kind!r} for {name}: {describe_error(err)}") from None
    except Exception as err:  # noqa: BLE001 -- bad values in a foreign config
        raise IIARuntimeError(f"cannot build {name} from the scheduler config: {describe_error(err)}") from None
    betas = getattr(scheduler, "betas", None)
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1:
        raise IIARuntimeError(f"{name} has no discrete betas: only discrete-time (VP) schedulers are supported")
    return betas.to(torch.float64)


def make_discrete_sigmas(betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphas_cumprod, sigmas)``, float64 [T]: ``abar_t = prod_{s<=t} (1 - beta_s)``,
    ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (ascending in t)."""
    abar = torch.cumprod(1 - betas.to(torch.float64), dim=0)
    return abar, ((1 - abar) / abar).sqrt()


# --------------------------------------------------------------------------------------------------
# Locating the files.


def _locate(path: Path) -> tuple[Path, Path | None]:
    """``(unet_dir, scheduler_config or None)`` for a pipeline directory or a bare UNet directory."""
    if (path / "unet" / "config.json").is_file():
        scheduler = path / "scheduler" / "scheduler_config.json"
        return path / "unet", scheduler if scheduler.is_file() else None
    if (path / "config.json").is_file():
        scheduler = path / "scheduler_config.json"
        return path, scheduler if scheduler.is_file() else None
    raise MissingFileError(
        "diffusers UNet2DModel directory", path, "expected config.json + weights, or unet/ and scheduler/ subfolders"
    )


def _weight_files(unet_dir: Path) -> list[Path]:
    files = sorted(p for p in unet_dir.iterdir() if p.is_file() and p.name.startswith(_WEIGHTS_PREFIX))
    if not files:
        raise MissingFileError("UNet weights", unet_dir / f"{_WEIGHTS_PREFIX}.safetensors")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise IIARuntimeError(f"cannot read {path}: {describe_error(err)}") from err


def _import_unet2d() -> Any:
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise IIARuntimeError(f"cannot import diffusers ({describe_error(err)}): {DIFFUSERS_HINT}") from err
    return UNet2DModel


# --------------------------------------------------------------------------------------------------
# The adapter.


def to_denoised(prediction_type: PredictionType, x: torch.Tensor, s: torch.Tensor, c_in: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """Network output -> D(x; sigma) in EDM space, with c_in = 1 / sqrt(1 + sigma^2):
    eps: ``x - sigma eps``; v: ``x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v``; sample: ``x0``."""
    if prediction_type is PredictionType.EPSILON:
        return x - s * out
    if prediction_type is PredictionType.V_PREDICTION:
        return x * c_in**2 - s * c_in * out
    return out


# Samples per network call on the CPU, whatever batch the solver hands over: on the 2-core CPU the testbed UNet
# runs 1.4x to 1.7x the calls per second in calls of 32 as in calls of 128 (benchmarks/cpu_chunks.py: the
# activations stay in cache), with outputs equal bit for bit there; calls of 16 are faster still but differ from
# larger calls in the last bits for some inputs. A GPU gets the solver's batch.
CPU_CHUNK = 32


class DiscreteUNetDenoiser:
    """A discrete-time VP ``UNet2DModel`` as a :class:`~iia_cli.models.base.Denoiser` (module doc).

    ``discrete_sigmas`` / ``alphas_cumprod``: float64 [T] on the CPU, index = training timestep.
    Class-conditional UNets (``num_class_embeds``) take one-hot ``class_labels`` [B, label_dim]; the network
    receives their argmax. A UNet with twice the image channels out (learned variance) uses the first half.
    """

    def __init__(
        self,
        unet: Any,
        alphas_cumprod: torch.Tensor,
        *,
        prediction_type: PredictionType,
        dtype: torch.dtype,
        timestep_lookup: TimestepLookup,
        source_sha256: str,
        device: torch.device,
    ) -> None:
        config = unet.config
        size = config.sample_size
        if size is None:
            raise IIARuntimeError("UNet config.json has no sample_size")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        # channels_last on the CPU: 1.2x the calls per second in calls of CPU_CHUNK (benchmarks/cpu_chunks.py):
        # outputs differ from the default layout's in float32 rounding (at most 1.4e-5 relative there). A GPU
        # keeps the layout the network came in (sampler.channels_last asks for it there).
        on_cpu = torch.device(device).type == "cpu"
        self._layout = torch.channels_last if on_cpu else torch.contiguous_format
        self.unet = unet.to(memory_format=self._layout)
        self.chunk: int | None = CPU_CHUNK if on_cpu else None  # samples per network call (None: the whole batch)
        self.device = device
        self.prediction_type = prediction_type
        self.dtype = dtype
        self.timestep_lookup = timestep_lookup
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.discrete_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self._log_sigmas = self.discrete_sigmas.log()
        self.shape: tuple[int, int, int] = (int(config.in_channels), int(height), int(width))
        self.sigma_min = float(self.discrete_sigmas[0])
        self.sigma_max = float(self.discrete_sigmas[-1])
        self.label_dim = int(config.num_class_embeds or 0)
        self._integer_t = config.time_embedding_type == "learned"  # an nn.Embedding over timesteps
        self._source_sha256 = source_sha256

    # ---- model time <-> sigma

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Continuous model time, float64: linear interpolation of ``log sigma`` over the training sigmas,
        clamped to [0, T-1]. Exactly the integer t at a training sigma, also one given in float32 (a t within
        1e-4 of an integer is snapped to it)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu().log()
        log_sigma = log_sigma.clamp(float(self._log_sigmas[0]), float(self._log_sigmas[-1]))
        hi = torch.searchsorted(self._log_sigmas, log_sigma.reshape(-1)).clamp(1, len(self._log_sigmas) - 1)
        lo = hi - 1
        frac = (log_sigma.reshape(-1) - self._log_sigmas[lo]) / (self._log_sigmas[hi] - self._log_sigmas[lo])
        t = lo + frac
        nearest = t.round()
        return torch.where((t - nearest).abs() < _SNAP_T, nearest, t).reshape(log_sigma.shape)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at continuous model time t in [0, T-1], float64: ``exp`` of the linear interpolation of
        ``log sigma`` between the neighbouring training timesteps (inverse of :meth:`sigma_to_t`)."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(0, len(self._log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self._log_sigmas) - 2)
        frac = t - lo
        sigma = (self._log_sigmas[lo] + frac * (self._log_sigmas[lo + 1] - self._log_sigmas[lo])).exp()
        # Exactly the training sigma at an integer t (exp(log(s)) may differ from s in the last bit).
        sigma = torch.where(frac == 0, self.discrete_sigmas[lo], sigma)
        return torch.where(frac == 1, self.discrete_sigmas[lo + 1], sigma)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The nearest training sigma in log space, in ``sigma``'s dtype and device."""
        sigma = torch.as_tensor(sigma)
        index = self.sigma_to_t(sigma).round().long()
        dtype = sigma.dtype if sigma.is_floating_point() else None
        return self.discrete_sigmas[index].to(device=sigma.device, dtype=dtype)

    def _model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        t = self.sigma_to_t(sigma)
        if self._integer_t:
            return t.round().long()
        return t.round() if self.timestep_lookup is TimestepLookup.NEAREST else t

    # ---- the denoiser

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``D(x; sigma)``: x [B, C, H, W] in EDM space, sigma [B] (or a scalar), one-hot class_labels."""
        batch, in_dtype = x.shape[0], x.dtype
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(batch).cpu()
        t = self._model_time(sigma64).to(x.device)  # [B]
        t = t if self._integer_t else t.to(torch.float32)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = sigma64.to(device=x.device, dtype=work).reshape(-1, 1, 1, 1)
        c_in = (1 + sigma64**2).rsqrt().to(device=x.device, dtype=work).reshape(-1, 1, 1, 1)  # sqrt(abar)
        x = x.to(work)
        labels = None
        if self.label_dim:
            if class_labels is None:
                raise IIARuntimeError(f"the UNet is class-conditional (label_dim={self.label_dim}): pass class labels")
            labels = class_labels.to(x.device).reshape(batch, -1).argmax(dim=1)
        z = (x * c_in).to(self.dtype)  # network input, z = x / sqrt(1 + sigma^2)
        out = self._network(z, t, labels).to(work)
        out = out[:, : self.shape[0]]  # learned-variance UNets: first half is the prediction
        return to_denoised(self.prediction_type, x, s, c_in, out).to(in_dtype)

    def _network(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The UNet's output, ``chunk`` samples per call (``CPU_CHUNK`` on the CPU, the whole batch on a GPU)."""
        step = self.chunk or z.shape[0]
        z = z.contiguous(memory_format=self._layout)
        outs = [self.unet(z[i : i + step], t[i : i + step],
                          class_labels=None if labels is None else labels[i : i + step]).sample
                for i in range(0, z.shape[0], step)]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).contiguous()

    def fingerprint(self) -> str:
        """sha256 over the weight files, config files and adapter settings."""
        settings = (self.prediction_type.value, dtype_name(self.dtype), self.timestep_lookup.value)
        text = "\0".join(("diffusers", self._source_sha256, *settings))
        return hashlib.sha256(text.encode()).hexdigest()


def load_diffusers_unet(
    path: str | Path,
    prediction_type: str | PredictionType | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    timestep_lookup: str | TimestepLookup = "interp",
) -> DiscreteUNetDenoiser:
    """Load a local ``UNet2DModel`` directory (bare, or a pipeline with ``unet/`` and ``scheduler/``), or the
    built-in testbed network ``builtin:mnist-ddpm`` (:mod:`iia_cli.models.testbed`).

    The schedule comes from ``scheduler_config.json`` (pipeline: ``scheduler/``; bare: next to
    ``config.json``), else DDPM's defaults (linear betas 1e-4..0.02, T = 1000, epsilon).
    ``prediction_type=None`` takes the scheduler's. Never touches the network (``HF_HUB_OFFLINE=1``,
    ``local_files_only``).
    """
    from iia_cli.models.testbed import resolve_checkpoint

    path = resolve_checkpoint(path)  # builtin:mnist-ddpm is the shipped testbed network
    torch_dtype = parse_dtype(dtype)
    lookup = _parse_enum(TimestepLookup, timestep_lookup, "timestep_lookup")
    override = None if prediction_type is None else _parse_enum(PredictionType, prediction_type, "prediction_type")
    if not path.is_dir():
        raise MissingFileError("diffusers UNet2DModel directory", path)
    unet_dir, scheduler_file = _locate(path)
    weights = _weight_files(unet_dir)
    schedule = dict(_DEFAULT_SCHEDULE, **(_read_json(scheduler_file) if scheduler_file else {}))
    if schedule.get("rescale_betas_zero_snr"):
        raise IIARuntimeError(f"{scheduler_file}: rescale_betas_zero_snr (infinite sigma_max) is not supported")
    pred = override or _parse_enum(PredictionType, schedule["prediction_type"], "prediction_type", IIARuntimeError)
    config = _read_json(unet_dir / "config.json")
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise IIARuntimeError(f"{unet_dir} holds a {config['_class_name']}; only UNet2DModel is supported")
    if config.get("time_embedding_type", "positional") == "fourier":
        raise IIARuntimeError(f"{unet_dir}: Fourier time embeddings (score-SDE VE models) are not supported")
    if config.get("class_embed_type") is not None:
        raise IIARuntimeError(f"{unet_dir}: class_embed_type={config['class_embed_type']!r} is not supported")

    UNet2DModel = _import_unet2d()
    variant = "fp16" if all(".fp16." in w.name for w in weights) else None
    try:
        unet = UNet2DModel.from_pretrained(
            unet_dir, local_files_only=True, variant=variant, torch_dtype=torch_dtype, low_cpu_mem_usage=False
        )
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError, ...
        raise IIARuntimeError(f"cannot load UNet2DModel from {unet_dir}: {describe_error(err)}") from err
    device = torch.device(device)
    unet = unet.eval().requires_grad_(False).to(device)
    out_channels = int(unet.config.out_channels)
    if out_channels not in (unet.config.in_channels, 2 * unet.config.in_channels):
        raise IIARuntimeError(f"{unet_dir}: out_channels={out_channels} does not match in_channels")

    alphas_cumprod, _ = make_discrete_sigmas(make_betas(schedule))
    digest = hashlib.sha256()
    for file in [*weights, unet_dir / "config.json"]:
        digest.update(f"{file.name}\0{sha256_file(file)}\0".encode())
    digest.update(f"scheduler\0{sha256_file(scheduler_file) if scheduler_file else 'default'}".encode())
    return DiscreteUNetDenoiser(
        unet,
        alphas_cumprod,
        prediction_type=pred,
        dtype=torch_dtype,
        timestep_lookup=lookup,
        source_sha256=digest.hexdigest(),
        device=device,
    )


class DiffusersParams(ModelParams):
    """``model.kind: diffusers``: a diffusers UNet2DModel directory (or ``builtin:mnist-ddpm``)."""

    kind: Literal["diffusers"] = "diffusers"
    path: RequiredStr = Field(description="UNet2DModel or pipeline directory, or builtin:mnist-ddpm")
    prediction_type: OptChoice(*(m.value for m in PredictionType)) = Field(
        None, description="what the network predicts (default: the scheduler config's)")
    dtype: Choice(*NETWORK_DTYPES) = Field("float32", description="network dtype (sampler.dtype / --dtype overrides)")
    timestep_lookup: Choice(*(m.value for m in TimestepLookup)) = Field(
        "interp", description="sigma -> model time: interp (fractional t) or nearest (a training timestep)")


def build(p: DiffusersParams, device: torch.device) -> DiscreteUNetDenoiser:
    return load_diffusers_unet(p.path, prediction_type=p.prediction_type, dtype=p.dtype, device=device,
                               timestep_lookup=p.timestep_lookup)
