"""Helpers shared by the network adapters (EDM pickles, diffusers UNets, Stable Diffusion pipelines): network
dtypes by name and the install hints for the optional libraries."""

from __future__ import annotations

import torch

from iia_cli.runtime.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# diffusers is a core dependency (the built-in testbed network is a diffusers UNet2DModel): missing, the install
# is broken. transformers (Stable Diffusion's text encoder, CLIP score) comes with the iia_cli[diffusers] extra.
DIFFUSERS_HINT = "diffusers is a dependency of iia_cli; reinstall it: pip install 'diffusers>=0.30'"
TRANSFORMERS_HINT = "pip install 'transformers>=4.40' (what the iia_cli[diffusers] extra adds)"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or the torch dtype itself) -> ``torch.dtype``."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ConfigError(f"unknown model dtype {name!r}; valid: {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)
