"""Frechet Inception Distance, in parts: ``weights`` (lookup, fid-helper conversion, safe loading), ``features``
(the Inception extractor), ``stats`` (float64 sums, reference files, the Frechet distance) and ``sources``
(folders, ``.npz``/``.npy``, built-in data). This module chains them::

    images (uint8 [N, H, W, C]) -> FeatureExtractor -> features (float64 [N, 2048])
        -> FeatureStats (n, sum f, sum f f^T; merges exactly across batches and shards)
        -> (mu, sigma) -> frechet_distance(mu, sigma, mu_ref, sigma_ref)

FID is the metric of Heusel et al. (2017); the paper (Zhang, Niwa, Kleijn, ICLR 2024, Sec. 5) reports it for
every sampler. Reference statistics use the field's format: an ``.npz`` with ``mu`` [2048] and ``sigma``
[2048, 2048]. The Inception weights are never downloaded (see ``weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from iia_cli.runtime.errors import ConfigError, IIARuntimeError
from .features import FeatureExtractor
from .sources import _take, iter_image_batches
from .stats import FeatureStats, frechet_distance, load_reference

ProgressFn = Callable[[int], None]

__all__ = ["ProgressFn", "compute_reference", "compute_reference_features", "compute_stats", "features_sha256",
           "fid_from_stats", "fid_of_images", "load_reference_features"]


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


def _source_stats(
    spec: str | Path, weights_path: str | Path, device: str, batch_size: int, limit: int | None,
    progress: ProgressFn | None,
) -> FeatureStats:
    """Statistics of the first ``limit`` images (all when None) of an image source."""
    batches = iter_image_batches(spec, batch_size)  # validates the source before Inception loads
    extractor = FeatureExtractor(weights_path, device=device, batch_size=batch_size)
    return compute_stats(_take(batches, limit), extractor, progress)


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
    return _source_stats(data_spec, weights_path, device, batch_size, limit, progress).to_reference_npz(out_path)


def compute_reference_features(
    data_spec: str | Path,
    features_path: str | Path,
    weights_path: str | Path,
    stats_path: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    limit: int | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Inception features (float32 [N, 2048], as the network gives them) of the first ``limit`` images of
    ``data_spec``, written to ``features_path`` (key ``features``); with ``stats_path``, also the reference
    statistics from the same pass, bit-identical to :func:`compute_reference` (the sums are taken batch by batch
    in the same order), so one Inception pass serves FID, KID and FD-infinity."""
    if limit is not None and limit < 2:
        raise ConfigError(f"--limit must be at least 2 images, got {limit}")
    batches = iter_image_batches(data_spec, batch_size)
    extractor = FeatureExtractor(weights_path, device=device, batch_size=batch_size)
    stats, parts = FeatureStats.empty(), []
    for batch in _take(batches, limit):
        f = extractor(batch)
        stats.update(f)
        parts.append(f.to(torch.float32).numpy())
        if progress is not None:
            progress(stats.n)
    if stats.n == 0:
        raise IIARuntimeError("no images to compute reference features from")
    features = np.concatenate(parts)
    from iia_cli.io.atomic import savez_atomic

    savez_atomic(Path(features_path), features=features)
    if stats_path is not None:
        stats.to_reference_npz(stats_path)
    return features


def features_sha256(features: np.ndarray) -> str:
    """Content hash of a float32 feature array (independent of the file's zip metadata)."""
    import hashlib

    arr = np.ascontiguousarray(features, dtype="<f4")
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()


def load_reference_features(path: str | Path) -> tuple[np.ndarray, str]:
    """Reference features ``(float32 [N, d], content sha256)`` from an ``.npz`` with key ``features``, read as
    data (no pickles)."""
    from iia_cli.runtime.errors import MissingFileError

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError("reference features", path, "give fid.reference as a data spec (e.g. "
                               "builtin:mnist-heldout32) so that iia evaluate computes them")
    try:
        with np.load(path, allow_pickle=False) as data:
            feats = np.asarray(data["features"])
    except Exception as exc:  # noqa: BLE001 -- truncated or foreign file
        raise IIARuntimeError(f"reference features {path} are unreadable ({type(exc).__name__}); delete the file "
                              "to recompute it") from None
    if feats.ndim != 2 or feats.shape[0] < 2 or feats.dtype.kind != "f" or not np.isfinite(feats).all():
        raise IIARuntimeError(f"reference features {path} must be a finite float array [N >= 2, d], got "
                              f"{feats.dtype} {list(feats.shape)}; delete the file to recompute it")
    feats = feats.astype(np.float32)
    return feats, features_sha256(feats)


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
    stats = _source_stats(images_spec, weights_path, device, batch_size, None, progress)
    return fid_from_stats(stats, ref_mu, ref_sigma), stats.n
