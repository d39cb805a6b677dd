"""The one resolution of a device string (``auto``, ``cpu``, ``cuda``, ``cuda:N``) to a ``torch.device``."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(device: str, cpu_hint: str = "use device cpu") -> torch.device:
    """``auto`` -> the current CUDA device when CUDA is available (under torchrun, the GPU ``dist.setup``
    selected for this rank), else cpu; any other torch device string is checked for availability.
    ``cpu_hint`` ends the error when CUDA is asked for but absent (it names the caller's option)."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; {cpu_hint}")
    return dev
