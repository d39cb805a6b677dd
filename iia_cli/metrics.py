"""Evaluation metrics as accumulators: one small interface for every metric ``iia evaluate`` computes.

A metric sees the samples of a seed range batch by batch (``update``), keeps float64 sums as its state (a
dict of arrays), and turns the state into a number (``value``). States merge by addition, so one generic loop
each serves torchrun ranks (all-reduce), SLURM shards (shard files summed by ``iia merge``) and checkpoints
of an interrupted range (the state saved and loaded): no branch per metric.

* ``fid``: Inception feature sums ``(n, sum f, sum f f^T)`` -> Frechet distance to reference statistics.
* ``integration_rmse``: squared error of the final states against a high-NFE reference solve of the same
  noises (on the first ``error_samples`` seeds of the first range) -> RMSE.
* ``clip_score``: per-image CLIP scores of text-to-image samples against their prompts -> mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import dist
from .errors import ConfigError, IIARuntimeError

METRICS = ("fid", "integration_rmse", "clip_score")
State = dict[str, np.ndarray]


def parse_metrics(spec: Any) -> list[str]:
    """'fid,integration_rmse' or a list -> metric names in canonical order; unknown names are an error."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    names = [str(m).strip() for m in items if str(m).strip()]
    if not names:
        raise ConfigError(f"no metrics given; choose from {', '.join(METRICS)}")
    for m in names:
        if m not in METRICS:
            raise ConfigError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


