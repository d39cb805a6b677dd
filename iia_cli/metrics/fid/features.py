"""FID features: torch-fidelity's ``inception-v3-compat`` extractor (the TensorFlow FID Inception of Heusel et
al. 2017, ported to PyTorch), so numbers match torch-fidelity, EDM and pytorch-fid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from iia_cli.runtime.devices import resolve_device
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError, one_line
from .weights import FEATURE_DIM, HOW_TO_PROVIDE_WEIGHTS, load_inception_state

FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
MEMORY_FORMAT = torch.channels_last  # of the network and its input
# How the network computes, beyond torch-fidelity's weights: part of cached reference statistics' identity.
NETWORK_FORMAT = f"{str(MEMORY_FORMAT).removeprefix('torch.')}+bn-folded"
# Images per Inception call on the CPU, whatever batch the caller hands over: on the 2-core CPU calls of 4 to 8
# images run 1.6x to 2x the images per second of calls of 125 (benchmarks/cpu_chunks.py: a few images'
# 299 x 299 activations stay in cache), with features equal bit for bit there. A GPU gets the caller's batch.
CPU_CHUNK = 8


def fold_batch_norms(net: torch.nn.Module) -> int:
    """Fold every ``conv -> bn`` pair of torch-fidelity's ``BasicConv2d`` blocks (a bias-free convolution, then an
    eval-mode batch norm) into the convolution: ``W' = W g / sqrt(v + eps)``, ``b' = beta - m g / sqrt(v + eps)``,
    computed in float64 and rounded once; the batch norm becomes the identity. Returns the number folded."""
    folded = 0
    for block in net.modules():
        conv, bn = getattr(block, "conv", None), getattr(block, "bn", None)
        if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and conv.bias is None:
            scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
            weight = (conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype)
            bias = (bn.bias.double() - bn.running_mean.double() * scale).to(conv.weight.dtype)
            conv.weight = torch.nn.Parameter(weight, requires_grad=False)
            conv.bias = torch.nn.Parameter(bias, requires_grad=False)
            block.bn = torch.nn.Identity()
            folded += 1
    return folded


class FeatureExtractor:
    """torch-fidelity's ``inception-v3-compat`` network: uint8 images [N, H, W, C] -> float64 features [N, 2048].

    Grayscale (C = 1) is repeated to three channels, as PIL's ``convert("RGB")`` does; the network resizes to
    299 x 299 itself (TensorFlow-1.x-compatible bilinear).
    """

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.weights_path = Path(weights_path)
        if not self.weights_path.is_file():
            raise MissingFileError("Inception weights", self.weights_path, HOW_TO_PROVIDE_WEIGHTS)
        self.device = resolve_device(device, "use --device cpu") if isinstance(device, str) else device
        self.batch_size = batch_size
        self.chunk = min(batch_size, CPU_CHUNK) if self.device.type == "cpu" else batch_size
        # torch-fidelity would torch.load the path with weights_only=False (a pickle that can run code): read
        # plain tensors here, and hand it those tensors re-serialised in memory by us.
        state = load_inception_state(self.weights_path)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            net = FeatureExtractorInceptionV3(
                name=FEATURE_EXTRACTOR_NAME,
                features_list=[str(FEATURE_DIM)],
                feature_extractor_weights_path=buffer,
            )
        except Exception as exc:  # noqa: BLE001 -- tensors of the wrong names or shapes
            raise IIARuntimeError(
                f"Inception weights {self.weights_path} do not fit torch-fidelity's FID Inception: {one_line(exc)}"
            ) from None
        # channels_last: on the 2-core CPU 1.6x the images per second of the default layout with one torch thread
        # (one run, both layouts interleaved), about 1.2x with two. Batch norms folded into their convolutions:
        # 1.14x more (benchmarks/cpu_chunks.py, median of 7; 1.04x to 1.28x across runs). Each changes the
        # features by ~1e-6 relative (summation order and rounding), FID by far less than the 1e-3 of the
        # torch-fidelity parity test; cached reference statistics carry both in their key (NETWORK_FORMAT).
        fold_batch_norms(net)
        self.net = net.to(self.device).to(memory_format=MEMORY_FORMAT)

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, C] (C = 1 or 3) -> float64 [N, 2048] on the CPU, computed ``chunk`` images at a time
        (``batch_size`` on a GPU, at most ``CPU_CHUNK`` on the CPU)."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ConfigError(f"expected uint8 images [N, H, W, 1 or 3], got {x.dtype} {tuple(x.shape)}")
        out = [torch.zeros(0, FEATURE_DIM, dtype=torch.float64)]
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.chunk):
                batch = x[start : start + self.chunk].permute(0, 3, 1, 2)  # [B, C, H, W]
                batch = batch.expand(-1, 3, -1, -1).to(self.device).contiguous(memory_format=MEMORY_FORMAT)
                (features,) = self.net(batch)  # float32 [B, 2048]
                out.append(features.to("cpu", torch.float64))
        return torch.cat(out)
