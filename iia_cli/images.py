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


def save_grid_png(images: np.ndarray, path: Path, ncols: int | None = None) -> None:
    """Tile uint8 [N, H, W, C] images into one PNG grid."""
    n, h, w, c = images.shape
    ncols = ncols or max(1, int(math.ceil(math.sqrt(n))))
    nrows = int(math.ceil(n / ncols))
    grid = np.zeros((nrows * h, ncols * w, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = images[k]
    from .atomic import atomic_write

    atomic_write(path, lambda tmp: save_png(grid, tmp, "PNG"), rescue=True, what="sample grid")
