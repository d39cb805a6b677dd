"""``iia evaluate``: for each (method, NFE) find or fit the IIA coefficients, sample each seed range once
and feed every metric from those samples (FID per seed range, the integration error against a high-NFE
reference solve, the CLIP score), and append tidy rows, each with its identity, to the results CSV."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iia_cli.api import (LogFn, ModelMemo, Prepared, ResolvedCoefficients, checkpoint_interval, find_coefficients,
                         grid_params, prepare, resolve_coefficients, save_checkpoint)
from iia_cli.config.experiment import ExperimentConfig, GridConfig, check_nfe
from iia_cli.core.methods import PARAM_KEYS
from iia_cli.core.sampling import Coefficients, format_seeds, parse_seeds, sample_batches, to_images
from iia_cli.core.solvers.registry import make_solver
from iia_cli.io import layout
from iia_cli.io.atomic import OutputRescued, savez_atomic
from iia_cli.io.images import quantize
from iia_cli.metrics.registry import (METRICS, Accumulator, Batch, MetricContext, ReferenceSolutions, load_states,
                                      make_accumulator, parse_metrics, result_fields, save_states)
from iia_cli.models.base import Denoiser, capabilities, model_dtype
from iia_cli.runtime import dist
from iia_cli.runtime.errors import ConfigError, IIARuntimeError
from iia_cli.runtime.progress import ImageProgress, log as default_log
from iia_cli.tables.results import (COLUMNS, append_rows, check_header, done_identities, identity_conflicts, make_row,
                                    normalise_results, read_results, render_table, row_identity)


@dataclass
class EvaluateResult:
    csv: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # rows computed and appended by this run
    identities: list[str] = field(default_factory=list)  # identities of every row of the run, computed or skipped
    skipped: int = 0  # rows already in the CSV (same identity)
    interval_seconds: float = 0.0  # time spent on values' intervals, KID and replicates (the uncertainty's cost)


def parse_seed_ranges(spec: Any) -> list[list[int]]:
    """'0-999;1000-1999' or a list of range strings -> list of seed lists."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(";")
    ranges = [parse_seeds(item) for item in items if str(item).strip()]
    if not ranges:
        raise ConfigError("no seed ranges given; write e.g. --seed-ranges '0-999;1000-1999'")
    return ranges


def _reference_cache(cfg: ExperimentConfig, weights_sha256: str) -> tuple[Path, Path]:
    """Cache paths (statistics, features) of the reference images of a data spec, for the Inception weights with
    this sha256."""
    from iia_cli.metrics.fid.features import NETWORK_FORMAT

    spec = cfg.fid.reference
    key = hashlib.sha256(f"{spec}|{cfg.fid.reference_samples}|{weights_sha256}|{NETWORK_FORMAT}".encode()
                         ).hexdigest()[:10]
    safe = str(spec).replace(":", "-").replace("/", "_")
    stem = f"reference-{safe}-{cfg.fid.reference_samples or 'all'}-{key}"
    return layout.reference_cache_dir() / f"{stem}.npz", layout.reference_cache_dir() / f"{stem}-features.npz"


def _is_stats_file(cfg: ExperimentConfig) -> bool:
    spec = str(cfg.fid.reference)
    return Path(spec).suffix == ".npz" and not spec.startswith("builtin:")


def _compute_reference(cfg: ExperimentConfig, weights: Path, cache: tuple[Path, Path], device: torch.device,
                       log: LogFn, with_stats: bool) -> None:
    from iia_cli.metrics.fid.compute import compute_reference_features

    stats_path, feats_path = cache
    spec, n = cfg.fid.reference, cfg.fid.reference_samples
    log(f"computing reference features{' and statistics' if with_stats else ''} of {spec} ({n or 'all'} images) "
        f"-> {feats_path}")
    with ImageProgress(n, f"reference features of {spec}") as bar:
        compute_reference_features(spec, feats_path, weights, stats_path if with_stats else None, device=str(device),
                                   batch_size=cfg.fid.batch, limit=n, progress=bar.update_to)


def _weights_sha256(weights: Path, known: str | None) -> str:
    from iia_cli.io.hashing import sha256_of_file

    return known or sha256_of_file(weights)


def resolve_reference(cfg: ExperimentConfig, weights: Path, device: torch.device, log: LogFn,
                      weights_sha256: str | None = None) -> tuple[Path, np.ndarray, np.ndarray, str]:
    """Reference statistics (path, mu, sigma, sha256): an existing .npz, or statistics computed once from a
    data spec and cached (with the features, from the same Inception pass). ``weights_sha256``: the weights'
    hash when the caller has it (else it is computed)."""
    from iia_cli.metrics.fid.stats import load_reference

    if not cfg.fid.reference:
        raise ConfigError("fid.reference is not set: give an .npz with mu/sigma (e.g. EDM's cifar10-32x32.npz) "
                          "or a data spec such as builtin:mnist")
    if _is_stats_file(cfg):
        path = Path(cfg.fid.reference)
        return (path, *load_reference(path))
    cache = _reference_cache(cfg, _weights_sha256(weights, weights_sha256))
    if not cache[0].is_file():
        _compute_reference(cfg, weights, cache, device, log, with_stats=True)
    return (cache[0], *load_reference(cache[0]))


