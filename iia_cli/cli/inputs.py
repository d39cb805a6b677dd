"""The input files a run needs, checked together before any work: a paper config names every missing file (the
checkpoint, the FID reference statistics, the Inception weights) and where each comes from in one error, instead
of failing on the first and then on the next."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from iia_cli.runtime.errors import IIARuntimeError

EDM_MODELS = "NVlabs/edm's published pretrained models (nvlabs-fi-cdn.nvidia.com/edm/pretrained/)"
EDM_REFS = "NVlabs/edm's published FID reference statistics (nvlabs-fi-cdn.nvidia.com/edm/fid-refs/)"
# file name pattern -> where the file comes from (configs/paper/ and README, Paper configs)
SOURCES = (
    ("edm-*.pkl", EDM_MODELS),
    ("cifar10-32x32.npz", EDM_REFS), ("ffhq-64x64.npz", EDM_REFS), ("afhqv2-64x64.npz", EDM_REFS),
    ("imagenet-64x64.npz", EDM_REFS),
    ("ddpm-cifar10-32", "a local diffusers copy of google/ddpm-cifar10-32 (save_pretrained on a machine with internet)"),
    ("stable-diffusion-2-1-base", "a local copy of stabilityai/stable-diffusion-2-1-base (README, Text-to-image)"),
    ("coco2014-val-*.npz", "iia fid-ref --data <COCO-2014 val images> (README, Text-to-image)"),
)


def source_of(path: str | Path) -> str:
    """Where a known input file comes from, or "" for files of the user's own."""
    name = Path(path).name
    return next((src for pattern, src in SOURCES if fnmatch.fnmatch(name, pattern)), "")


def missing_inputs(cfg: Any, fid: bool = False) -> list[tuple[str, str, str]]:
    """(config key, path, source) of every input file of ``cfg`` that does not exist: the model's ``path``, and
    with ``fid`` the reference statistics (an .npz path) and explicit Inception weights."""
    wanted: list[tuple[str, Any]] = [("model.path", cfg.model.params.get("path"))]
    if fid:
        ref = cfg.fid.reference
        wanted.append(("fid.reference", ref if ref and str(ref).endswith(".npz") and ":" not in str(ref) else None))
        wanted.append(("fid.inception_weights", cfg.fid.inception_weights))
    out = []
    for key, value in wanted:
        if value is None or str(value).startswith("builtin:"):
            continue
        if not Path(str(value)).expanduser().exists():
            out.append((key, str(value), source_of(value)))
    return out


def check_inputs(cfg: Any, fid: bool = False) -> None:
    """Raise one error naming every missing input file of ``cfg`` and where each comes from (exit 1)."""
    missing = missing_inputs(cfg, fid)
    if not missing:
        return
    items = "; ".join(f"{key} {path}" + (f" (from {src})" if src else "") for key, path, src in missing)
    where = f" of {cfg.source}" if cfg.source else ""
    raise IIARuntimeError(f"{len(missing)} input file(s){where} not found: {items}; put them where the config says "
                          "(relative to the working directory) or change the keys (README, Paper configs)")
