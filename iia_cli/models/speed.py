"""Speed options around any denoiser: torch.compile, channels-last, and the automatic batch size."""

from __future__ import annotations

from typing import Any

import torch

from iia_cli.runtime.errors import ConfigError


class OptimizedDenoiser:
    """Wraps a denoiser: ``torch.compile`` of its call and/or channels-last inputs (and network weights).
    Every other attribute (shape, sigma range, fingerprint, condition, decode, ...) is the wrapped model's."""

    def __init__(self, model: Any, compile: bool = False, channels_last: bool = False) -> None:
        self._model = model
        self._channels_last = channels_last
        if channels_last:
            for name in ("net", "unet"):
                net = getattr(model, name, None)
                if isinstance(net, torch.nn.Module):
                    net.to(memory_format=torch.channels_last)
        self._call = torch.compile(model.__call__, dynamic=False) if compile else model.__call__

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self._channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._call(x, sigma, class_labels) if class_labels is not None else self._call(x, sigma)
        return out.contiguous()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def optimize(model: Any, compile: bool, channels_last: bool) -> Any:
    return OptimizedDenoiser(model, compile, channels_last) if (compile or channels_last) else model


def auto_batch(model: Any, device: torch.device, cap: int = 512) -> int:
    """64 on the CPU. On a GPU: the largest power of two up to ``cap`` whose denoiser call fits in memory,
    found by trying (doubling from 8), then halved for the solver state, history and Inception."""
    if device.type != "cuda":
        return 64
    fits = 0
    b = 8
    dtype = torch.float32
    while b <= cap:
        try:
            x = torch.randn((b, *model.shape), device=device, dtype=dtype)
            sigma = torch.ones(b, device=device, dtype=dtype)
            labels = None
            n_labels = int(getattr(model, "label_dim", 0) or 0)
            if callable(getattr(model, "condition", None)):
                labels = model.condition(list(range(b)))
            elif n_labels:
                labels = torch.zeros(b, n_labels, device=device)
            with torch.no_grad():
                model(x, sigma, labels) if labels is not None else model(x, sigma)
            torch.cuda.synchronize(device)
            fits = b
            b *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if fits == 0:
        raise ConfigError("not even a batch of 8 fits in GPU memory; set --batch explicitly")
    return max(1, fits // 2) if fits < cap else fits
