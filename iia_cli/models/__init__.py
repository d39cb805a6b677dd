"""Model registry: config section ``model`` -> a denoiser following :class:`~iia_cli.models.base.Denoiser`."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..errors import ConfigError, IIARuntimeError
from .base import Denoiser, label_dim, model_dtype

MODEL_KINDS_HELP = "gaussian | gmm-mnist | python | edm-pkl | diffusers | diffusers-sd"


def load_model(kind: str, params: dict[str, Any], device: torch.device | str = "cpu") -> Any:
    """Build or load the model of a config's ``model`` section on ``device``."""
    device = torch.device(device)
    p = dict(params)
    if kind == "gaussian":
        from .gaussian import GaussianModel

        model = GaussianModel(shape=tuple(p["shape"]), mean=p.get("mean"), std=float(p["std"]),
                              sigma_min=float(p["sigma_min"]), sigma_max=float(p["sigma_max"]))
    elif kind == "gmm-mnist":
        from .gmm import GMMDenoiser

        kw = {k: p[k] for k in ("rank", "tau2") if p.get(k) is not None}
        model = GMMDenoiser.from_mnist(components=int(p["components"]), conditional=bool(p["conditional"]),
                                       mle_noise=bool(p["mle_noise"]), **kw)
    elif kind == "python":
        from .factory import load_factory_model

        model = load_factory_model(str(p["factory"]), p.get("kwargs") or {})
    elif kind == "edm-pkl":
        from .edm_pkl import load_edm_pickle

        model = load_edm_pickle(p["path"], key=p.get("key", "ema"), dtype=p.get("dtype", "float32"), device=device,
                                trust_code=p.get("trust_code", False))
    elif kind == "diffusers":
        from .diffusers_unet import load_diffusers_unet

        model = load_diffusers_unet(p["path"], prediction_type=p.get("prediction_type"), dtype=p.get("dtype", "float32"),
                                    device=device, timestep_lookup=p.get("timestep_lookup", "interp"))
    elif kind == "diffusers-sd":
        from .diffusers_sd import load_sd_pipeline

        model = load_sd_pipeline(p["path"], guidance_scale=p.get("guidance_scale", 7.5), prompts=p.get("prompts"),
                                 height=p.get("height"), width=p.get("width"), dtype=p.get("dtype", "float32"),
                                 device=device, negative_prompt=p.get("negative_prompt", ""),
                                 prediction_type=p.get("prediction_type"),
                                 timestep_lookup=p.get("timestep_lookup", "interp"))
    else:
        raise ConfigError(f"model.kind={kind!r} is not valid; choose one of {MODEL_KINDS_HELP}")
    if hasattr(model, "to") and kind in ("gaussian", "gmm-mnist"):
        model = model.to(device)
    for attr in ("shape", "sigma_min", "sigma_max"):
        if not hasattr(model, attr):
            raise IIARuntimeError(f"model of kind {kind} has no attribute {attr!r}")
    return model


def model_fingerprint(model: Any, kind: str, params: dict[str, Any]) -> str:
    """sha256 identifying the model: checkpoint bytes / fitted parameters, plus the adapter settings."""
    inner = getattr(model, "_iia_fingerprint", None)
    if inner is None and callable(getattr(model, "fingerprint", None)):
        inner = model.fingerprint()
    if inner is None:
        raise IIARuntimeError(f"model of kind {kind} cannot be fingerprinted")
    h = hashlib.sha256()
    h.update(kind.encode())
    settings = {k: v for k, v in params.items() if k not in ("path", "prompts", "trust_code")}  # bytes identify files
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(inner).encode())
    return h.hexdigest()


__all__ = ["Denoiser", "label_dim", "load_model", "model_dtype", "model_fingerprint"]
