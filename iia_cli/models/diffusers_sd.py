"""Stable Diffusion (a local diffusers pipeline directory) as a classifier-free-guided latent denoiser.

The latent UNet is a discrete-time VP model, so it maps into EDM's space exactly as
:mod:`iia_cli.models.diffusers_unet` describes (Karras et al. 2022, Table 1, "VP"), on latents:

* state ``x = z / sqrt(abar)`` of shape (unet.in_channels, H / f, W / f), f the VAE's scale factor
  ``2 ** (len(vae.block_out_channels) - 1)`` (8 for SD), H, W by default ``unet.sample_size * f``;
* sigma, model time and ``discrete_sigmas`` from the scheduler's betas (``make_betas``), so
  ``grid.kind: discrete`` gives DDIM's timesteps and DDIM (eta = 0) is Euler in sigma;
* classifier-free guidance (Ho & Salimans 2022) inside the denoiser: one batched UNet call on the
  unconditional (empty or negative prompt) and conditional text embeddings,
  ``out = out_u + w (out_c - out_u)``, then ``D = x - sigma * eps`` (epsilon) or the v-prediction form.
  The guidance is linear in the network output, so guiding eps, v or x0 is the same. Every denoiser call
  costs ``evals_per_call`` = 2 network evaluations (1 when w = 1: no unconditional pass);
* ``guided = True``: IIA-DDIM takes its guided form (eq. 8, one coefficient per step on the guided eps);
* per-prompt seeds: ``condition(seeds)`` gives seed k the embedding of prompt ``k mod P`` of the prompts
  file (:mod:`iia_cli.models.prompts`), so calibration seeds are (prompt, noise) pairs and evaluation seeds
  0..N-1 use the first N captions. Embeddings are cached per prompt (the most recent
  :data:`PROMPT_CACHE` prompts);
* ``decode(x)``: final latents (sigma = 0, so z = x) -> ``vae.decode(z / scaling_factor)`` -> images in
  [-1, 1]. The VAE always runs in float32 (one call per image; half-precision VAEs can overflow).

Coefficients are specific to guidance scale, resolution and prompts (the paper fits them per
model, grid, NFE and guidance scale): all of them
enter :meth:`SDDenoiser.fingerprint`. diffusers and transformers are imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from iia_cli.io.hashing import sha256_of_file as sha256_file
from iia_cli.models.diffusers_unet import (DiffusersParams, DiscreteUNetDenoiser, PredictionType, to_denoised,
                                           TimestepLookup, _parse_enum, _read_json, make_betas, make_discrete_sigmas)
from iia_cli.models.prompts import load_prompts
from iia_cli.models.shared import DIFFUSERS_HINT, TRANSFORMERS_HINT, dtype_name, parse_dtype
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError, describe_error
from iia_cli.runtime.schema import Float, OptInt, RequiredAny, RequiredStr, Str

PROMPT_CACHE = 1024  # text embeddings kept per model (SD 2.1: 77 x 1024 floats each)
DECODE_CHUNK = 8  # latents per VAE decode call (bounds VAE memory at 512 x 512 and above)
COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
_WEIGHT_PREFIXES = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                    "text_encoder": ("model", "pytorch_model")}
# <prefix>[.<variant>][-00001-of-00002].(safetensors|bin)[.index.json]
_WEIGHT_RE = re.compile(r"(?P<prefix>diffusion_pytorch_model|pytorch_model|model)(?:\.(?P<variant>\w+))?"
                        r"(?:-\d+-of-\d+)?\.(?:safetensors|bin)(?:\.index\.json)?")


class SDDenoiser(DiscreteUNetDenoiser):
    """A Stable Diffusion pipeline as a guided :class:`~iia_cli.models.base.Denoiser` on latents (module doc).

    ``class_labels`` of :meth:`__call__` are the conditional text embeddings [B, L, D] from :meth:`condition`.
    """

    guided = True

    def __init__(
        self,
        unet: Any,
        text_encoder: Any,
        tokenizer: Any,
        vae: Any,
        alphas_cumprod: torch.Tensor,
        prompts: Sequence[str],
        *,
        guidance_scale: float,
        negative_prompt: str,
        latent_size: tuple[int, int],
        prediction_type: PredictionType,
        dtype: torch.dtype,
        timestep_lookup: TimestepLookup,
        source_sha256: str,
        prompts_sha256: str,
        device: torch.device,
    ) -> None:
        super().__init__(unet, alphas_cumprod, prediction_type=prediction_type, dtype=dtype,
                         timestep_lookup=timestep_lookup, source_sha256=source_sha256, device=device)
        self.text_encoder, self.tokenizer, self.vae = text_encoder, tokenizer, vae
        self.prompts = list(prompts)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.shape = (int(unet.config.in_channels), *latent_size)
        self.label_dim = 0
        self.evals_per_call = 1 if self.guidance_scale == 1 else 2
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = (latent_size[0] * self.vae_scale_factor, latent_size[1] * self.vae_scale_factor)
        self._prompts_sha256 = prompts_sha256
        self._max_length = int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # prompt index -> [L, D]
        self._uncond = self.encode([negative_prompt])  # [1, L, D]

    # ---- text conditioning

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [n, L, D] in the network dtype, as diffusers' StableDiffusionPipeline computes them
        (padded to the tokenizer's max length, last hidden state of the text encoder)."""
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=self._max_length, truncation=True,
                                return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            out = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return out.to(self.dtype)

    def prompt_of(self, seed: int) -> str:
        """The prompt of a seed: per-prompt seeds, seed k uses prompt k mod P."""
        return self.prompts[int(seed) % len(self.prompts)]

    def condition(self, seeds: Sequence[int]) -> torch.Tensor:
        """Conditional text embeddings [B, L, D] of the seeds' prompts (:meth:`prompt_of`), cached per prompt."""
        index = [int(s) % len(self.prompts) for s in seeds]
        missing = sorted({i for i in index if i not in self._cache})
        if missing:
            for i, emb in zip(missing, self.encode([self.prompts[i] for i in missing])):
                self._cache[i] = emb
        for i in index:
            self._cache.move_to_end(i)
        rows = torch.stack([self._cache[i] for i in index])
        while len(self._cache) > PROMPT_CACHE:
            self._cache.popitem(last=False)
        return rows

    # ---- the denoiser

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Guided ``D(x; sigma)``: x [B, C, h, w] latents in EDM space, sigma [B] (or a scalar),
        class_labels = conditional text embeddings [B, L, D] (:meth:`condition`)."""
        if class_labels is None:
            raise IIARuntimeError("Stable Diffusion needs text embeddings: pass class_labels=model.condition(seeds)")
        batch, in_dtype = x.shape[0], x.dtype
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(batch).cpu()
        t = self._model_time(sigma64).to(device=x.device, dtype=torch.float32)  # [B]
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = sigma64.to(device=x.device, dtype=work).reshape(-1, 1, 1, 1)
        c_in = (1 + sigma64**2).rsqrt().to(device=x.device, dtype=work).reshape(-1, 1, 1, 1)  # sqrt(abar)
        x = x.to(work)
        z = (x * c_in).to(self.dtype)  # network input, z = x / sqrt(1 + sigma^2)
        cond = class_labels.to(device=x.device, dtype=self.dtype)  # [B, L, D]
        with torch.no_grad():
            if self.evals_per_call == 1:
                out = self.unet(z, t, encoder_hidden_states=cond).sample.to(work)
            else:
                # Classifier-free guidance: one batched call on [uncond; cond].
                uncond = self._uncond.to(x.device).expand(batch, -1, -1)
                both = self.unet(torch.cat([z, z]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([uncond, cond])).sample.to(work)
                out_u, out_c = both.chunk(2)
                out = out_u + self.guidance_scale * (out_c - out_u)
        return to_denoised(self.prediction_type, x, s, c_in, out).to(in_dtype)

    def decode(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Latent states at noise level ``sigma`` (0 at the end of sampling) -> images [B, 3, H, W] in [-1, 1],
        float32: ``z = x sqrt(abar(sigma))``, ``vae.decode(z / scaling_factor + shift_factor)``, clamped."""
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        z = x.to(torch.float64) / math.sqrt(1 + float(sigma) ** 2)
        z = (z / float(config.scaling_factor) + shift).to(torch.float32)
        images = []
        with torch.no_grad():
            for part in z.split(DECODE_CHUNK):
                images.append(self.vae.decode(part.to(self.device)).sample.to(torch.float32))
        return torch.cat(images).clamp(-1, 1).to(x.device)

    def fingerprint(self) -> str:
        """sha256 over the weights, configs and tokenizer files (``source_sha256``) and every setting the
        coefficients depend on: guidance scale, resolution, negative prompt, prompts, dtype, prediction type."""
        settings = (self.prediction_type.value, dtype_name(self.dtype), self.timestep_lookup.value,
                    f"w={self.guidance_scale!r}", f"{self.image_size[0]}x{self.image_size[1]}",
                    f"negative={self.negative_prompt}", f"prompts={self._prompts_sha256}")
        text = "\0".join(("diffusers-sd", self._source_sha256, *settings))
        return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Loading.


