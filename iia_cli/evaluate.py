"""``iia evaluate``: for each (method, NFE) calibrate when needed, sample, compute FID per seed range and
the integration error against a high-NFE reference, and append tidy rows to the results CSV."""

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

from . import dist
from .api import LogFn, Prepared, calibrate, checkpoint_interval, default_coefficient_path, prepare
from .atomic import savez_atomic
from .config import ExperimentConfig
from .errors import ConfigError, IIARuntimeError
from .iia import CoefficientSet
from .images import quantize
from .progress import ImageProgress, log as default_log
from .results import append_rows, make_row, read_results, render_table
from .sampling import format_seeds, parse_seeds, sample_batches, to_images


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


def resolve_reference(cfg: ExperimentConfig, weights: Path, device: torch.device,
                      log: LogFn) -> tuple[Path, np.ndarray, np.ndarray, str]:
    """Reference statistics (path, mu, sigma, sha256): an existing .npz, or statistics computed once from a
    data spec and cached."""
    from .fid import compute_reference, load_reference, sha256_of_file

    spec = cfg.fid.reference
    if not spec:
        raise ConfigError("fid.reference is not set: give an .npz with mu/sigma (e.g. EDM's cifar10-32x32.npz) "
                          "or a data spec such as builtin:mnist")
    path = Path(spec)
    if path.suffix == ".npz" and not str(spec).startswith("builtin:"):
        return (path, *load_reference(path))
    key = hashlib.sha256(f"{spec}|{cfg.fid.reference_samples}|{sha256_of_file(weights)}".encode()).hexdigest()[:10]
    safe = str(spec).replace(":", "-").replace("/", "_")
    cached = Path("results/cache") / f"reference-{safe}-{cfg.fid.reference_samples or 'all'}-{key}.npz"
    if not cached.is_file():
        log(f"computing reference statistics of {spec} ({cfg.fid.reference_samples or 'all'} images) -> {cached}")
        compute_reference(spec, cached, weights, device=str(device), batch_size=cfg.fid.batch,
                          limit=cfg.fid.reference_samples)
    return (cached, *load_reference(cached))


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


def _row_key(row: dict[str, Any]) -> tuple:
    """What identifies a result: the same experiment, model, method, grid, NFE, seeds and metric."""
    params = row["method_params"]
    if isinstance(params, dict):
        params = json.dumps(params, sort_keys=True)
    return tuple(str(row[k]) for k in ("experiment", "model_sha256", "method")) + (str(params or "{}"),) + \
        tuple(str(row[k]) for k in ("grid", "nfe", "seeds", "n_samples", "metric"))


def _done_keys(csv_path: Path) -> set[tuple]:
    if not csv_path.is_file():
        return set()
    import csv as _csv

    with csv_path.open(newline="") as f:
        return {_row_key(r) for r in _csv.DictReader(f)}


def _key_hash(key: tuple) -> str:
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _shard_file(cfg: ExperimentConfig, key: tuple) -> Path:
    i, n = dist.context().shard  # type: ignore[misc]
    return Path("results/shards") / cfg.experiment / f"{_key_hash(key)}.shard-{i}-of-{n}.npz"


def _write_shard(cfg: ExperimentConfig, row: dict[str, Any], **arrays: Any) -> Path:
    i, n = dist.context().shard  # type: ignore[misc]
    meta = json.dumps({"row": row, "key": list(_row_key(row)), "shard": i, "shards": n})
    return savez_atomic(_shard_file(cfg, _row_key(row)), meta=np.asarray(meta), **arrays)