class Batch:
    """One batch of final solver states and, computed on first use, its quantised images."""

    def __init__(self, seeds: list[int], x: torch.Tensor, to_images: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.seeds, self.x, self._to_images = seeds, x, to_images
        self._images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        """uint8 [b, H, W, C], quantised like EDM's PNG writer."""
        if self._images is None:
            self._images = self._to_images(self.x)
        return self._images


class Accumulator:
    """A metric over a set of seeds: ``update`` with batches, float64 ``state``, ``merge``, ``value``."""

    metric = ""
    keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.state: State = self.empty_state()

    def empty_state(self) -> State:
        return {k: np.zeros((), dtype=np.float64) for k in self.keys}

    def update(self, batch: Batch) -> None:
        raise NotImplementedError

    def merge(self, other: State) -> None:
        """Add another state (of a rank, a shard or a checkpoint) to this one."""
        for k in self.keys:
            if k not in other:
                raise IIARuntimeError(f"{self.metric} statistics lack {k!r}")
            arr = np.asarray(other[k], dtype=np.float64)
            if arr.shape != self.state[k].shape:
                raise IIARuntimeError(f"{self.metric} statistics {k!r} have shape {list(arr.shape)}, "
                                      f"expected {list(self.state[k].shape)}")
            self.state[k] = self.state[k] + arr

    def value(self) -> float:
        raise NotImplementedError

    def all_reduce(self) -> None:
        """Sum the state over torchrun ranks (identity in a single process)."""
        for k in self.keys:
            arr = np.array(self.state[k], dtype=np.float64)  # a C-contiguous copy; 0-d arrays stay 0-d
            self.state[k] = dist.all_reduce_sum(torch.from_numpy(arr)).numpy().reshape(arr.shape)


def save_states(accs: Iterable[Accumulator]) -> dict[str, np.ndarray]:
    """States of several accumulators as flat npz arrays ``<metric>__<key>``."""
    return {f"{a.metric}__{k}": v for a in accs for k, v in a.state.items()}


def load_states(accs: Iterable[Accumulator], arrays: Any) -> None:
    """Merge the states saved by :func:`save_states` into ``accs``."""
    for a in accs:
        a.merge({k: arrays[f"{a.metric}__{k}"] for k in a.keys if f"{a.metric}__{k}" in arrays})


class FidAccumulator(Accumulator):
    """FID (Heusel et al. 2017) from float64 Inception feature sums against reference ``mu``, ``sigma``."""

    metric = "fid"
    keys = ("n", "sum", "sum_outer")

    def __init__(self, ref_mu: np.ndarray, ref_sigma: np.ndarray, extractor: Any = None) -> None:
        self.ref_mu, self.ref_sigma, self.extractor = ref_mu, ref_sigma, extractor
        super().__init__()

    def empty_state(self) -> State:
        from .fid import FEATURE_DIM

        d = int(np.shape(self.ref_mu)[0]) if self.ref_mu is not None else FEATURE_DIM
        return {"n": np.zeros((), np.float64), "sum": np.zeros(d, np.float64), "sum_outer": np.zeros((d, d), np.float64)}

    def _stats(self) -> Any:
        from .fid import FeatureStats

        return FeatureStats(int(self.state["n"]), self.state["sum"], self.state["sum_outer"])

    def update(self, batch: Batch) -> None:
        stats = self._stats().update(self.extractor(batch.images))
        self.state = {"n": np.asarray(stats.n, np.float64), "sum": stats.sum, "sum_outer": stats.sum_outer}

    def value(self) -> float:
        from .fid import fid_from_stats

        return fid_from_stats(self._stats(), self.ref_mu, self.ref_sigma)


class ClipScoreAccumulator(Accumulator):
    """Mean CLIP score (Hessel et al. 2021) of text-to-image samples against their prompts."""

    metric = "clip_score"
    keys = ("n", "total")

    def __init__(self, scorer: Any = None, prompt_of: Callable[[int], str] | None = None) -> None:
        self.scorer, self.prompt_of = scorer, prompt_of
        super().__init__()

    def update(self, batch: Batch) -> None:
        if self.scorer is None or self.prompt_of is None:
            raise IIARuntimeError("internal: a CLIP-score accumulator built for merging cannot score images")
        scores = self.scorer(batch.images.numpy(), [self.prompt_of(s) for s in batch.seeds])
        self.state["n"] = self.state["n"] + scores.numel()
        self.state["total"] = self.state["total"] + float(scores.to(torch.float64).sum())

    def value(self) -> float:
        if float(self.state["n"]) == 0:
            raise IIARuntimeError("CLIP score of zero images")
        return float(self.state["total"] / self.state["n"])


@dataclass
class ReferenceSolutions:
    """Final states of a high-accuracy solve (e.g. EDM Heun at NFE 999) of given seeds, computed once per
    seed and kept for every (method, NFE) of the run."""

    solve: Callable[[list[int]], torch.Tensor]  # seeds -> final states [b, ...] (float64, CPU)
    cache: dict[int, torch.Tensor] = field(default_factory=dict)

    def ensure(self, seeds: Sequence[int]) -> None:
        missing = [s for s in seeds if s not in self.cache]
        if missing:
            for s, x in zip(missing, self.solve(missing)):
                self.cache[s] = x

    def of(self, seeds: Sequence[int]) -> torch.Tensor:
        self.ensure(seeds)
        return torch.stack([self.cache[s] for s in seeds])


class IntegrationErrorAccumulator(Accumulator):
    """RMSE of final states against the reference solve of the same noises, over the seeds ``wanted``
    (this process's share of the error seeds; other seeds of a batch are ignored)."""

    metric = "integration_rmse"
    keys = ("sum_sq", "count")

    def __init__(self, wanted: Sequence[int] = (), reference: ReferenceSolutions | None = None) -> None:
        self.wanted, self.reference = set(wanted), reference
        super().__init__()

    def update(self, batch: Batch) -> None:
        idx = [k for k, s in enumerate(batch.seeds) if s in self.wanted]
        if not idx:
            return
        if self.reference is None:
            raise IIARuntimeError("internal: an integration-error accumulator built for merging has no reference")
        ref = self.reference.of([batch.seeds[k] for k in idx])
        diff = batch.x[idx].to(torch.float64).cpu() - ref
        self.state["sum_sq"] = self.state["sum_sq"] + float(diff.pow(2).sum())
        self.state["count"] = self.state["count"] + diff.numel()

    def value(self) -> float:
        if float(self.state["count"]) == 0:
            raise IIARuntimeError("integration error of zero samples")
        return math.sqrt(float(self.state["sum_sq"] / self.state["count"]))
