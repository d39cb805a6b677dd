"""Tiny checkpoints in each real format, built inside the tests (no downloads, no stored weights).

* EDM persistence pickles: a tiny EDM-style network (EDM paper, Table 1 preconditioning) whose source is
  stored in the pickle, written by a writer of our own of EDM's persistence format
  (``torch_utils.persistence._reconstruct_persistent_obj(meta)``).
* diffusers ``UNet2DModel`` directories: randomly initialised tiny UNets saved with ``save_pretrained``,
  bare (``config.json`` + weights) or in a pipeline layout (``unet/`` + ``scheduler/``).

Used by ``test_models_checkpoints.py`` (the adapters) and ``test_checkpoints_cli.py`` (the CLI end to end).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# --------------------------------------------------------------------------------------------------
# EDM pickles.

# A stand-in EDM-style network (EDM paper, Table 1 preconditioning), stored in the pickle as source.
NET_SRC = '''
import numpy as np
import torch
from torch_utils import persistence
from torch.nn.functional import silu


@persistence.persistent_class
class TinyUNet(torch.nn.Module):
    def __init__(self, channels, label_dim, hidden=8):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.noise_emb = torch.nn.Linear(1, hidden)
        self.label_emb = torch.nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.conv_out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels):
        emb = self.noise_emb(noise_labels.reshape(-1, 1))
        if self.label_emb is not None:
            emb = emb + self.label_emb(class_labels)
        return self.conv_out(silu(self.conv_in(x) + emb[:, :, None, None]))


@persistence.persistent_class
class TinyPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_data=0.5):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = 0
        self.sigma_max = float(np.inf)
        self.sigma_data = sigma_data
        self.model = TinyUNet(img_channels, label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (sigma**2 + self.sigma_data**2).sqrt()
        F_x = self.model(c_in * x, sigma.log().flatten() / 4, class_labels)
        return c_skip * x + c_out * F_x

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@persistence.persistent_class
class LossConfig:
    def __init__(self, P_mean=-1.2):
        self.P_mean = P_mean
'''

# A second source file whose persistent object holds a persistent object from NET_SRC.
WRAP_SRC = '''
import torch
from torch_utils import persistence


@persistence.persistent_class
class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        for name in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max"):
            setattr(self, name, getattr(inner, name))
        self.offset = torch.nn.Parameter(torch.full([], 0.25))

    def forward(self, x, sigma, class_labels=None):
        return self.inner(x, sigma, class_labels) + self.offset
'''

# A training-only object whose source imports a helper the clean-room loader does not provide.
AUG_SRC = '''
from torch_utils import persistence
from torch_utils import training_stats


@persistence.persistent_class
class AugmentPipe:
    def __init__(self, p):
        self.p = p
'''

# A stand-in network that records the class labels it receives: one JSON line per call, appended to the
# file named by the environment variable LABEL_LOG_ENV (nothing is recorded when it is unset).
LABEL_LOG_ENV = "IIA_TEST_LABEL_LOG"
REC_SRC = '''
import json
import os
import torch
from torch_utils import persistence


@persistence.persistent_class
class LabelRecorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        for name in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max"):
            setattr(self, name, getattr(inner, name))

    def forward(self, x, sigma, class_labels=None):
        log = os.environ.get("%s")
        if log:
            rows = None if class_labels is None else class_labels.detach().cpu().tolist()
            with open(log, "a") as f:
                f.write(json.dumps({"batch": int(x.shape[0]), "labels": rows}) + "\\n")
        return self.inner(x, sigma, class_labels)

    def round_sigma(self, sigma):
        return self.inner.round_sigma(sigma)
''' % LABEL_LOG_ENV

SOURCES = {"tiny_edm_net": NET_SRC, "tiny_edm_wrap": WRAP_SRC, "tiny_edm_aug": AUG_SRC, "tiny_edm_rec": REC_SRC}


def _writer_persistence(sources: dict[str, str]) -> dict[str, types.ModuleType]:
    """Our own writer of EDM's persistence format: ``__reduce__`` -> ``(_reconstruct_persistent_obj, (meta,))``."""
    root = types.ModuleType("torch_utils")
    root.__path__ = []
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta: dict) -> None:
        raise AssertionError("the loader under test must not call the writer's hook")

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    def persistent_class(orig: type) -> type:
        src = sources[orig.__module__]

        def __reduce__(self: object) -> tuple:
            meta = {"type": "class", "version": 6, "module_src": src, "class_name": orig.__name__,
                    "state": dict(self.__dict__)}
            return (persistence._reconstruct_persistent_obj, (meta,))

        attrs = {"__reduce__": __reduce__, "__module__": orig.__module__, "__qualname__": orig.__qualname__}
        return type(orig.__name__, (orig,), attrs)

    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    persistence.persistent_class = persistent_class
    root.persistence = persistence
    root.training_stats = types.ModuleType("torch_utils.training_stats")
    return {"torch_utils": root, "torch_utils.persistence": persistence}


