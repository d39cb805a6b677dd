"""``iia evaluate``: for each (method, NFE) calibrate when needed, sample, compute FID per seed range and
the integration error against a high-NFE reference, and append tidy rows to the results CSV."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .api import LogFn, Prepared, calibrate, default_coefficient_path, prepare
from .config import ExperimentConfig
from .errors import ConfigError, IIARuntimeError
from .iia import CoefficientSet
from .images import quantize
from .models import load_model, model_fingerprint
from .progress import ImageProgress, log as default_log
from .results import append_rows, make_row, read_results, render_table
from .sampling import BoundDenoiser, format_seeds, make_noise, parse_seeds, run_steps, sample_batches
from .models.base import label_dim


@dataclass
class EvaluateResult:
    csv: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def parse_seed_ranges(spec: Any) -> list[list[int]]:
    """'0-999;1000-1999' or a list of range strings -> list of seed lists."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(";")
    ranges = [parse_seeds(item) for item in items if str(item).strip()]
    if not ranges:
        raise ConfigError("no seed ranges given; write e.g. --seed-ranges '0-999;1000-1999'")
    return ranges


def resolve_reference(cfg: ExperimentConfig, weights: Path, device: torch.device, log: LogFn) -> tuple[Path, str]:
    """Reference statistics: an existing .npz, or statistics computed once from a data spec and cached."""
    from .fid import compute_reference, load_reference, sha256_of_file

    spec = cfg.fid.reference
    if not spec:
        raise ConfigError("fid.reference is not set: give an .npz with mu/sigma (e.g. EDM's cifar10-32x32.npz) "
                          "or a data spec such as builtin:mnist")
    path = Path(spec)
    if path.suffix == ".npz" and not str(spec).startswith("builtin:"):
        _, _, sha = load_reference(path)
        return path, sha
    key = hashlib.sha256(f"{spec}|{cfg.fid.reference_samples}|{sha256_of_file(weights)}".encode()).hexdigest()[:10]
    safe = str(spec).replace(":", "-").replace("/", "_")
    cached = Path("results/cache") / f"reference-{safe}-{cfg.fid.reference_samples or 'all'}-{key}.npz"
    if not cached.is_file():
        log(f"computing reference statistics of {spec} ({cfg.fid.reference_samples or 'all'} images) -> {cached}")
        compute_reference(spec, cached, weights, device=str(device), batch_size=cfg.fid.batch,
                          limit=cfg.fid.reference_samples)
    _, _, sha = load_reference(cached)
    return cached, sha


def _reference_solution(prepared: Prepared, cfg: ExperimentConfig, seeds: list[int], batch: int,
                        cache: dict[tuple, torch.Tensor]) -> torch.Tensor:
    """A high-accuracy solve (default: EDM Heun at NFE 999) of the same noises, cached per seeds."""
    key = (tuple(seeds), cfg.evaluate.reference_method, cfg.evaluate.reference_nfe)
    if key not in cache:
        ref = prepare(cfg, cfg.evaluate.reference_method, cfg.evaluate.reference_nfe, model=prepared.model,
                      fingerprint=prepared.fingerprint)
        xs = [x for _, x in sample_batches(ref.model, ref.method, ref.sigmas, seeds, batch, None, ref.device,
                                           ref.state_dtype, cfg.sampler.class_label)]
        cache[key] = torch.cat(xs).to(torch.float64).cpu()
    return cache[key]


