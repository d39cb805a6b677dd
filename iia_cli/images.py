"""Image quantisation and writers, exactly like EDM's PNG writer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1], [N, C, H, W] -> uint8 [N, H, W, C] as EDM writes PNGs.

    ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` (truncation after the +128 offset, as EDM does).
    """
    return (x.detach().to(torch.float64) * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(image: np.ndarray, path: Path, fmt: str | None = None) -> None:
    """Save one uint8 [H, W, C] image (C = 1 or 3) as PNG (``fmt="PNG"`` for a name without .png)."""
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").save(path, format=fmt)


GRID_WIDTH = 512  # about this many pixels wide: small images are upscaled (nearest) to be readable


def grid_image(images: np.ndarray, ncols: int | None = None, width: int = GRID_WIDTH, padding: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, C] images into one uint8 [H', W', 3] grid (``torchvision.utils.make_grid``),
    each image upscaled by the integer factor (nearest neighbour) that brings the grid closest to ``width``
    pixels, never downscaled, with ``padding`` white pixels between images."""
    from torchvision.utils import make_grid

    n, h, w, c = images.shape
    ncols = ncols or max(1, int(math.ceil(math.sqrt(n))))
    ncols = min(ncols, n)
    scale = max(1, round(width / (ncols * w)))
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(x, nrow=ncols, padding=padding, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def save_grid_png(images: np.ndarray, path: Path, ncols: int | None = None) -> None:
    """Save :func:`grid_image` of uint8 [N, H, W, C] images as a PNG (about 512 px wide), atomically."""
    from .atomic import atomic_write

    grid = grid_image(images, ncols)
    atomic_write(path, lambda tmp: save_png(grid, tmp, "PNG"), rescue=True, what="sample grid")