def resolve_reference_features(cfg: ExperimentConfig, weights: Path, device: torch.device, log: LogFn,
                               weights_sha256: str | None = None) -> tuple[Path, np.ndarray, str]:
    """Reference features (path, float32 [N, d], content sha256) of the data spec in fid.reference, computed once
    and cached; KID needs the features themselves, which a mu/sigma .npz does not hold."""
    from iia_cli.metrics.fid.compute import load_reference_features

    if not cfg.fid.reference or _is_stats_file(cfg):
        raise ConfigError(f"kid needs the reference images' features, but fid.reference={cfg.fid.reference!r} "
                          f"{'is a mu/sigma .npz' if cfg.fid.reference else 'is not set'}; give a data spec (a "
                          "folder, an .npz/.npy of images or builtin:...) or leave kid out of --metrics")
    cache = _reference_cache(cfg, _weights_sha256(weights, weights_sha256))
    stats, path = cache
    if not path.is_file():
        _compute_reference(cfg, weights, cache, device, log, with_stats=not stats.is_file())
    return (path, *load_reference_features(path))


# ----------------------------------------------------------------------------------------------------------
# Row identity


# Sampler settings that do not change a result (or that the row records elsewhere: method, NFE, seeds, the
# method's parameters, dtypes). Every other sampler setting, including ones added later, enters the identity.
# thresholding and afs are in the method's parameters when not the default (so default rows keep their identities).
_SAMPLER_NOT_IN_IDENTITY = ("method", "nfe", "seeds", "batch", "device", "compile", "channels_last", "coeffs", "dtype",
                            "state_dtype", "thresholding", "afs", *PARAM_KEYS)
_CALIBRATION_NOT_IN_IDENTITY = ("out_dir", "batch", "val_samples", "val_seed_start", "samples", "substeps", "ridge",
                                "seed_start")


def _generic(section: Any, prefix: str, skip: tuple[str, ...]) -> dict[str, Any]:
    """``prefix.name: value`` of a config section's fields (None omitted), except ``skip``."""
    return {f"{prefix}.{name}": value for name, value in section.model_dump().items()
            if name not in skip and value is not None}


def _solver_revision(solver: Any) -> dict[str, int]:
    """``solver_revision`` of a solver whose definition changed, so that rows of the old one are not reused;
    nothing for revision 1, so rows of unchanged solvers keep their identities."""
    return {"solver_revision": solver.revision} if solver.revision != 1 else {}


def _sigmas_sha256(sigmas: torch.Tensor) -> str:
    return hashlib.sha256(sigmas.to(torch.float64).cpu().numpy().tobytes()).hexdigest()