def _fid_of_range(model: Any, p: Prepared, seeds: list[int], coeffs: Any, batch: int, class_label: int | None,
                  extractor: Any, partial: Path | None, progress: bool,
                  clip: Any = None) -> tuple[Any, float, tuple[float, float]]:
    """Feature sums of this process's share of ``seeds`` (and CLIP-score sums when ``clip`` scores images
    against their prompts), checkpointed to ``partial`` so that an interrupted run resumes with
    bit-identical sums. Returns (stats, sampling seconds, (clip images, clip score sum))."""
    from .fid import FeatureStats

    mine = dist.split(seeds)
    stats, done, t_sample, clip_n, clip_sum = FeatureStats.empty(), 0, 0.0, 0.0, 0.0
    if partial is not None and partial.is_file():
        with np.load(partial) as data:
            stats = FeatureStats(int(data["n"]), data["sum"].copy(), data["sum_outer"].copy())
            done, t_sample = int(data["done"]), float(data["sampling_seconds"])
            clip_n, clip_sum = float(data["clip_n"]), float(data["clip_sum"])
    todo = mine[done:]
    last = time.perf_counter()
    with ImageProgress(len(mine), f"{p.method.name} nfe={p.nfe} FID", enabled=progress) as bar:
        bar.advance(done)
        t0 = time.perf_counter()
        for chunk, x in sample_batches(model, p.method, p.sigmas, todo, batch, coeffs, p.device, p.state_dtype,
                                       class_label):
            t_sample += time.perf_counter() - t0
            u8 = quantize(to_images(model, x))
            stats.update(extractor(u8))
            if clip is not None:
                scores = clip(u8.numpy(), [model.prompt_of(s) for s in chunk])
                clip_n, clip_sum = clip_n + len(chunk), clip_sum + float(scores.to(torch.float64).sum())
            done += len(chunk)
            bar.advance(len(chunk))
            if partial is not None and time.perf_counter() - last >= checkpoint_interval() and done < len(mine):
                savez_atomic(partial, n=np.int64(stats.n), sum=stats.sum, sum_outer=stats.sum_outer,
                             done=np.int64(done), sampling_seconds=np.float64(t_sample),
                             clip_n=np.float64(clip_n), clip_sum=np.float64(clip_sum))
                last = time.perf_counter()
            t0 = time.perf_counter()
    return stats, t_sample, (clip_n, clip_sum)


