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


MAX_ASPECT = 4  # columns per row at most this many times the rows, or the grid leaves blank tiles instead


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) for ``n`` images: the most square full layout (rows x cols = n, e.g. 8 -> 2 x 4, 12 -> 3 x 4)
    with at most MAX_ASPECT times as many columns as rows; otherwise (a prime such as 13) ceil(sqrt(n)) columns
    and a blank tail."""
    n = max(1, n)
    full = [(n // c, c) for c in range(1, n + 1) if n % c == 0 and c >= n // c and c <= MAX_ASPECT * (n // c)]
    if full:
        return min(full, key=lambda rc: rc[1] / rc[0])
    cols = int(math.ceil(math.sqrt(n)))
    return int(math.ceil(n / cols)), cols


def grid_image(images: np.ndarray, ncols: int | None = None, width: int = GRID_WIDTH, padding: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, C] images into one uint8 [H', W', 3] grid (``torchvision.utils.make_grid``),
    each image upscaled by the integer factor (nearest neighbour) that brings the grid closest to ``width``
    pixels, never downscaled, with ``padding`` white pixels between images."""
    from torchvision.utils import make_grid

    n, h, w, c = images.shape
    ncols = min(ncols or grid_shape(n)[1], n)
    scale = max(1, round(width / (ncols * w)))
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(x, nrow=ncols, padding=padding, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def titled(grid: np.ndarray, title: str, padding: int = 4) -> np.ndarray:
    """A white band with ``title`` (black, wrapped to the grid's width) above a uint8 [H, W, 3] grid; drawn with
    PIL on an image of its own (no pyplot state)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = grid.shape[1]
    lines: list[str] = []
    for word in title.split(" "):
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width - 2 * padding:
            lines[-1] = trial
        else:
            lines.append(word)
    left, top, right, bottom = font.getbbox("Ag")
    line_h = bottom + 2
    band = Image.new("RGB", (width, len(lines) * line_h + 2 * padding), "white")
    draw = ImageDraw.Draw(band)
    for k, line in enumerate(lines):
        draw.text((padding, padding + k * line_h), line, fill="black", font=font)
    return np.concatenate([np.asarray(band), grid], axis=0)


def save_grid_png(images: np.ndarray, path: Path, ncols: int | None = None, title: str = "") -> None:
    """Save :func:`grid_image` of uint8 [N, H, W, C] images as a PNG (about 512 px wide), with ``title`` above
    it, atomically."""
    from .atomic import atomic_write

    grid = grid_image(images, ncols)
    if title:
        grid = titled(grid, title)
    atomic_write(path, lambda tmp: save_png(grid, tmp, "PNG"), rescue=True, what="sample grid")