def identity_fields(p: Prepared, coeffs: ResolvedCoefficients | None, metric: str, seeds: list[int],
                    metric_fields: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes a row's value, as flat readable fields (``results.row_identity`` hashes them):
    model fingerprint, method and parameters, the exact sigma grid, NFE, seeds, metric, network and state
    dtypes, sampler settings, the calibration actually used (from the coefficient file: B, M, seeds, ridge,
    content hash) and the metric's reference (``metric_fields``)."""
    cfg = p.cfg
    fields: dict[str, Any] = {
        "model": cfg.model.kind, "model_sha256": p.fingerprint, "method": p.method.name,
        "method_params": dict(p.method.params), "grid": cfg.grid.kind, **{f"grid.{k}": v for k, v in grid_params(cfg).items()},
        "grid.sigmas_sha256": _sigmas_sha256(p.sigmas), "nfe": p.nfe, "seeds": format_seeds(seeds),
        "n_samples": len(seeds), "metric": metric, "network_dtype": str(model_dtype(p.model)).removeprefix("torch."),
        "state_dtype": str(p.state_dtype).removeprefix("torch."),
        **_generic(cfg.sampler, "sampler", _SAMPLER_NOT_IN_IDENTITY),
    }
    fields.update(_solver_revision(p.method.solver))
    prompts = getattr(p.model, "prompts", None)
    if isinstance(prompts, (list, tuple)):  # text-to-image: the model fingerprint leaves the captions out
        fields["prompts_sha256"] = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    if p.method.is_iia:
        if coeffs is None:
            raise IIARuntimeError("internal: the identity of an IIA row needs its coefficients")
        cs = coeffs.cs
        fields.update({"calibration.substeps": cs.substeps, "calibration.samples": cs.samples,
                       "calibration.seeds": cs.seeds, "calibration.ridge": cs.ridge,
                       **_generic(cfg.calibration, "calibration", _CALIBRATION_NOT_IN_IDENTITY),
                       "coefficients_sha256": coeffs.sha256})
    fields.update(metric_fields)
    return fields


@dataclass
class Cell:
    """One result row to compute: a metric over the seeds of one seed range."""

    metric: str
    range_index: int
    seeds: list[int]
    identity: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Metrics shared by every (method, NFE) of a run


class MetricSetup:
    """What the run's metrics need (the registry's ``needs``), set up once per run: FID's Inception, reference
    statistics and features, the CLIP scorer, the reference solve of the integration-error seeds."""

    def __init__(self, cfg: ExperimentConfig, metrics: list[str], base: Prepared, model: Denoiser, err_seeds: list[int],
                 inception_weights: str | Path | None, log: LogFn, fresh: bool = False) -> None:
        self.cfg, self.metrics, self.model, self.err_seeds = cfg, metrics, model, err_seeds
        self.fields: dict[str, dict[str, Any]] = {}
        self.columns: dict[str, tuple[str, str]] = {}  # metric -> (reference, reference_sha256) columns
        self.ctx = MetricContext()
        needs = {m: METRICS[m].needs for m in metrics}
        every = set().union(*needs.values()) if needs else set()
        if "fine_reference" in every:
            self._fine_reference(needs, base, log, fresh)
        if "inception" in every:
            self._inception(needs, every, base, inception_weights, log)
        if "clip" in every:
            self._clip(base, log)

    def _fine_reference(self, needs: dict[str, Any], base: Prepared, log: LogFn, fresh: bool) -> None:
        """The integration error's reference solve of the error seeds (``evaluate.reference_method`` at
        ``evaluate.reference_nfe``), kept in a file named by what it depends on."""
        cfg, model, ev = self.cfg, self.model, self.cfg.evaluate
        ref_nfe = ev.reference_nfe
        if (cfg.sampler.convention == "diff-sampler"
                and make_solver(ev.reference_method, "diff-sampler").calls_per_step == 2):
            ref_nfe += ref_nfe % 2  # 2-call steps ending at sigma_min, where this convention's samples end
        ref_name = f"{ev.reference_method}@nfe{ref_nfe}"
        # The reference solves the plain ODE: no thresholding, no AFS (the error of a thresholded or AFS sampler
        # includes what they change).
        plain = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"thresholding": "none",
                                                                                 "afs": False})})
        ref = prepare(plain, ev.reference_method, ref_nfe, model=model, fingerprint=base.fingerprint,
                      memo=base.memo, grid=reference_grid(cfg, base.sigmas))
        fields = {"reference": {"method": ev.reference_method, "nfe": ref.nfe,
                                "sigmas_sha256": _sigmas_sha256(ref.sigmas), **_solver_revision(ref.method.solver)}}
        key = {**fields["reference"], "model_sha256": base.fingerprint, "device": ref.device.type,
               "state_dtype": str(ref.state_dtype), "network_dtype": str(model_dtype(model)),
               "class_label": cfg.sampler.class_label}
        store = layout.reference_cache_dir() / "solves" / (
            f"{ev.reference_method}-nfe{ref.nfe}-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            + ".npz")
        if fresh:
            store.unlink(missing_ok=True)
        self.ctx.reference = ReferenceSolutions(lambda seeds: _solve(ref, seeds), path=store,
                                                seeds=dist.split(self.err_seeds), log=log,
                                                save=dist.context().is_main)
        for m in self.metrics:
            if "fine_reference" in needs[m]:
                self.fields[m], self.columns[m] = dict(fields), (ref_name, "")

    def _inception(self, needs: dict[str, Any], every: set[str], base: Prepared,
                   inception_weights: str | Path | None, log: LogFn) -> None:
        """FID's Inception feature extractor and the reference statistics and features it is compared with."""
        from iia_cli.metrics.fid.features import FeatureExtractor
        from iia_cli.metrics.fid.weights import resolve_inception_weights
        from iia_cli.io.hashing import sha256_of_file

        cfg, metrics = self.cfg, self.metrics
        if not cfg.fid.reference:
            chosen = ", ".join(m for m in metrics if "inception" in needs[m])
            raise ConfigError(f"fid.reference is not set: {chosen} need reference images; give an .npz with "
                              "mu/sigma (e.g. EDM's cifar10-32x32.npz) or a data spec such as builtin:mnist, or "
                              f"leave {chosen} out of --metrics")
        weights, source = resolve_inception_weights(inception_weights, cfg.fid.inception_weights)
        log(f"Inception weights: {weights} ({source})")
        weights_sha = sha256_of_file(weights)
        main = dist.context().is_main
        if "reference_stats" in every:
            # rank 0 computes missing reference statistics, the others then read them
            ref_stats = resolve_reference(cfg, weights, base.device, log, weights_sha) if main else None
            dist.barrier()
            ref_path, self.ctx.ref_mu, self.ctx.ref_sigma, ref_sha = (
                ref_stats or resolve_reference(cfg, weights, base.device, log, weights_sha))
            for m in metrics:
                if "reference_stats" in needs[m]:
                    self.fields[m] = {"fid.reference_sha256": ref_sha, "fid.weights_sha256": weights_sha}
                    self.columns[m] = (str(ref_path), ref_sha)
        if "reference_features" in every:
            ref_feats = resolve_reference_features(cfg, weights, base.device, log, weights_sha) if main else None
            dist.barrier()
            feats_path, self.ctx.ref_features, feats_sha = (
                ref_feats or resolve_reference_features(cfg, weights, base.device, log, weights_sha))
            for m in metrics:
                if "reference_features" in needs[m]:
                    self.fields[m] = {"fid.reference": str(cfg.fid.reference),
                                      "fid.reference_samples": cfg.fid.reference_samples,
                                      "reference_features_sha256": feats_sha, "fid.weights_sha256": weights_sha}
                    self.columns[m] = (str(feats_path), feats_sha)
        self.ctx.extractor = FeatureExtractor(weights, device=base.device, batch_size=cfg.fid.batch)

    def _clip(self, base: Prepared, log: LogFn) -> None:
        """The CLIP scorer of a text-to-image model's samples against their prompts."""
        from iia_cli.metrics.clip_score import ClipScorer, resolve_clip_weights

        clip_dir = resolve_clip_weights(self.cfg.fid.clip_weights)
        if clip_dir is None or capabilities(self.model).prompt_of is None:
            raise ConfigError("clip_score needs a text-to-image model (model.kind=diffusers-sd) and local CLIP "
                              "weights (fid.clip_weights or $IIA_CLIP_WEIGHTS)")
        self.ctx.clip = ClipScorer(clip_dir, device=base.device, batch_size=self.cfg.fid.batch)
        self.ctx.prompt_of = self.model.prompt_of
        log(f"CLIP score with {clip_dir}")
        self.fields["clip_score"] = {"clip.weights": str(clip_dir.resolve())}
        self.columns["clip_score"] = (str(clip_dir), "")

    def accumulator(self, cell: Cell) -> Accumulator:
        """The accumulator of a cell's metric over its seeds."""
        return make_accumulator(cell.metric, cell.seeds, self.ctx)


GIVEN_GRID_KINDS = ("list", "file")  # grids whose sigmas are given for one NFE, not generated for any NFE


def reference_grid(cfg: ExperimentConfig, sigmas: torch.Tensor) -> GridConfig | None:
    """The grid section of the integration-error reference solve (``evaluate.reference_method`` at
    ``evaluate.reference_nfe``), or None: the run's own grid section, generated at the reference's NFE.

    A given grid (``grid.kind`` list or file) holds the coarse sigmas of one NFE and cannot be refined, so the
    reference takes a Karras grid (rho 7; Karras et al. 2022, eq. 5) over the run's sigma range instead: from the
    given grid's first sigma (where the samples start) down to its smallest positive sigma; whether it ends there or
    steps on to 0 follows the reference's own NFE plan, as for the generated grids."""
    if cfg.grid.kind not in GIVEN_GRID_KINDS:
        return None
    positive = sigmas[sigmas > 0]
    return GridConfig(kind="karras", rho=7.0, sigma_min=float(positive.min()), sigma_max=float(sigmas[0]))


def _solve(ref: Prepared, seeds: list[int]) -> torch.Tensor:
    """Final states of the reference solve (float64, CPU) of ``seeds``."""
    with ImageProgress(len(seeds), f"reference solve {ref.method.name} nfe={ref.nfe}") as bar:
        xs = [x.to(torch.float64).cpu() for _, x in sample_batches(
            ref.model, ref.method, ref.sigmas, seeds, ref.batch, None, ref.device, ref.state_dtype,
            ref.cfg.sampler.class_label, bar)]
    return torch.cat(xs)


def choose_metrics(cfg: ExperimentConfig, requested: Any, model: Denoiser) -> list[str]:
    """The metrics of a run: ``requested`` (``--metrics`` / ``evaluate.metrics``), else the default: the
    integration error (when evaluate.error_samples > 0), KID (when fid.reference is a data spec, whose features
    it needs), FID and, for text-to-image models with local CLIP weights, the CLIP score."""
    if requested is not None:
        metrics = parse_metrics(requested)
        if "integration_rmse" in metrics and cfg.evaluate.error_samples < 1:
            raise ConfigError("integration_rmse needs evaluate.error_samples >= 1 (seeds compared with the reference solve)")
        return metrics
    kid = bool(cfg.fid.reference) and not _is_stats_file(cfg)
    metrics = parse_metrics(["fid"] + (["kid"] if kid else []) + (["integration_rmse"] if cfg.evaluate.error_samples > 0
                                                                   else []))
    if capabilities(model).prompt_of is not None:
        from iia_cli.metrics.clip_score import resolve_clip_weights

        if resolve_clip_weights(cfg.fid.clip_weights) is not None:
            metrics.append("clip_score")
    return metrics


# ----------------------------------------------------------------------------------------------------------
# The run


def _identify(cells: list[Cell], p: Prepared, coeffs: ResolvedCoefficients | None, setup: MetricSetup) -> None:
    for c in cells:
        c.fields = identity_fields(p, coeffs, c.metric, c.seeds, setup.fields[c.metric])
        c.identity, _ = row_identity(c.fields)


def _run_pass(p: Prepared, coeffs: Coefficients | None, seeds: list[int], accs: list[Accumulator],
              partial: Path | None, progress: bool, label: str, log: LogFn = default_log) -> float:
    """Sample this process's share of ``seeds`` once and feed every accumulator from those samples;
    checkpoint the accumulators to ``partial`` so that an interrupted range resumes with bit-identical
    sums. Returns the sampling seconds."""
    mine = dist.split(seeds)
    done, t_sample = 0, 0.0
    if partial is not None and partial.is_file():
        with np.load(partial, allow_pickle=False) as data:
            done, t_sample = int(data["done"]), float(data["sampling_seconds"])
            load_states(accs, data, where=f"checkpoint {partial}")
    model = p.model
    every = checkpoint_interval() if partial is not None else math.inf  # read once, before the loop
    last = time.perf_counter()
    with ImageProgress(len(mine), label, enabled=progress) as bar:
        bar.resume(done)
        t0 = time.perf_counter()
        for chunk, x in sample_batches(model, p.method, p.sigmas, mine[done:], p.batch, coeffs, p.device,
                                       p.state_dtype, p.cfg.sampler.class_label, heartbeat=bar):
            t_sample += time.perf_counter() - t0
            batch = Batch(chunk, x, lambda x: quantize(to_images(model, x)))
            for acc in accs:
                acc.update(batch)
            done += len(chunk)
            bar.advance(len(chunk))
            if time.perf_counter() - last >= every and done < len(mine):
                state = {"done": np.int64(done), "sampling_seconds": np.float64(t_sample), **save_states(accs)}
                written = save_checkpoint(lambda: savez_atomic(partial, **state), partial, log)
                last = time.perf_counter() if written else math.inf
            t0 = time.perf_counter()
    return t_sample


def _shard_dir(cfg: ExperimentConfig) -> Path:
    return layout.shard_dir(cfg.experiment)


def _shard_file(cfg: ExperimentConfig, identity: str) -> Path:
    i, n = dist.context().shard  # type: ignore[misc]
    return _shard_dir(cfg) / f"{identity}.shard-{i}-of-{n}.npz"


@dataclass
class _EvalPlan:
    """An evaluation's grid, resolved once: the CSV, the seed ranges, the prepared (method, NFE) runs, the
    metrics (those on the integration-error seeds apart) and what they share."""

    csv_path: Path
    ranges: list[list[int]]
    prepared: dict[tuple[str, int], Prepared]
    chosen: list[str]
    on_err: list[str]  # metrics on the error seeds only
    err_seeds: list[int]
    setup: MetricSetup

    def cells(self) -> list[Cell]:
        """The rows of one (method, NFE): the error-seed metrics, then each seed range's other metrics."""
        cells = [Cell(metric, 0, self.err_seeds) for metric in self.on_err]
        cells += [Cell(metric, k, seeds) for k, seeds in enumerate(self.ranges) for metric in self.chosen
                  if metric not in self.on_err]
        return cells


def evaluate(cfg: ExperimentConfig, nfes: list[int] | None = None, methods: list[str] | None = None,
             samples: int | None = None, seed_ranges: Any = None, csv: str | Path | None = None,
             inception_weights: str | Path | None = None, fid: bool = True, fresh: bool = False,
             log: LogFn = default_log, progress: bool = True, metrics: Any = None) -> EvaluateResult:
    """Run the evaluation grid (methods x NFEs x seed ranges) and append rows to the results CSV.

    For each (method, NFE): prepare once, find or fit the coefficients once, then sample each seed range once
    and feed every metric (``metrics``: fid, integration_rmse, clip_score) from those samples. A row whose
    identity (:func:`identity_fields`) is already in the CSV is skipped (``fresh`` recomputes it); an
    interrupted range resumes from its checkpoint, so rerunning an interrupted command ends with the rows of an
    uninterrupted run. Under torchrun the seeds are split across ranks and the sums all-reduced; with
    ``--shard i/n`` each process writes shard files under results/shards/<experiment>/ for ``iia merge``.
    ``fid=False`` (``--no-fid``) means the integration error only."""
    plan = _plan_evaluation(cfg, nfes, methods, samples, seed_ranges, csv, inception_weights, fid, fresh, log,
                            metrics)
    t_run = time.perf_counter()
    timing = {"interval_seconds": 0.0}
    all_rows: list[dict[str, Any]] = []
    identities: list[str] = []
    skipped = 0
    for p in plan.prepared.values():
        cells = plan.cells()
        coeffs, todo = _coefficients_and_todo(p, cells, plan, fresh, log)
        identities += [c.identity for c in cells if c.identity]
        skipped += len(cells) - len(todo)
        if not todo:
            continue
        rows = _evaluate_cells(p, coeffs, todo, plan.ranges, plan.setup, fresh, progress, log, timing)
        _write_rows(p, plan.csv_path, rows, fresh, log)
        all_rows.extend(rows)
    _report_run(cfg, plan.csv_path, len(identities), skipped, all_rows, t_run, timing, log)
    return EvaluateResult(plan.csv_path, all_rows, identities, skipped, timing["interval_seconds"])


def _plan_evaluation(cfg: ExperimentConfig, nfes: list[int] | None, methods: list[str] | None, samples: int | None,
                     seed_ranges: Any, csv: str | Path | None, inception_weights: str | Path | None, fid: bool,
                     fresh: bool, log: LogFn, metrics: Any) -> _EvalPlan:
    """:func:`evaluate`'s arguments checked and resolved: the NFEs, methods, seed ranges and CSV (its header
    checked before any work), every (method, NFE) prepared on one model, and the metrics set up."""
    ev = cfg.evaluate
    nfes = [check_nfe(n, "--nfe") for n in (ev.nfe if nfes is None else nfes)]  # None = the config's; 0 is an error
    methods = ev.methods if methods is None else methods
    n_samples = ev.samples if samples is None else samples
    if not nfes or not methods:
        raise ConfigError(f"--{'nfe' if not nfes else 'methods'} is empty; give at least one, e.g. --nfe 9 --methods edm")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"--samples={n_samples!r} is not valid; give a number of images >= 1")
    given = seed_ranges if seed_ranges is not None else ev.seed_ranges
    ranges = parse_seed_ranges(given if given is not None else f"0-{n_samples - 1}")
    if samples is not None and given is not None:
        ranges = [r[:n_samples] for r in ranges]
    csv_path = Path(csv or ev.csv or layout.results_csv(cfg.experiment))
    if not dist.context().shard:
        check_header(csv_path)  # before any work: rows that could not be appended would be lost
    requested = metrics if metrics is not None else ev.metrics
    if not fid:
        if requested is not None and "fid" in parse_metrics(requested):
            raise ConfigError("--no-fid contradicts --metrics/evaluate.metrics with fid; give one of them")
        requested = requested if requested is not None else ["integration_rmse"]
    memo = ModelMemo()  # this run's teacher trajectories and batch probe, shared by its methods and nobody else
    base = prepare(cfg, methods[0], nfes[0], memo=memo)  # loads the model once
    model, fp = base.model, base.fingerprint
    prepared = {(m, n): prepare(cfg, m, n, model=model, fingerprint=fp, memo=memo) for m in methods for n in nfes}  # validates all
    chosen = choose_metrics(cfg, requested, model)
    on_err = [m for m in chosen if "fine_reference" in METRICS[m].needs]  # metrics on the error seeds only
    err_seeds = ranges[0][: max(0, ev.error_samples)] if on_err else []
    setup = MetricSetup(cfg, chosen, base, model, err_seeds, inception_weights, log, fresh=fresh)
    return _EvalPlan(csv_path, ranges, prepared, chosen, on_err, err_seeds, setup)