def evaluate(cfg: ExperimentConfig, nfes: list[int] | None = None, methods: list[str] | None = None,
             samples: int | None = None, seed_ranges: Any = None, csv: str | Path | None = None,
             inception_weights: str | Path | None = None, fid: bool = True, fresh: bool = False,
             log: LogFn = default_log, progress: bool = True) -> EvaluateResult:
    """Run the evaluation grid (methods x NFEs x seed ranges) and append rows to the results CSV.

    Results already in the CSV are skipped (``fresh`` recomputes them) and an interrupted FID resumes from
    its checkpoint, so rerunning an interrupted command ends with the rows of an uninterrupted run.
    Under torchrun the seeds are split across ranks and the sums all-reduced; with ``--shard i/n`` each
    process writes shard files under results/shards/<experiment>/ for ``iia merge``."""
    from .fid import FeatureExtractor, FeatureStats, fid_from_stats, resolve_inception_weights

    ev = cfg.evaluate
    ctx = dist.context()
    nfes = [int(n) for n in (nfes or ev.nfe)]
    methods = methods or ev.methods
    n_samples = int(samples or ev.samples)
    ranges = parse_seed_ranges(seed_ranges or ev.seed_ranges or f"0-{n_samples - 1}")
    if samples is not None and (seed_ranges or ev.seed_ranges):
        ranges = [r[:n_samples] for r in ranges]
    csv_path = Path(csv or ev.csv or f"results/{cfg.experiment}.csv")
    base = prepare(cfg, methods[0], nfes[0])  # loads the model once
    model, fp, batch = base.model, base.fingerprint, base.batch
    for m in methods:  # validate every (method, NFE) before any work
        for n in nfes:
            prepare(cfg, m, n, model=model, fingerprint=fp)
    ref_path = ref_sha = None
    extractor = ref_mu = ref_sigma = None
    if fid:
        weights, source = resolve_inception_weights(inception_weights, cfg.fid.inception_weights)
        log(f"Inception weights: {weights} ({source})")
        # rank 0 computes missing reference statistics, the others then read them
        ref = resolve_reference(cfg, weights, base.device, log) if ctx.is_main else None
        dist.barrier()
        ref_path, ref_mu, ref_sigma, ref_sha = ref or resolve_reference(cfg, weights, base.device, log)
        extractor = FeatureExtractor(weights, device=base.device, batch_size=cfg.fid.batch)
    clip = None
    if fid and callable(getattr(model, "prompt_of", None)):
        from .clip_score import ClipScorer, resolve_clip_weights

        clip_dir = resolve_clip_weights(cfg.fid.clip_weights)
        if clip_dir is not None:
            clip = ClipScorer(clip_dir, device=base.device, batch_size=cfg.fid.batch)
            log(f"CLIP score with {clip_dir}")
    done_keys = set() if fresh or ctx.shard else _done_keys(csv_path)
    ref_cache: dict[tuple, torch.Tensor] = {}
    err_seeds = ranges[0][: max(0, ev.error_samples)]
    all_rows: list[dict[str, Any]] = []
    for m in methods:
        for n in nfes:
            p = prepare(cfg, m, n, model=model, fingerprint=fp)
            common = dict(experiment=cfg.experiment, model=cfg.model.kind, model_sha256=fp, method=p.method.name,
                          method_params=p.method.params, r=p.method.params.get("r", ""),
                          M=cfg.calibration.substeps if p.method.is_iia else "",
                          B=cfg.calibration.samples if p.method.is_iia else "", grid=cfg.grid.kind, nfe=p.nfe,
                          device=str(p.device))
            cells = []  # (metric, seeds) still to compute
            if err_seeds:
                cells.append(("integration_rmse", err_seeds))
            if fid:
                cells += [("fid", seeds) for seeds in ranges]

            def todo(metric: str, seeds: list[int]) -> bool:
                key = _row_key({**common, "seeds": format_seeds(seeds), "n_samples": len(seeds), "metric": metric})
                if ctx.shard:
                    return fresh or not _shard_file(cfg, key).is_file()
                return key not in done_keys

            cells = [c for c in cells if todo(*c)]
            if not cells:
                log(f"{p.method.name} nfe={p.nfe}: already in {csv_path}, skipped (--fresh recomputes)")
                continue
            coeffs, coeff_file, calib_s = None, "", 0.0
            if p.method.is_iia:
                path = default_coefficient_path(p)
                cs = CoefficientSet.load(path) if path.is_file() else None
                if cs is not None and not cs.mismatches(p.method.name, dict(p.method.params), p.fingerprint,
                                                         cfg.grid.kind, p.sigmas, p.nfe, cfg.calibration):
                    log(f"{m} nfe={p.nfe}: reusing coefficients {path}")
                    if cs.warning:
                        log(cs.warning)
                else:
                    cs, path = calibrate(cfg, prepared=p, log=log, verbose=False)
                coeffs, coeff_file, calib_s = cs.coefficients, str(path), cs.calibration_seconds
            common.update(coefficient_file=coeff_file, calibration_seconds=round(calib_s, 3))
            rows = []
            for metric, seeds in cells:
                seeds_text = format_seeds(seeds)
                if metric == "integration_rmse":
                    mine = dist.split(seeds)
                    t0 = time.perf_counter()
                    xs = torch.cat([x for _, x in sample_batches(model, p.method, p.sigmas, mine, batch, coeffs,
                                                                 p.device, p.state_dtype, cfg.sampler.class_label)])
                    secs = time.perf_counter() - t0
                    ref = _reference_solution(p, cfg, mine, batch, ref_cache)
                    sq = float((xs.to(torch.float64).cpu() - ref).pow(2).sum())
                    row = make_row(**common, seeds=seeds_text, n_samples=len(seeds), metric=metric, value="",
                                   reference=f"{ev.reference_method}@nfe{ev.reference_nfe}",
                                   sampling_seconds=round(secs, 3))
                    if ctx.shard:
                        _write_shard(cfg, row, sum_sq=np.float64(sq), count=np.int64(xs.numel()))
                        continue
                    sq, count = dist.all_reduce_floats(sq, xs.numel())
                    row["value"] = math.sqrt(sq / count)
                    log(f"{p.method.name} nfe={p.nfe}: integration RMSE vs {ev.reference_method}"
                        f"@{ev.reference_nfe} = {row['value']:.5f} ({len(seeds)} seeds)")
                    rows.append(row)
                    continue
                key = _row_key({**common, "seeds": seeds_text, "n_samples": len(seeds), "metric": metric})
                tag = f"-shard{ctx.shard[0]}of{ctx.shard[1]}" if ctx.shard else ""
                partial = Path("results/cache/partial") / f"{_key_hash(key)}-r{ctx.rank}of{ctx.world}{tag}.npz"
                if fresh:
                    partial.unlink(missing_ok=True)
                stats, t_sample, (clip_n, clip_sum) = _fid_of_range(
                    model, p, seeds, coeffs, batch, cfg.sampler.class_label, extractor, partial, progress, clip)
                row = make_row(**common, seeds=seeds_text, n_samples=len(seeds), metric=metric, value="",
                               reference=str(ref_path), reference_sha256=ref_sha, sampling_seconds=round(t_sample, 3))
                clip_row = None
                if clip is not None:
                    clip_row = {**row, "metric": "clip_score", "reference": str(clip.folder), "reference_sha256": ""}
                if ctx.shard:
                    _write_shard(cfg, row, n=np.int64(stats.n), sum=stats.sum, sum_outer=stats.sum_outer)
                    if clip_row is not None:
                        _write_shard(cfg, clip_row, sum_sq=np.float64(clip_sum), count=np.int64(clip_n))
                else:
                    if clip_row is not None:
                        clip_n, clip_sum = dist.all_reduce_floats(clip_n, clip_sum)
                        clip_row["value"] = clip_sum / clip_n
                        rows.append(clip_row)
                        log(f"{p.method.name} nfe={p.nfe} seeds {seeds_text}: CLIP score {clip_row['value']:.3f}")
                    total = FeatureStats(int(dist.all_reduce_floats(stats.n)[0]),
                                         dist.all_reduce_sum(torch.from_numpy(stats.sum)).numpy(),
                                         dist.all_reduce_sum(torch.from_numpy(stats.sum_outer)).numpy())
                    row["value"] = fid_from_stats(total, ref_mu, ref_sigma)
                    rows.append(row)
                    log(f"{p.method.name} nfe={p.nfe} seeds {seeds_text}: FID {row['value']:.3f} "
                        f"({len(seeds)} images, sampling {t_sample:.1f} s)")
                dist.barrier()
                partial.unlink(missing_ok=True)
            if rows and ctx.is_main:
                append_rows(csv_path, rows)  # after each (method, NFE): nothing is lost if a later one fails
            all_rows.extend(rows)
    if ctx.shard:
        log(f"shard {ctx.shard[0]}/{ctx.shard[1]} done: partial sums in results/shards/{cfg.experiment}/; "
            f"combine them with `iia merge results/shards/{cfg.experiment} --csv {csv_path}`")
    return EvaluateResult(csv_path, all_rows)


