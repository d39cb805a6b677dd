"""iia_cli: fast diffusion sampling with Improved Integration Approximation (Zhang, Niwa, Kleijn, ICLR 2024).

The package holds the version only, so that importing any module loads just what that module needs. The library
API lives in :mod:`iia_cli.api`: ``from iia_cli.api import load_config, sample, calibrate``."""

__version__ = "0.1.0"