def _coefficients_and_todo(p: Prepared, cells: list[Cell], plan: _EvalPlan, fresh: bool,
                           log: LogFn) -> tuple[ResolvedCoefficients | None, list[Cell]]:
    """The coefficients of one (method, NFE), fitted only when a row is still to compute, and its cells left
    (each identified once the coefficients are known)."""
    coeffs = None
    if p.method.is_iia:
        coeffs, _ = find_coefficients(p, match_calibration=True)
    todo = _todo(cells, p, coeffs, plan.setup, plan.csv_path, fresh)
    if todo and p.method.is_iia and coeffs is None:
        coeffs = resolve_coefficients(p, calibrate_missing=True, log=log, match_calibration=True)
        todo = _todo(cells, p, coeffs, plan.setup, plan.csv_path, fresh)  # a recalibration can reproduce a done row
    elif coeffs is not None and todo:
        log(f"{p.method.name} nfe={p.nfe}: reusing coefficients {coeffs.path}")
        if coeffs.cs.warning:
            log(coeffs.cs.warning)
    return coeffs, todo


def _write_rows(p: Prepared, csv_path: Path, rows: list[dict[str, Any]], fresh: bool, log: LogFn) -> None:
    """Append one (method, NFE)'s rows to the CSV (rank 0, without --shard): nothing is lost if a later one fails."""
    ctx = dist.context()
    if rows and ctx.is_main and not ctx.shard:
        written = append_rows(csv_path, rows, skip_done=not fresh)
        if len(written) < len(rows):
            log(f"{p.method.name} nfe={p.nfe}: {len(rows) - len(written)} row(s) appeared in {csv_path} meanwhile "
                "(another run with the same settings); not appended twice")