def _component_dir(path: Path, name: str) -> Path:
    folder = path / name
    if not folder.is_dir():
        raise MissingFileError(f"Stable Diffusion pipeline component {name}/", folder,
                               f"expected a diffusers pipeline directory with {', '.join(COMPONENTS)}")
    return folder


def _weight_files(folder: Path, prefixes: tuple[str, ...]) -> tuple[list[Path], str | None]:
    """The weight files from_pretrained will read, and their variant: the plain files where there are
    any, else the fp16 variant."""
    by_variant: dict[str | None, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _WEIGHT_RE.fullmatch(p.name)
        if p.is_file() and m and m["prefix"] in prefixes:
            by_variant.setdefault(m["variant"], []).append(p)
    for variant in (None, "fp16"):
        if by_variant.get(variant):
            return by_variant[variant], variant
    raise MissingFileError(f"{folder.name} weights", folder / f"{prefixes[0]}.safetensors")


def _import_libraries() -> tuple[Any, Any]:
    try:
        import diffusers
        import transformers
    except ImportError as err:
        hint = DIFFUSERS_HINT if err.name == "diffusers" else TRANSFORMERS_HINT
        raise IIARuntimeError(f"Stable Diffusion needs diffusers and transformers ({err.name} is missing): "
                              f"{hint}") from err
    return diffusers, transformers


@contextlib.contextmanager
def _quiet_loading(*libraries: Any) -> Iterator[None]:
    """No download/loading progress bars from diffusers and transformers while the components load."""
    restore = []
    for lib in libraries:
        logging = lib.utils.logging
        if logging.is_progress_bar_enabled():
            logging.disable_progress_bar()
            restore.append(logging)
    try:
        yield
    finally:
        for logging in restore:
            logging.enable_progress_bar()


def _load(what: str, folder: Path, fn: Any, **kwargs: Any) -> Any:
    try:
        return fn(folder, local_files_only=True, **kwargs)
    except Exception as err:  # diffusers / transformers raise OSError, ValueError, EnvironmentError, ...
        raise IIARuntimeError(f"cannot load {what} from {folder}: {describe_error(err)}") from err


def _resolution(value: Any, default: int, factor: int, key: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
        raise ConfigError(f"model.{key}={value!r} must be a positive multiple of the VAE scale factor {factor}")
    return value


def load_sd_pipeline(
    path: str | Path,
    guidance_scale: float = 7.5,
    prompts: str | Path | None = None,
    height: int | None = None,
    width: int | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    negative_prompt: str = "",
    prediction_type: str | PredictionType | None = None,
    timestep_lookup: str | TimestepLookup = "interp",
) -> SDDenoiser:
    """Load a local Stable Diffusion pipeline directory component by component (``unet/``
    UNet2DConditionModel, ``text_encoder/`` CLIPTextModel, ``tokenizer/`` CLIPTokenizer, ``vae/``
    AutoencoderKL, ``scheduler/scheduler_config.json`` for the betas). ``prompts``: a prompts file
    (:func:`iia_cli.models.prompts.load_prompts`), required. ``prediction_type=None`` takes the scheduler's
    (SD 2.1 base-512: epsilon; SD 2.1 768: v_prediction). Never touches the network."""
    path = Path(path)
    torch_dtype = parse_dtype(dtype)
    lookup = _parse_enum(TimestepLookup, timestep_lookup, "timestep_lookup")
    override = None if prediction_type is None else _parse_enum(PredictionType, prediction_type, "prediction_type")
    try:
        w = float(guidance_scale)
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w):
        raise ConfigError(f"model.guidance_scale={guidance_scale!r} must be a finite number (SD default 7.5)")
    if prompts in (None, ""):
        raise ConfigError("model.prompts is required for Stable Diffusion: a text file with one caption per line, "
                          "or COCO captions JSON")
    negative_prompt = "" if negative_prompt is None else negative_prompt  # `--set model.negative_prompt=`
    if not isinstance(negative_prompt, str):
        raise ConfigError(f"model.negative_prompt={negative_prompt!r} must be a string")
    if not path.is_dir():
        raise MissingFileError("Stable Diffusion pipeline directory", path)
    folders = {name: _component_dir(path, name) for name in COMPONENTS}
    prompt_list = load_prompts(prompts)
    scheduler_file = folders["scheduler"] / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise MissingFileError("scheduler config", scheduler_file)
    schedule = _read_json(scheduler_file)
    if schedule.get("rescale_betas_zero_snr"):
        raise IIARuntimeError(f"{scheduler_file}: rescale_betas_zero_snr (infinite sigma_max) is not supported")
    pred = override or _parse_enum(PredictionType, schedule.get("prediction_type", "epsilon"), "prediction_type",
                                   IIARuntimeError)
    unet_config = _read_json(folders["unet"] / "config.json")
    if unet_config.get("_class_name") != "UNet2DConditionModel":
        raise IIARuntimeError(f"{folders['unet']} holds a {unet_config.get('_class_name')}; "
                              "Stable Diffusion needs a UNet2DConditionModel")
    for key in ("class_embed_type", "addition_embed_type"):
        if unet_config.get(key) is not None:
            raise IIARuntimeError(f"{folders['unet']}: {key}={unet_config[key]!r} (SDXL-style extra conditioning) "
                                  "is not supported")
    weights = {name: _weight_files(folders[name], prefixes) for name, prefixes in _WEIGHT_PREFIXES.items()}

    diffusers, transformers = _import_libraries()
    load_kw = dict(torch_dtype=torch_dtype, low_cpu_mem_usage=False)
    with _quiet_loading(diffusers, transformers):
        unet = _load("UNet2DConditionModel", folders["unet"], diffusers.UNet2DConditionModel.from_pretrained,
                     variant=weights["unet"][1], **load_kw)
        vae = _load("AutoencoderKL", folders["vae"], diffusers.AutoencoderKL.from_pretrained,
                    variant=weights["vae"][1], torch_dtype=torch.float32, low_cpu_mem_usage=False)
        text_encoder = _load("CLIPTextModel", folders["text_encoder"], transformers.CLIPTextModel.from_pretrained,
                             variant=weights["text_encoder"][1])
        tokenizer = _load("CLIPTokenizer", folders["tokenizer"], transformers.CLIPTokenizer.from_pretrained)
    device = torch.device(device)
    unet = unet.eval().requires_grad_(False).to(device)
    vae = vae.eval().requires_grad_(False).to(device)  # loaded in float32
    text_encoder = text_encoder.eval().requires_grad_(False).to(device=device, dtype=torch_dtype)
    if int(unet.config.in_channels) != int(vae.config.latent_channels):
        raise IIARuntimeError(f"{path}: the UNet takes {unet.config.in_channels} channels but the VAE has "
                              f"{vae.config.latent_channels} latent channels (inpainting / depth UNets are not "
                              "supported)")
    if int(unet.config.cross_attention_dim) != int(text_encoder.config.hidden_size):
        raise IIARuntimeError(f"{path}: UNet cross_attention_dim {unet.config.cross_attention_dim} != text encoder "
                              f"hidden_size {text_encoder.config.hidden_size}")

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    size_h, size_w = (size, size) if isinstance(size, int) else tuple(size)
    image_h = _resolution(height, int(size_h) * factor, factor, "height")
    image_w = _resolution(width, int(size_w) * factor, factor, "width")

    digest = hashlib.sha256()
    files = [f for name in ("unet", "text_encoder", "vae") for f in [folders[name] / "config.json", *weights[name][0]]]
    files += sorted(p for p in folders["tokenizer"].iterdir() if p.is_file()) + [scheduler_file]
    for file in files:
        digest.update(f"{file.parent.name}/{file.name}\0{sha256_file(file)}\0".encode())
    prompts_sha = sha256_file(prompts)
    alphas_cumprod, _ = make_discrete_sigmas(make_betas(schedule))
    return SDDenoiser(
        unet, text_encoder, tokenizer, vae, alphas_cumprod, prompt_list,
        guidance_scale=w, negative_prompt=negative_prompt, latent_size=(image_h // factor, image_w // factor),
        prediction_type=pred, dtype=torch_dtype, timestep_lookup=lookup, source_sha256=digest.hexdigest(),
        prompts_sha256=prompts_sha, device=device,
    )


class SDParams(DiffusersParams):
    """``model.kind: diffusers-sd``: a local Stable Diffusion pipeline with classifier-free guidance."""

    kind: Literal["diffusers-sd"] = "diffusers-sd"
    path: RequiredStr = Field(description="the pipeline directory (unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
    prompts: RequiredAny = Field(description="a prompts file (one caption a line) or a list of prompts")
    guidance_scale: Float = Field(7.5, description="classifier-free guidance weight w")
    negative_prompt: Str = Field("", description="the unconditional prompt")
    height: OptInt = Field(None, description="image height in pixels (default: the UNet's sample size x the VAE "
                                             "scale factor)")
    width: OptInt = Field(None, description="image width in pixels (default: the UNet's sample size x the VAE "
                                            "scale factor)")


def build(p: SDParams, device: torch.device) -> SDDenoiser:
    return load_sd_pipeline(p.path, guidance_scale=p.guidance_scale, prompts=p.prompts, height=p.height, width=p.width,
                            dtype=p.dtype, device=device, negative_prompt=p.negative_prompt,
                            prediction_type=p.prediction_type, timestep_lookup=p.timestep_lookup)
