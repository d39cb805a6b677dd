"""iia_cli: fast diffusion sampling with Improved Integration Approximation (Zhang, Niwa, Kleijn, ICLR 2024)."""

__version__ = "0.1.0"

from .api import calibrate, prepare, sample  # noqa: E402
from .config import load_config  # noqa: E402

__all__ = ["__version__", "calibrate", "load_config", "prepare", "sample"]