def _report_run(cfg: ExperimentConfig, csv_path: Path, total: int, skipped: int, all_rows: list[dict[str, Any]],
                t_run: float, timing: dict[str, float], log: LogFn) -> None:
    """Say which rows were skipped, where the shard sums went (--shard) and what the intervals cost."""
    ctx = dist.context()
    where = csv_path if not ctx.shard else _shard_dir(cfg)
    if skipped:
        log(f"all {total} rows already in {where} (same identity); --fresh recomputes" if skipped == total else
            f"{skipped} of {total} rows already in {where} (same identity), skipped; --fresh recomputes them")
    if ctx.shard:
        log(f"shard {ctx.shard[0]}/{ctx.shard[1]} done: partial sums in {_shard_dir(cfg)}/; "
            f"combine them with `iia merge {_shard_dir(cfg)} --csv {csv_path}`")
    if all_rows:
        seconds = time.perf_counter() - t_run
        log(f"uncertainty: values, 95 % intervals and replicates of {len(all_rows)} rows took "
            f"{timing['interval_seconds']:.1f} s of this run's {seconds:.0f} s "
            f"({100 * timing['interval_seconds'] / max(seconds, 1e-9):.1f} %)")


def _todo(cells: list[Cell], p: Prepared, coeffs: ResolvedCoefficients | None, setup: MetricSetup, csv_path: Path,
          fresh: bool) -> list[Cell]:
    """The cells still to compute: all with ``fresh`` or while the coefficients are still to be fitted, else
    those whose identity is not in the CSV (with --shard: whose shard file is missing)."""
    if p.method.is_iia and coeffs is None:
        return cells
    _identify(cells, p, coeffs, setup)
    if fresh:
        return cells
    ctx = dist.context()
    if ctx.shard:
        return [c for c in cells if not _shard_file(p.cfg, c.identity).is_file()]
    done = dist.gather_objects(done_identities(csv_path))[0]  # rank 0's view: every rank takes the same cells
    return [c for c in cells if c.identity not in done]