@contextlib.contextmanager
def writer_modules(sources: dict[str, str] = SOURCES) -> Iterator[dict[str, types.ModuleType]]:
    """Exec ``sources`` as importable modules next to the writer's ``torch_utils``; remove all afterwards."""
    added = _writer_persistence(sources)
    sys.modules.update(added)
    modules = {}
    try:
        for name, src in sources.items():
            modules[name] = sys.modules[name] = types.ModuleType(name)
            exec(compile(src, name, "exec"), modules[name].__dict__)
        yield modules
    finally:
        for name in [*added, *sources]:
            sys.modules.pop(name, None)


def write_edm_pickle(path: str | Path, *, label_dim: int = 0, seed: int = 0, resolution: int = 8,
                     channels: int = 3, record_labels: bool = False) -> Path:
    """Write ``{"ema": net, "loss_fn": ..., "dataset_kwargs": ...}`` like an EDM training snapshot.

    ``net`` is a randomly initialised ``TinyPrecond`` (weights from ``torch.manual_seed(seed)``), wrapped
    in a ``LabelRecorder`` when ``record_labels`` (see :data:`LABEL_LOG_ENV`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_modules() as mods:
        torch.manual_seed(seed)
        net = mods["tiny_edm_net"].TinyPrecond(img_resolution=resolution, img_channels=channels,
                                               label_dim=label_dim).eval()
        if record_labels:
            net = mods["tiny_edm_rec"].LabelRecorder(net).eval()
        data = {"ema": net, "loss_fn": mods["tiny_edm_net"].LossConfig(), "dataset_kwargs": {"resolution": resolution}}
        with open(path, "wb") as f:
            pickle.dump(data, f)
    return path


# --------------------------------------------------------------------------------------------------
# diffusers UNet2DModel directories.

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

TINY_UNET: dict[str, Any] = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)


def tiny_unet(seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised tiny ``UNet2DModel`` (weights from ``torch.manual_seed(seed)``)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET, **overrides}).eval()


def write_unet_dir(path: str | Path, *, layout: str = "bare", prediction_type: str = "epsilon", seed: int = 0,
                   unet: Any = None, **overrides: Any) -> Path:
    """Save a tiny UNet as a bare directory (``config.json`` + weights, no scheduler: DDPM defaults) or as a
    ``DDPMPipeline`` (``unet/`` + ``scheduler/``, a DDIMScheduler config with linear betas 1e-4..0.02,
    T = 1000 and ``prediction_type``). Returns ``path``."""
    path = Path(path)
    unet = unet if unet is not None else tiny_unet(seed, **overrides)
    if layout == "bare":
        if prediction_type != "epsilon":
            raise ValueError("a bare UNet directory has no scheduler: its prediction type is epsilon")
        unet.save_pretrained(path)
    elif layout == "pipeline":
        from diffusers import DDIMScheduler, DDPMPipeline

        scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    else:
        raise ValueError(f"layout {layout!r}: bare or pipeline")
    return path
