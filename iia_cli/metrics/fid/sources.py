"""FID image sources: directories of PNG/JPG, ``.npz``/``.npy`` arrays and the built-in data sets, read as
uint8 [n, H, W, C] batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError, one_line
from .stats import _open_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BUILTIN_PREFIX = "builtin:"


def _as_uint8_nhwc(arr: np.ndarray, where: str) -> np.ndarray:
    """A slice of stored images -> uint8 [n, H, W, C]. uint8 NHWC / NCHW / NHW pass through; float NCHW
    in [-1, 1] is quantised exactly like EDM's PNG writer."""
    if arr.dtype == np.uint8:
        if arr.ndim == 3:
            return np.ascontiguousarray(arr[..., None])
        if arr.ndim == 4 and arr.shape[-1] in (1, 3):
            return np.ascontiguousarray(arr)
        if arr.ndim == 4 and arr.shape[1] in (1, 3):
            return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
    elif np.issubdtype(arr.dtype, np.floating) and arr.ndim == 4 and arr.shape[1] in (1, 3):
        from iia_cli.io.images import quantize

        arr = np.asarray(arr)
        if not np.isfinite(arr).all():
            raise IIARuntimeError(f"{where}: images contain NaN or infinite values; they cannot be scored")
        return quantize(torch.from_numpy(arr)).numpy()
    raise ConfigError(
        f"{where}: cannot read images of dtype {arr.dtype} and shape {list(arr.shape)}; expected uint8 "
        "[N, H, W, 1|3] or float [N, 1|3, H, W] in [-1, 1]"
    )


def _iter_array(arr: np.ndarray, batch_size: int, where: str) -> Iterator[np.ndarray]:
    for start in range(0, arr.shape[0], batch_size):
        yield _as_uint8_nhwc(arr[start : start + batch_size], where)


def _read_image_file(path: Path) -> np.ndarray:
    """One PNG/JPG -> uint8 [H, W, C]: grayscale kept as C = 1, everything else converted to RGB like
    torch-fidelity (PIL ``convert("RGB")``)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img if img.mode in ("L", "RGB") else img.convert("RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 -- PIL raises many types for broken files
        raise IIARuntimeError(f"cannot read image {path}: {exc}") from exc
    return arr[..., None] if arr.ndim == 2 else arr


def list_image_files(directory: Path) -> list[Path]:
    """PNG/JPG files under ``directory``, recursively, sorted by relative path."""
    files = [p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _iter_files(files: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for path in files:
        image = _read_image_file(path)
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            yield np.stack(batch)  # a batch holds images of one shape; sizes may differ between files
            batch = []
        batch.append(image)
    yield np.stack(batch)


def _npz_images_key(keys: list[str], path: Path) -> str:
    for key in ("images", "x", "arr_0"):
        if key in keys:
            return key
    raise ConfigError(
        f"{path} holds no images: expected key 'images' (uint8 NHWC), 'x' (float NCHW in [-1, 1]) or 'arr_0'; "
        f"keys present: {', '.join(keys) or 'none'}"
    )


def iter_image_batches(source: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """Yield uint8 [n, H, W, C] batches (n <= batch_size) from an image source.

    ``source``: a directory of PNG/JPG (recursive, sorted by path); an ``.npz`` with ``images`` (uint8 NHWC, as
    our sampler writes), ``x`` (float NCHW in [-1, 1], quantised like EDM's PNG writer) or ``arr_0``
    (guided-diffusion); an ``.npy`` array; ``builtin:mnist`` or ``builtin:fashion-mnist``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    spec = str(source)
    if spec.startswith(BUILTIN_PREFIX):
        from iia_cli.models.datasets import BUILTIN_DATASETS, load_builtin_images

        name = spec[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_DATASETS:
            choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)
            raise ConfigError(f"unknown built-in data set {spec!r}; choose one of {choices}")
        return _iter_array(load_builtin_images(name), batch_size, spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingFileError(
            "images", path, "give a directory of PNG/JPG, an .npz or .npy file, builtin:mnist or builtin:fashion-mnist"
        )
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise MissingFileError("PNG/JPG images", path, "the directory holds none")
        return _iter_files(files, batch_size)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with _open_npz(path, "images") as data:
            key = _npz_images_key(list(data.files), path)
            try:
                arr = data[key]
            except Exception as exc:  # noqa: BLE001 -- object arrays (allow_pickle=False), truncated members
                raise IIARuntimeError(f"cannot read '{key}' of images {path}: {one_line(exc, 200)}") from None
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():  # before any Inception work
            raise IIARuntimeError(f"{path}: images contain NaN or infinite values; they cannot be scored")
        return _iter_array(arr, batch_size, str(path))
    if suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise IIARuntimeError(f"cannot read images {path}: {exc}") from exc
        return _iter_array(arr, batch_size, str(path))
    raise ConfigError(
        f"unsupported image source {spec!r}: give a directory of PNG/JPG, an .npz or .npy file, "
        "builtin:mnist or builtin:fashion-mnist"
    )


def _take(batches: Iterable[np.ndarray], limit: int | None) -> Iterator[np.ndarray]:
    """The first ``limit`` images of a batch stream (all when ``limit`` is None)."""
    left = limit
    for batch in batches:
        if left is not None:
            if left <= 0:
                return
            batch = batch[:left]
            left -= len(batch)
        yield batch