def _evaluate_cells(p: Prepared, coeffs: ResolvedCoefficients | None, todo: list[Cell], ranges: list[list[int]],
                    setup: MetricSetup, fresh: bool, progress: bool, log: LogFn,
                    timing: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Sample each seed range once for the cells of this (method, NFE), then finish every cell generically:
    a shard file (--shard), or all-reduced state -> value -> row."""
    common = _common_fields(p, coeffs)
    rows = []
    for k, seeds in enumerate(ranges):
        cells = [c for c in todo if c.range_index == k]
        if cells:
            rows += _evaluate_range(p, coeffs, cells, seeds, setup, common, fresh, progress, log, timing)
    return rows


def _common_fields(p: Prepared, coeffs: ResolvedCoefficients | None) -> dict[str, Any]:
    """The columns every row of one (method, NFE) shares: the experiment, model, method, grid, calibration."""
    cfg = p.cfg
    cs = coeffs.cs if coeffs is not None else None
    return dict(experiment=cfg.experiment, model=cfg.model.kind, model_sha256=p.fingerprint, method=p.method.name,
                method_params=p.method.params, r=p.method.params.get("r", ""), M=cs.substeps if cs else "",
                B=cs.samples if cs else "", grid=cfg.grid.kind, nfe=p.nfe, device=str(p.device),
                coefficient_file=str(coeffs.path) if coeffs else "",
                calibration_seconds=round(cs.calibration_seconds, 3) if cs else 0.0)


def _evaluate_range(p: Prepared, coeffs: ResolvedCoefficients | None, cells: list[Cell], seeds: list[int],
                    setup: MetricSetup, common: dict[str, Any], fresh: bool, progress: bool, log: LogFn,
                    timing: dict[str, float] | None) -> list[dict[str, Any]]:
    """Sample one seed range once (resuming from its checkpoint) for its cells and finish each: its shard file
    (--shard) or its row."""
    ctx = dist.context()
    # the integration-error seeds are the first seeds of range 0: sampled with the range when another
    # metric needs the range, else alone
    pass_seeds = seeds if any("fine_reference" not in METRICS[c.metric].needs for c in cells) else cells[0].seeds
    accs = [setup.accumulator(c) for c in cells]
    key = hashlib.sha256("|".join(c.identity for c in cells).encode()).hexdigest()[:16]
    tag = f"-shard{ctx.shard[0]}of{ctx.shard[1]}" if ctx.shard else ""
    partial = layout.partial_dir() / f"{key}-r{ctx.rank}of{ctx.world}{tag}.npz"
    if fresh:
        partial.unlink(missing_ok=True)
    label = f"{p.method.name} nfe={p.nfe} " + ",".join(c.metric for c in cells)
    secs = _run_pass(p, coeffs.values if coeffs else None, pass_seeds, accs, partial, progress, label, log)
    rows, rescued = [], []
    for cell, acc in zip(cells, accs):
        reference, reference_sha = setup.columns[cell.metric]
        identity, text = row_identity(cell.fields)
        row = make_row(**common, seeds=format_seeds(cell.seeds), n_samples=len(cell.seeds), metric=cell.metric,
                       value="", reference=reference, reference_sha256=reference_sha,
                       sampling_seconds=round(secs, 3), identity=identity, identity_fields=text)
        if ctx.shard:
            rescued += _write_shard(p.cfg, identity, row, acc)
            continue
        rows.append(_finish_row(p, cell, acc, row, secs, log, timing))
    if rescued:
        raise OutputRescued("; ".join(rescued), None)
    dist.barrier()
    partial.unlink(missing_ok=True)
    return rows


def _write_shard(cfg: ExperimentConfig, identity: str, row: dict[str, Any], acc: Accumulator) -> list[str]:
    """A cell's row and partial sums as its shard file; returns what went to a rescue file instead (the other
    cells are still written)."""
    ctx = dist.context()
    meta = json.dumps({"row": row, "shard": ctx.shard[0], "shards": ctx.shard[1]})
    shard_file = _shard_file(cfg, identity)
    try:
        savez_atomic(shard_file, rescue=True, what="shard sums", meta=np.asarray(meta), **acc.state)
    except OutputRescued as exc:
        return [f"{exc}" + (f" (for iia merge, move it to {shard_file})" if exc.rescued else "")]
    return []


def _finish_row(p: Prepared, cell: Cell, acc: Accumulator, row: dict[str, Any], secs: float, log: LogFn,
                timing: dict[str, float] | None) -> dict[str, Any]:
    """A cell's value and interval from its all-reduced sums into its row, said in one line."""
    acc.all_reduce()
    acc.check_complete()
    t0 = time.perf_counter()
    row.update(result_fields(acc))
    if timing is not None:
        timing["interval_seconds"] += time.perf_counter() - t0
    fmt = METRICS[cell.metric].fmt
    log(f"{p.method.name} nfe={p.nfe} seeds {row['seeds']}: {cell.metric} = {fmt(row['value'])} "
        f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}] "
        f"({len(cell.seeds)} seeds, sampling {secs:.1f} s)" + (f"; {row['ci_warning']}" if row["ci_warning"] else ""))
    return row