def evaluate(cfg: ExperimentConfig, nfes: list[int] | None = None, methods: list[str] | None = None,
             samples: int | None = None, seed_ranges: Any = None, csv: str | Path | None = None,
             inception_weights: str | Path | None = None, fid: bool = True, log: LogFn = default_log,
             progress: bool = True) -> EvaluateResult:
    """Run the evaluation grid (methods x NFEs x seed ranges) and append rows to the results CSV."""
    from .fid import FeatureExtractor, FeatureStats, fid_from_stats, load_reference, resolve_inception_weights

    ev = cfg.evaluate
    nfes = [int(n) for n in (nfes or ev.nfe)]
    methods = methods or ev.methods
    n_samples = int(samples or ev.samples)
    ranges = parse_seed_ranges(seed_ranges or ev.seed_ranges or f"0-{n_samples - 1}")
    if samples is not None and (seed_ranges or ev.seed_ranges):
        ranges = [r[:n_samples] for r in ranges]
    csv_path = Path(csv or ev.csv or f"results/{cfg.experiment}.csv")
    batch = cfg.sampler.batch
    base = prepare(cfg, methods[0], nfes[0])  # loads the model once
    model, fp = base.model, base.fingerprint
    for m in methods:  # validate every (method, NFE) before any work
        for n in nfes:
            prepare(cfg, m, n, model=model, fingerprint=fp)
    ref_path = ref_sha = None
    extractor = ref_mu = ref_sigma = None
    if fid:
        weights, source = resolve_inception_weights(inception_weights, cfg.fid.inception_weights)
        log(f"Inception weights: {weights} ({source})")
        ref_path, ref_sha = resolve_reference(cfg, weights, base.device, log)
        ref_mu, ref_sigma, _ = load_reference(ref_path)
        extractor = FeatureExtractor(weights, device=base.device, batch_size=cfg.fid.batch)
    ref_cache: dict[tuple, torch.Tensor] = {}
    err_seeds = ranges[0][: max(0, ev.error_samples)]
    all_rows: list[dict[str, Any]] = []
    for m in methods:
        for n in nfes:
            p = prepare(cfg, m, n, model=model, fingerprint=fp)
            coeffs, coeff_file, calib_s = None, "", 0.0
            if p.method.is_iia:
                path = default_coefficient_path(p)
                cs = CoefficientSet.load(path) if path.is_file() else None
                if cs is not None and not cs.mismatches(p.method.name, dict(p.method.params), p.fingerprint,
                                                         cfg.grid.kind, p.sigmas, p.nfe):
                    log(f"{m} nfe={p.nfe}: reusing coefficients {path}")
                else:
                    cs, path = calibrate(cfg, prepared=p, log=log, verbose=False)
                coeffs, coeff_file, calib_s = cs.coefficients, str(path), cs.calibration_seconds
            common = dict(experiment=cfg.experiment, model=cfg.model.kind, model_sha256=fp, method=p.method.name,
                          method_params=p.method.params, r=p.method.params.get("r", ""),
                          M=cfg.calibration.substeps if p.method.is_iia else "",
                          B=cfg.calibration.samples if p.method.is_iia else "", grid=cfg.grid.kind, nfe=p.nfe,
                          coefficient_file=coeff_file, calibration_seconds=round(calib_s, 3), device=str(p.device))
            rows = []
            if err_seeds:
                t0 = time.perf_counter()
                xs = torch.cat([x for _, x in sample_batches(model, p.method, p.sigmas, err_seeds, batch, coeffs,
                                                             p.device, p.state_dtype, cfg.sampler.class_label)])
                secs = time.perf_counter() - t0
                ref = _reference_solution(p, cfg, err_seeds, batch, ref_cache)
                rmse = float((xs.to(torch.float64).cpu() - ref).pow(2).mean().sqrt())
                rows.append(make_row(**common, seeds=format_seeds(err_seeds), n_samples=len(err_seeds),
                                     metric="integration_rmse", value=rmse,
                                     reference=f"{cfg.evaluate.reference_method}@nfe{cfg.evaluate.reference_nfe}",
                                     sampling_seconds=round(secs, 3)))
                log(f"{p.method.name} nfe={p.nfe}: integration RMSE vs {cfg.evaluate.reference_method}"
                    f"@{cfg.evaluate.reference_nfe} = {rmse:.5f} ({len(err_seeds)} seeds)")
            if fid:
                for seeds in ranges:
                    stats = FeatureStats.empty()
                    t_sample = 0.0
                    with ImageProgress(len(seeds), f"{p.method.name} nfe={p.nfe} FID", enabled=progress) as bar:
                        t0 = time.perf_counter()
                        for _, x in sample_batches(model, p.method, p.sigmas, seeds, batch, coeffs, p.device,
                                                   p.state_dtype, cfg.sampler.class_label):
                            t_sample += time.perf_counter() - t0
                            stats.update(extractor(quantize(x)))
                            bar.advance(x.shape[0])
                            t0 = time.perf_counter()
                    value = fid_from_stats(stats, ref_mu, ref_sigma)
                    rows.append(make_row(**common, seeds=format_seeds(seeds), n_samples=len(seeds), metric="fid",
                                         value=value, reference=str(ref_path), reference_sha256=ref_sha,
                                         sampling_seconds=round(t_sample, 3)))
                    log(f"{p.method.name} nfe={p.nfe} seeds {format_seeds(seeds)}: FID {value:.3f} "
                        f"({len(seeds)} images, sampling {t_sample:.1f} s)")
            if rows:
                append_rows(csv_path, rows)  # after each (method, NFE): nothing is lost if a later one fails
                all_rows.extend(rows)
    return EvaluateResult(csv_path, all_rows)


def print_table(csv_path: Path, experiment: str | None = None, only_rows: list[dict[str, Any]] | None = None) -> None:
    import pandas as pd
    from rich.console import Console

    df = pd.DataFrame(only_rows) if only_rows is not None else read_results(csv_path)
    if only_rows is not None and len(df):
        df["value"] = df["value"].astype(float)
        df["nfe"] = df["nfe"].astype(int)
    if experiment and "experiment" in df:
        df = df[df["experiment"] == experiment]
    Console().print(render_table(df, title=f"{experiment or csv_path}: FID min (mean over seed ranges) / integration RMSE"))
