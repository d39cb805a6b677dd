"""Model registry: config section ``model`` -> a denoiser following :class:`~iia_cli.models.base.Denoiser`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from iia_cli.runtime.errors import ConfigError, IIARuntimeError
from iia_cli.runtime.schema import ModelParams, config_error
from . import diffusers_sd, diffusers_unet, edm_pkl, factory, gaussian, gmm

@dataclass(frozen=True)
class ModelKind:
    """A model kind: its ``model`` section (a params model with defaults and descriptions, next to the loader)
    and the function that builds the model from those params on a device."""

    params: type[ModelParams]
    build: Callable[[Any, torch.device], Any]

    @property
    def name(self) -> str:
        return self.params.kind_name()

    @property
    def network(self) -> bool:
        """A network with a dtype (sampler.dtype / --dtype applies)."""
        return "dtype" in self.params.model_fields


# The registry: one entry per kind. config/experiment.py builds the ``model`` section's schema from it.
MODEL_KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind(gaussian.GaussianParams, gaussian.build),
    ModelKind(gmm.GMMParams, gmm.build),
    ModelKind(factory.FactoryParams, factory.build),
    ModelKind(edm_pkl.EDMPickleParams, edm_pkl.build),
    ModelKind(diffusers_unet.DiffusersParams, diffusers_unet.build),
    ModelKind(diffusers_sd.SDParams, diffusers_sd.build),
)}


def model_kind(kind: str) -> ModelKind:
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={kind!r} is not valid; choose one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind]


def load_model(kind: str, params: dict[str, Any], device: torch.device | str = "cpu") -> Any:
    """Build or load the model of a config's ``model`` section (``cfg.model.kind``, ``cfg.model.params``)."""
    spec = model_kind(kind)
    try:
        p = spec.params.model_validate({**params, "kind": kind})
    except ValidationError as exc:
        raise config_error(exc, ("model", kind)) from None
    model = spec.build(p, torch.device(device))
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


__all__ = ["MODEL_KINDS", "ModelKind", "load_model", "model_fingerprint"]