def merge_shards(shard_dir: str | Path, csv: str | Path, log: LogFn = default_log) -> EvaluateResult:
    """Combine complete sets of shard files (same identity, shards 0..n-1) into result rows through the
    metrics' generic merge (sums added, then the value); incomplete sets are reported and left for later."""
    shard_dir, csv_path = Path(shard_dir), Path(csv)
    files = sorted(shard_dir.glob("*.shard-*-of-*.npz"))
    if not files:
        raise IIARuntimeError(f"no shard files (*.shard-i-of-n.npz) in {shard_dir}")
    check_header(csv_path)
    groups: dict[str, list[tuple[dict[str, Any], dict[str, np.ndarray], Path]]] = {}
    for f in files:
        meta, arrays = _read_shard(f)
        groups.setdefault(meta["row"]["identity"], []).append((meta, arrays, f))
    done = done_identities(csv_path)
    rows, incomplete = [], 0
    for identity, parts in groups.items():
        meta = parts[0][0]
        row = dict(meta["row"])
        if identity in done:
            continue
        n_shards = {m["shards"] for m, _, _ in parts}
        have = sorted(m["shard"] for m, _, _ in parts)
        if len(n_shards) > 1:
            raise IIARuntimeError(f"shard files of {row['method']} nfe={row['nfe']} {row['metric']} in {shard_dir} "
                                  f"come from runs with different shard counts {sorted(n_shards)}; remove the stale ones")
        if have != list(range(meta["shards"])):
            incomplete += 1
            log(f"incomplete: {row['method']} nfe={row['nfe']} {row['metric']} seeds {row['seeds']}: shards "
                f"{have} of {meta['shards']}")
            continue
        acc = make_accumulator(row["metric"], parse_seeds(row["seeds"]), _merge_context(row))
        for _, arrays, f in parts:
            acc.merge(arrays, where=f"shard file {f}")
        acc.check_complete(where=f"shard files of {row['method']} nfe={row['nfe']} {row['metric']} in {shard_dir}")
        row.update(result_fields(acc))
        row["sampling_seconds"] = round(sum(float(m["row"]["sampling_seconds"] or 0) for m, _, _ in parts), 3)
        rows.append(row)
        log(f"merged {len(parts)} shards: {row['method']} nfe={row['nfe']} {row['metric']} = {row['value']:.5g}")
    if rows:
        rows = append_rows(csv_path, rows, skip_done=True)
    if not rows and incomplete:
        raise IIARuntimeError(f"no complete shard set in {shard_dir} ({incomplete} incomplete); "
                              "run the missing shards first")
    return EvaluateResult(csv_path, rows)