def merge_shards(shard_dir: str | Path, csv: str | Path, log: LogFn = default_log) -> EvaluateResult:
    """Combine complete sets of shard files into result rows (FID from merged feature sums, RMSE from
    summed squared errors); incomplete sets are reported and left for later."""
    from .fid import FeatureStats, fid_from_stats, load_reference

    shard_dir, csv_path = Path(shard_dir), Path(csv)
    files = sorted(shard_dir.glob("*.shard-*-of-*.npz"))
    if not files:
        raise IIARuntimeError(f"no shard files (*.shard-i-of-n.npz) in {shard_dir}")
    groups: dict[str, list[tuple[dict[str, Any], Path]]] = {}
    for f in files:
        try:
            with np.load(f) as data:
                meta = json.loads(str(data["meta"]))
        except (OSError, KeyError, ValueError):
            raise IIARuntimeError(f"shard file {f} is unreadable") from None
        groups.setdefault(_key_hash(tuple(meta["key"])), []).append((meta, f))
    done = _done_keys(csv_path)
    rows, incomplete = [], 0
    for parts in groups.values():
        meta = parts[0][0]
        row = meta["row"]
        if tuple(meta["key"]) in done:
            continue
        have = {m["shard"] for m, _ in parts}
        if have != set(range(meta["shards"])):
            incomplete += 1
            log(f"incomplete: {row['method']} nfe={row['nfe']} {row['metric']} seeds {row['seeds']}: shards "
                f"{sorted(have)} of {meta['shards']}")
            continue
        if row["metric"] == "fid":
            stats = FeatureStats.merge_all(FeatureStats.load(f) for _, f in parts)
            mu, sigma, _ = load_reference(row["reference"])
            row["value"] = fid_from_stats(stats, mu, sigma)
        else:  # integration_rmse: sqrt of summed squared errors; clip_score: mean of summed scores
            sq = count = 0.0
            for _, f in parts:
                with np.load(f) as data:
                    sq += float(data["sum_sq"])
                    count += float(data["count"])
            row["value"] = sq / count if row["metric"] == "clip_score" else math.sqrt(sq / count)
        row["sampling_seconds"] = round(sum(float(m["row"]["sampling_seconds"] or 0) for m, _ in parts), 3)
        rows.append(row)
        log(f"merged {len(parts)} shards: {row['method']} nfe={row['nfe']} {row['metric']} = {row['value']:.5g}")
    if rows:
        append_rows(csv_path, rows)
    if not rows and incomplete:
        raise IIARuntimeError(f"no complete shard set in {shard_dir} ({incomplete} incomplete); "
                              "run the missing shards first")
    return EvaluateResult(csv_path, rows)


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
