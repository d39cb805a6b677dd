#!/usr/bin/env python
"""Quality bars of the built-in testbed network (builtin:mnist-ddpm), measured with the real FID Inception.

1. Samples vs real digits: FID of N samples of DPM-Solver++(2M) at NFE 30 against N held-out digits, next to the
   FID between two disjoint sets of N held-out digits (the floor that N images can resolve). Bar: within 3x.
2. IIA vs its base at NFE 6, over two seed ranges: FID and KID (each with its 95 % block-jackknife interval) of
   edm, iia-edm, ddim, iia-ddim on seeds 0..N-1 and N..2N-1 against the 1,000 held-out digits, and the paired
   ratio IIA / base on the same seeds with its interval. Bar: in both seed ranges and both metrics the ratio's
   interval lies below 1 (resolved), the rows' own intervals say how far apart two seed ranges may fall.

    python benchmarks/testbed_quality.py                # N = 250, about 10 minutes on 2 CPU cores
    python benchmarks/testbed_quality.py --samples 500

Writes the FID rows to results/testbed_quality.csv (through `iia evaluate`'s library function) and prints a
Markdown summary for the README.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from iia_cli import api
from iia_cli.cli.common import DEFAULT_CONFIG
from iia_cli.config.experiment import load_config
from iia_cli.experiments.evaluate import evaluate
from iia_cli.metrics.compare import compare_rows, describe
from iia_cli.metrics.fid.compute import compute_stats
from iia_cli.metrics.fid.features import FeatureExtractor
from iia_cli.metrics.fid.stats import FeatureStats, frechet_distance
from iia_cli.metrics.fid.weights import resolve_inception_weights
from iia_cli.models.testbed import heldout_images


def _fid(a: FeatureStats, b: FeatureStats) -> float:
    mu_a, cov_a = a.mean_cov()
    mu_b, cov_b = b.mean_cov()
    return frechet_distance(mu_a, cov_a, mu_b, cov_b)


def _stats(extractor: FeatureExtractor, images: np.ndarray) -> FeatureStats:
    return compute_stats((images[k : k + 100] for k in range(0, len(images), 100)), extractor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=250, help="N images per set (at most 500)")
    ap.add_argument("--csv", type=Path, default=Path("results/testbed_quality.csv"))
    args = ap.parse_args()
    n = args.samples
    if not 2 <= n <= 500:
        raise SystemExit("--samples must be between 2 and 500 (two disjoint sets of the 1,000 held-out digits)")
    t0 = time.perf_counter()
    cfg = load_config(DEFAULT_CONFIG)  # the built-in default: the testbed network
    weights, _ = resolve_inception_weights(None, cfg.fid.inception_weights)
    extractor = FeatureExtractor(weights, batch_size=100)

    # 1. Samples vs two real sets of the same size.
    held = heldout_images()  # uint8 [1000, 32, 32, 1]
    real_a, real_b = _stats(extractor, held[:n]), _stats(extractor, held[500 : 500 + n])
    fid_real = _fid(real_a, real_b)
    res = api.sample(cfg, "dpm-solver++-2m", 30, seeds=f"0-{n - 1}", keep=True, progress=False)
    fid_samples = _fid(_stats(extractor, res.images), real_b)

    # 2. IIA vs base at NFE 6 over two seed ranges, through iia evaluate's library function.
    result = evaluate(cfg, nfes=[6], methods=["edm", "iia-edm", "ddim", "iia-ddim"],
                      seed_ranges=[f"0-{n - 1}", f"{n}-{2 * n - 1}"], csv=args.csv, metrics=["fid", "kid"],
                      progress=False)
    rows = {(r["method"], r["metric"], r["seeds"]): r for r in result.rows}
    ranges = list(dict.fromkeys(r["seeds"] for r in result.rows))

    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; {time.perf_counter() - t0:.0f} s; N = {n}\n")
    print("| FID (N images) | value |")
    print("|---|---|")
    print(f"| two disjoint sets of held-out digits | {fid_real:.2f} |")
    print(f"| DPM-Solver++(2M) NFE 30 samples vs held-out digits | {fid_samples:.2f} "
          f"({fid_samples / fid_real:.2f}x; bar: <= 3x) |")
    for metric, fmt in (("fid", "{:.2f}"), ("kid", "{:.4f}")):
        cell = (lambda r: f"{fmt.format(float(r['value']))} [{fmt.format(float(r['ci_low']))}, "
                          f"{fmt.format(float(r['ci_high']))}]")
        print(f"\n| {metric.upper()}, NFE 6 | " + " | ".join(f"seeds {s}" for s in ranges) + " |")
        print("|---|" + "---|" * len(ranges))
        for m in ("edm", "iia-edm", "ddim", "iia-ddim"):
            print(f"| {m} | " + " | ".join(cell(rows[(m, metric, s)]) for s in ranges) + " |")
    print()
    for iia, base in (("iia-edm", "edm"), ("iia-ddim", "ddim")):
        verdicts = []
        for metric in ("fid", "kid"):
            for s in ranges:
                pair = compare_rows(rows[(iia, metric, s)], rows[(base, metric, s)])
                ok = not isinstance(pair, str) and pair.resolved and pair.high < 1
                verdicts.append(ok)
                print(f"- {iia} / {base}, {metric.upper()}, seeds {s}: "
                      f"{pair if isinstance(pair, str) else describe(pair)}")
        print(f"- {iia} vs {base}: {'bar met' if all(verdicts) else 'bar NOT met'} "
              f"({sum(verdicts)} of {len(verdicts)} paired ratios resolved below 1)")


if __name__ == "__main__":
    main()