def _merge_context(row: dict[str, Any]) -> MetricContext:
    """The references a metric's value needs when shard sums are merged (checked against the row's hash)."""
    from iia_cli.metrics.fid.stats import load_reference
    from iia_cli.metrics.fid.compute import load_reference_features

    needs = METRICS[row["metric"]].needs
    ctx = MetricContext()
    if "reference_stats" in needs:
        ctx.ref_mu, ctx.ref_sigma, sha = load_reference(row["reference"])
    elif "reference_features" in needs:
        ctx.ref_features, sha = load_reference_features(row["reference"])
    else:
        return ctx
    if sha != row["reference_sha256"]:
        raise IIARuntimeError(f"reference {row['reference']} changed since the shards were written "
                              f"(sha256 {sha[:12]} != {row['reference_sha256'][:12]})")
    return ctx


def _read_shard(f: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, float64 state arrays) of a shard file; a one-line error for a truncated or foreign file."""
    try:
        with np.load(f, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in data.files if k != "meta"}
    except Exception as exc:  # zipfile, OSError, EOFError, KeyError, ValueError, ...: all mean unreadable
        raise IIARuntimeError(f"shard file {f} is unreadable ({type(exc).__name__}); delete it and rerun its "
                              "shard") from None
    row = meta.get("row") if isinstance(meta, dict) else None
    ok = (isinstance(row, dict) and all(isinstance(row.get(k), str) and row.get(k) for k in ("identity", "metric"))
          and row["metric"] in METRICS and set(COLUMNS) <= set(row)
          and isinstance(meta.get("shard"), int) and isinstance(meta.get("shards"), int)
          and 0 <= meta["shard"] < meta["shards"])
    if not ok:
        raise IIARuntimeError(f"shard file {f} has no valid iia_cli metadata (row with identity and metric, shard "
                              "i of n); it was not written by this version of iia evaluate --shard")
    return meta, arrays


def print_table(csv_path: Path, experiment: str | None = None, only_rows: list[dict[str, Any]] | None = None,
                identities: list[str] | None = None) -> None:
    """The methods x NFE tables of a results CSV (or of the rows just computed, or of the rows with the given
    identities: those of one evaluate run), one per experiment, then a note for every (method, NFE, metric)
    whose rows have different settings."""
    import pandas as pd
    from rich.console import Console

    from iia_cli.tables.results import figure_title

    if only_rows is not None:
        df = normalise_results(pd.DataFrame(only_rows), "results")
    else:
        df = read_results(csv_path)
    if identities is not None:
        df = df[df["identity"].isin(set(identities))]
    if experiment and "experiment" in df:
        df = df[df["experiment"] == experiment]
    console = Console()
    groups = list(df.groupby("experiment", sort=False)) if "experiment" in df and len(df) else [("", df)]
    for _, part in groups:
        console.print(render_table(part, title=figure_title(part) or str(csv_path)))
    for note in identity_conflicts(df)[1]:
        console.print(f"note: {note}", soft_wrap=True, markup=False, highlight=False)


def print_comparison(csv_path: Path, a: str, b: str, experiment: str | None = None) -> None:
    """``iia report --compare A B``: every paired comparison of two methods (table labels) in a results CSV."""
    from rich.console import Console

    from iia_cli.tables.results import compare_methods

    df = read_results(csv_path)
    if experiment and "experiment" in df:
        df = df[df["experiment"] == experiment]
    pairs = dict.fromkeys(zip(df["method"] + df["method_params"].map(_label_params), df["method"]))
    labels = [lab for lab, _ in pairs]

    def resolve(name: str) -> str:
        """A table label ('iia-edm r=1'), or a method name with exactly one label in the CSV ('iia-edm')."""
        if name in labels:
            return name
        match = [lab for lab, method in pairs if method == name]
        if len(match) == 1:
            return match[0]
        if match:
            raise ConfigError(f"--compare: method {name!r} has rows of several settings ({', '.join(match)}); "
                              "give one of these labels")
        raise ConfigError(f"--compare: no rows of method {name!r} in {csv_path}; methods there: "
                          f"{', '.join(labels)}")

    a, b = resolve(a), resolve(b)
    table, found = compare_methods(df, a, b)
    if not found:
        raise IIARuntimeError(f"{a} and {b} have no (NFE, metric) in common in {csv_path}")
    console = Console()
    console.width = max(console.width, 200)  # a wide table: let it wrap in the terminal rather than in the cells
    console.print(table)


def _label_params(text: str) -> str:
    from iia_cli.tables.results import _params_label

    return _params_label(text)
