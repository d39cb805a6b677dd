"""Evaluation metrics: one registry (:data:`METRICS`, name -> :class:`MetricSpec`) and one accumulator interface.

An accumulator sees the samples of one seed range batch by batch (``update``) and keeps a *per-seed* state: one
slot per seed of the row, filled by whichever process sampled that seed (zeros elsewhere). States therefore
merge by addition exactly and in any order, so one generic loop serves torchrun ranks (all-reduce), SLURM
shards (shard files added by ``iia merge``) and checkpoints of an interrupted range, and the value *and its
interval* come out bit-identical however the seeds were split: no branch per metric.

* ``integration_rmse``: per-seed squared error of the final states against a high-NFE reference solve of the same
  noises -> RMSE; interval: bootstrap over seeds (``uncertainty.rmse_interval``); paired comparisons resample the
  seeds of both methods together.
* ``fid``, ``kid``, ``fd_inf``: per-seed Inception features (float32, as the network gives them) -> Frechet
  distance, kernel distance, FD-infinity; interval: jackknife over blocks of seeds.
* ``clip_score``: per-image CLIP scores against the prompts -> mean; interval: jackknife over blocks of images.

Adding a metric is one accumulator class plus one :data:`METRICS` entry (see the README's *Development*).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from iia_cli.runtime import dist
from iia_cli.runtime.errors import ConfigError, IIARuntimeError

from . import uncertainty

State = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# What an accumulator may need from the run (set up once per run by evaluate.MetricSetup)


@dataclass
class ReferenceSolutions:
    """Final states of a high-accuracy solve (e.g. EDM Heun at NFE 99) of given seeds, computed once per seed and
    kept for every (method, NFE) of the run. With ``path``, solutions are also kept on disk by the reference's
    identity (model fingerprint, solver, exact grid, dtypes, device type) and reused by later runs, CSVs and
    experiments; ``seeds`` (this process's error seeds) are then solved together on the first request."""

    solve: Callable[[list[int]], torch.Tensor]  # seeds -> final states [b, ...] (float64, CPU)
    cache: dict[int, torch.Tensor] = field(default_factory=dict)
    path: Any = None  # Path of the on-disk store, or None
    seeds: Sequence[int] = ()
    log: Callable[[str], None] | None = None
    save: bool = True  # whether this process writes the store (rank 0)
    _loaded: bool = False

    def _load(self) -> None:
        self._loaded = True
        if self.path is None or not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                seeds, xs = data["seeds"], data["x"]
            if xs.dtype != np.float64 or len(seeds) != len(xs) or not np.isfinite(xs).all():
                raise ValueError("malformed")
        except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file is recomputed, not trusted
            if self.log:
                self.log(f"reference solutions {self.path} are unreadable ({type(exc).__name__}); recomputing them")
            return
        for s, x in zip(seeds.tolist(), xs):
            self.cache.setdefault(int(s), torch.from_numpy(np.array(x)))
        if self.log:
            have = sum(1 for s in self.seeds if s in self.cache)
            self.log(f"reference solutions of {have} of {len(self.seeds) or have} error seeds from {self.path}")

    def ensure(self, seeds: Sequence[int]) -> None:
        if not self._loaded:
            self._load()
            seeds = list(dict.fromkeys([*self.seeds, *seeds]))  # the first request solves every error seed
        missing = [s for s in seeds if s not in self.cache]
        if missing:
            for s, x in zip(missing, self.solve(missing)):
                self.cache[s] = x
            if self.path is not None and self.save:
                from iia_cli.io.atomic import savez_atomic

                order = sorted(self.cache)
                try:
                    savez_atomic(self.path, seeds=np.asarray(order, np.int64),
                                 x=np.stack([self.cache[s].numpy() for s in order]))
                except OSError as exc:  # the store only saves time: a failure is a warning
                    if self.log:
                        self.log(f"warning: could not store reference solutions in {self.path} ({exc.strerror})")

    def of(self, seeds: Sequence[int]) -> torch.Tensor:
        self.ensure(seeds)
        return torch.stack([self.cache[s] for s in seeds])


@dataclass
class MetricContext:
    """The shared inputs of the accumulators of a run. Only what the run's metrics need is set; an
    accumulator built for merging (``iia merge``) has the references but no networks."""

    extractor: Any = None  # FID Inception: uint8 images -> float64 features
    ref_mu: np.ndarray | None = None
    ref_sigma: np.ndarray | None = None
    ref_features: np.ndarray | None = None  # float32 [m, d], KID's reference
    reference: ReferenceSolutions | None = None  # integration_rmse's fine solve
    clip: Any = None
    prompt_of: Callable[[int], str] | None = None


class Batch:
    """One batch of final solver states and, computed on first use, its quantised images and features."""

    def __init__(self, seeds: list[int], x: torch.Tensor, to_images: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.seeds, self.x, self._to_images = seeds, x, to_images
        self._images: torch.Tensor | None = None
        self._features: dict[int, np.ndarray] = {}

    @property
    def images(self) -> torch.Tensor:
        """uint8 [b, H, W, C], quantised like EDM's PNG writer."""
        if self._images is None:
            self._images = self._to_images(self.x)
        return self._images

    def features(self, extractor: Any) -> np.ndarray:
        """Inception features float32 [b, d] of the images, computed once per batch for every metric."""
        key = id(extractor)
        if key not in self._features:
            self._features[key] = extractor(self.images).to(torch.float32).numpy()
        return self._features[key]


# ----------------------------------------------------------------------------------------------------------
# Accumulators


class Accumulator:
    """A metric over the seeds of one row: ``update`` with batches, per-seed ``state``, ``merge``, ``value``,
    ``interval`` and the ``replicates`` that paired comparisons need."""

    metric = ""

    def __init__(self, seeds: Sequence[int], ctx: MetricContext | None = None) -> None:
        self.seeds = [int(s) for s in seeds]
        self.pos = {s: i for i, s in enumerate(self.seeds)}
        self.ctx = ctx or MetricContext()
        self.state: State = self.empty_state()

    # subclasses: state layout, update, statistic
    def empty_state(self) -> State:
        raise NotImplementedError

    def update(self, batch: Batch) -> None:
        raise NotImplementedError

    def filled(self) -> np.ndarray:
        """How many times each seed was accumulated (1 everywhere when complete)."""
        raise NotImplementedError

    def value(self) -> float:
        raise NotImplementedError

    def interval(self) -> uncertainty.Interval:
        raise NotImplementedError

    def replicates(self) -> dict[str, Any]:
        """What a paired comparison with another row on the same seeds needs (JSON-able)."""
        raise NotImplementedError

    # generic
    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.state)

    def _mine(self, batch: Batch) -> list[int]:
        """Positions in the batch of the row's seeds (a batch holds only seeds this process samples, each
        sampled by exactly one process)."""
        return [k for k, s in enumerate(batch.seeds) if s in self.pos]

    def merge(self, other: State, where: str = "") -> None:
        """Add another state (of a rank, a shard or a checkpoint) to this one; refuse missing, misshapen or
        non-finite arrays (a NaN would otherwise become a wrong number in the CSV)."""
        src = f"{where}: " if where else ""
        for k in self.keys:
            if k not in other:
                raise IIARuntimeError(f"{src}{self.metric} statistics lack {k!r} (written by an older iia_cli?)")
            arr = np.asarray(other[k])
            if arr.shape != self.state[k].shape:
                raise IIARuntimeError(f"{src}{self.metric} statistics {k!r} have shape {list(arr.shape)}, "
                                      f"expected {list(self.state[k].shape)}")
            if not np.isfinite(arr).all():
                raise IIARuntimeError(f"{src}{self.metric} statistics {k!r} hold NaN or infinite values; "
                                      "recompute them (delete the file and rerun)")
            self.state[k] = self.state[k] + arr.astype(self.state[k].dtype)

    def all_reduce(self) -> None:
        """Sum the state over torchrun ranks (identity in a single process)."""
        for k in self.keys:
            arr = np.array(self.state[k])  # a C-contiguous copy; 0-d arrays stay 0-d
            self.state[k] = dist.all_reduce_sum(torch.from_numpy(arr)).numpy().reshape(arr.shape)

    def check_complete(self, where: str = "") -> None:
        """Raise unless every seed of the row was accumulated exactly once."""
        f = self.filled()
        if (f == 1).all():
            return
        missing, twice = int((f == 0).sum()), int((f > 1).sum())
        what = ", ".join(p for p in (f"{missing} missing" if missing else "", f"{twice} counted twice" if twice
                                     else "") if p)
        raise IIARuntimeError(f"{where + ': ' if where else ''}{self.metric} statistics cover the row's "
                              f"{len(self.seeds)} seeds incompletely ({what}); rerun the missing shards or remove "
                              "duplicate shard files")


class IntegrationErrorAccumulator(Accumulator):
    """RMSE of final states against the reference solve of the same noises; per seed, the squared error summed
    over the sample's elements and the number of elements."""

    metric = "integration_rmse"

    def empty_state(self) -> State:
        n = len(self.seeds)
        return {"sq": np.zeros(n, np.float64), "count": np.zeros(n, np.float64)}

    def update(self, batch: Batch) -> None:
        idx = self._mine(batch)
        if not idx:
            return
        if self.ctx.reference is None:
            raise IIARuntimeError("internal: an integration-error accumulator built for merging has no reference")
        seeds = [batch.seeds[k] for k in idx]
        diff = batch.x[idx].to(torch.float64).cpu() - self.ctx.reference.of(seeds)
        per_seed = diff.pow(2).flatten(1).sum(1).numpy()
        at = [self.pos[s] for s in seeds]
        self.state["sq"][at] += per_seed
        self.state["count"][at] += diff[0].numel()

    def filled(self) -> np.ndarray:
        per = self.state["count"]
        size = per.max() if per.size and per.max() > 0 else 1.0
        return per / size

    def value(self) -> float:
        if float(self.state["count"].sum()) == 0:
            raise IIARuntimeError("integration error of zero samples")
        return uncertainty.rmse_value(self.state["sq"], self.state["count"])

    def interval(self) -> uncertainty.Interval:
        return uncertainty.rmse_interval(self.state["sq"], self.state["count"])

    def replicates(self) -> dict[str, Any]:
        return {"kind": "seeds", "sq": uncertainty.encode_array(self.state["sq"]),
                "count": uncertainty.encode_array(self.state["count"])}


class FeatureAccumulator(Accumulator):
    """A distance between the Inception features of the samples and a reference; per seed, the float32 feature
    vector (exact under addition with zeros) and a fill count."""

    def empty_state(self) -> State:
        from .fid.weights import FEATURE_DIM

        d = FEATURE_DIM
        if self.ctx.ref_mu is not None:
            d = int(np.shape(self.ctx.ref_mu)[0])
        elif self.ctx.ref_features is not None:
            d = int(np.shape(self.ctx.ref_features)[1])
        n = len(self.seeds)
        return {"features": np.zeros((n, d), np.float32), "filled": np.zeros(n, np.float64)}

    def update(self, batch: Batch) -> None:
        idx = self._mine(batch)
        if not idx:
            return
        if self.ctx.extractor is None:
            raise IIARuntimeError(f"internal: a {self.metric} accumulator built for merging has no Inception network")
        feats = batch.features(self.ctx.extractor)
        at = [self.pos[batch.seeds[k]] for k in idx]
        self.state["features"][at] += feats[idx]
        self.state["filled"][at] += 1

    def filled(self) -> np.ndarray:
        return self.state["filled"]

    def _x(self) -> np.ndarray:
        if not (self.state["filled"] > 0).any():
            raise IIARuntimeError(f"{self.metric} of zero images")
        return self.state["features"].astype(np.float64)

    def _jackknife(self) -> tuple[float, np.ndarray]:
        if not hasattr(self, "_jk"):
            self._jk = self.statistic(self._x())
        return self._jk

    def statistic(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        raise NotImplementedError

    def value(self) -> float:
        return float(self._jackknife()[0])

    def interval(self) -> uncertainty.Interval:
        value, loo = self._jackknife()
        return uncertainty.jackknife_interval(value, loo)

    def replicates(self) -> dict[str, Any]:
        value, loo = self._jackknife()
        return {"kind": "jackknife", "blocks": int(len(loo)), "loo": uncertainty.encode_array(loo)}

    def merge(self, other: State, where: str = "") -> None:
        self.__dict__.pop("_jk", None)
        super().merge(other, where)

    def all_reduce(self) -> None:
        self.__dict__.pop("_jk", None)
        super().all_reduce()


class FidAccumulator(FeatureAccumulator):
    """FID (Heusel et al. 2017) against reference ``mu``, ``sigma``."""

    metric = "fid"

    def statistic(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        if len(x) < 2:
            raise IIARuntimeError(f"FID needs at least 2 images, got {len(x)}")
        return uncertainty.fid_jackknife(x, self.ctx.ref_mu, self.ctx.ref_sigma)


class KidAccumulator(FeatureAccumulator):
    """KID (Binkowski et al. 2018): unbiased MMD^2 with torch-fidelity's polynomial kernel against reference
    features."""

    metric = "kid"

    def statistic(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        if len(x) < 2:
            raise IIARuntimeError(f"KID needs at least 2 images, got {len(x)}")
        return uncertainty.kid_jackknife(x, np.asarray(self.ctx.ref_features, np.float64))


class FdInfAccumulator(FeatureAccumulator):
    """FD-infinity (Chong & Forsyth 2020): FID on subsets of several sizes extrapolated to infinitely many
    samples."""

    metric = "fd_inf"

    def statistic(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        if len(x) < 20:
            raise IIARuntimeError(f"fd_inf needs at least 20 images (subsets of several sizes), got {len(x)}")
        return uncertainty.fd_inf_jackknife(x, self.ctx.ref_mu, self.ctx.ref_sigma)


class ClipScoreAccumulator(Accumulator):
    """Mean CLIP score (Hessel et al. 2021) of text-to-image samples against their prompts."""

    metric = "clip_score"

    def empty_state(self) -> State:
        n = len(self.seeds)
        return {"scores": np.zeros(n, np.float64), "filled": np.zeros(n, np.float64)}

    def update(self, batch: Batch) -> None:
        idx = self._mine(batch)
        if not idx:
            return
        if self.ctx.clip is None or self.ctx.prompt_of is None:
            raise IIARuntimeError("internal: a CLIP-score accumulator built for merging cannot score images")
        seeds = [batch.seeds[k] for k in idx]
        scores = self.ctx.clip(batch.images[idx].numpy(), [self.ctx.prompt_of(s) for s in seeds])
        at = [self.pos[s] for s in seeds]
        self.state["scores"][at] += scores.to(torch.float64).numpy().reshape(-1)
        self.state["filled"][at] += 1

    def filled(self) -> np.ndarray:
        return self.state["filled"]

    def _jackknife(self) -> tuple[float, np.ndarray]:
        s = self.state["scores"]
        if len(s) == 0:
            raise IIARuntimeError("CLIP score of zero images")
        loo = np.array([np.delete(s, b).mean() for b in uncertainty.blocks(len(s))]) if len(s) > 1 else np.zeros(0)
        return float(s.mean()), loo

    def value(self) -> float:
        return self._jackknife()[0]

    def interval(self) -> uncertainty.Interval:
        return uncertainty.jackknife_interval(*self._jackknife())

    def replicates(self) -> dict[str, Any]:
        _, loo = self._jackknife()
        return {"kind": "jackknife", "blocks": int(len(loo)), "loo": uncertainty.encode_array(loo)}


# ----------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class MetricSpec:
    """A metric: its accumulator, what it needs from the run, how tables show it."""

    accumulator: type[Accumulator]
    label: str  # table and plot name
    help: str  # one line for --metrics help and the README
    higher_is_better: bool = False
    needs: frozenset[str] = frozenset()  # inception, reference_stats, reference_features, fine_reference, clip
    digits: str = "#.4g"  # format of values in tables

    def fmt(self, value: float) -> str:
        return format(value, self.digits)


METRICS: dict[str, MetricSpec] = {
    "integration_rmse": MetricSpec(IntegrationErrorAccumulator, "integration RMSE",
                                   "RMSE of the final samples against a high-NFE reference solve of the same noises",
                                   needs=frozenset({"fine_reference"})),
    "kid": MetricSpec(KidAccumulator, "KID", "kernel Inception distance (unbiased, polynomial kernel) to the "
                      "reference images", needs=frozenset({"inception", "reference_features"})),
    "fd_inf": MetricSpec(FdInfAccumulator, "FD-infinity", "FID extrapolated to infinitely many samples "
                         "(Chong & Forsyth 2020)", needs=frozenset({"inception", "reference_stats"}), digits=".2f"),
    "fid": MetricSpec(FidAccumulator, "FID", "Frechet Inception distance to the reference statistics "
                      "(biased upward at small N)", needs=frozenset({"inception", "reference_stats"}), digits=".2f"),
    "clip_score": MetricSpec(ClipScoreAccumulator, "CLIP score", "mean CLIP score of text-to-image samples "
                             "against their prompts", higher_is_better=True, needs=frozenset({"clip"})),
}


def metric_list() -> str:
    return ", ".join(METRICS)


def parse_metrics(spec: Any, option: str = "metrics") -> list[str]:
    """'fid,integration_rmse' or a list -> metric names in registry order; unknown names are an error."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    names = [str(m).strip() for m in items if str(m).strip()]
    if not names:
        raise ConfigError(f"no metrics given in {option}; choose from {metric_list()}")
    for m in names:
        if m not in METRICS:
            raise ConfigError(f"unknown metric {m!r} in {option}; choose from {metric_list()}")
    return [m for m in METRICS if m in names]


def make_accumulator(metric: str, seeds: Sequence[int], ctx: MetricContext | None = None) -> Accumulator:
    return METRICS[metric].accumulator(seeds, ctx)


def save_states(accs: Iterable[Accumulator]) -> dict[str, np.ndarray]:
    """States of several accumulators as flat npz arrays ``<metric>__<key>``."""
    return {f"{a.metric}__{k}": v for a in accs for k, v in a.state.items()}


def load_states(accs: Iterable[Accumulator], arrays: Any, where: str = "") -> None:
    """Merge the states saved by :func:`save_states` into ``accs``."""
    for a in accs:
        a.merge({k: arrays[f"{a.metric}__{k}"] for k in a.keys if f"{a.metric}__{k}" in arrays}, where)


def result_fields(acc: Accumulator) -> dict[str, Any]:
    """The CSV fields of a finished accumulator: value, its 95 % interval and the replicates."""
    value = acc.value()
    ci = acc.interval()
    if not math.isfinite(value):
        raise IIARuntimeError(f"{acc.metric} came out as {value}; refusing to write a non-finite result")
    return {"value": value, "ci_low": ci.low, "ci_high": ci.high, "ci_method": ci.method, "ci_warning": ci.warning,
            "ci_data": json.dumps(acc.replicates(), sort_keys=True)}
