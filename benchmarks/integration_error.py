"""Integration-error benchmark: base solvers vs their IIA variants on gmm-mnist.

For each (base, IIA) pair and NFE, the RMSE (pixels in [-1, 1]) of the final samples against a
high-accuracy reference solve of the same noise (EDM Heun at NFE 999 = 500 steps), on held-out seeds.
The reference is shown converged by comparing it with NFE 1999 on a subset. Writes a tidy CSV under
results/ and prints a markdown table for the README.

    python benchmarks/integration_error.py            # full run (a few minutes on 2 idle CPU cores)
    python benchmarks/integration_error.py --quick    # a smoke run

Parts can run separately and be merged (every row is deterministic: same seeds, same calibration noises):

    python benchmarks/integration_error.py --pairs unipc --reference-cache ref.pt --out part1.csv
    python benchmarks/integration_error.py --merge results/integration_error.csv part1.csv ...
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from iia_cli import api
from iia_cli.config import load_config
from iia_cli.sampling import sample_batches

PAIRS = [("edm", "iia-edm"), ("edm", "biia-edm"), ("ddim", "iia-ddim"), ("dpm-solver++-2m", "iia-dpm-solver++-2m"),
         ("dpm-solver++-3m", "iia-dpm-solver++-3m"), ("dpm-solver++-3m-exact", "iia-dpm-solver++-3m-exact"),
         ("ipndm", "iia-ipndm"), ("unipc", "iia-unipc")]
NFES = [5, 6, 7, 8, 9, 10, 11, 13, 15]


def solve(cfg, method: str, nfe: int, seeds: list[int], coeffs=None, prepared=None) -> torch.Tensor:
    p = prepared or api.prepare(cfg, method, nfe)
    return torch.cat([x for _, x in sample_batches(p.model, p.method, p.sigmas, seeds, 128, coeffs, p.device,
                                                   p.state_dtype)])


def table(df: pd.DataFrame, nfes: list[int]) -> str:
    """Markdown: rows = method, columns = NFE; IIA rows show the ratio to their base solver."""
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    seen = []
    for base, iia in PAIRS:
        for name in (base, iia):
            if name in seen or not (df.method == name).any():
                continue
            seen.append(name)
            cells = []
            for n in nfes:
                r = df[(df.method == name) & (df.nfe == n)].iloc[0]
                b = df[(df.method == base) & (df.nfe == n)].iloc[0].rmse
                cells.append(f"{r.rmse:.4f}" if name == base else f"{r.rmse:.4f} ({r.rmse / b:.2f}x)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few NFEs, few seeds, small B")
    ap.add_argument("--seeds", type=int, default=256, help="held-out evaluation seeds 0..N-1")
    ap.add_argument("--out", default="results/integration_error.csv")
    ap.add_argument("--pairs", default="", help="comma-separated base solvers of the pairs to run (default: all)")
    ap.add_argument("--reference-cache", default="", help="file holding the reference solve (written if absent)")
    ap.add_argument("--merge", nargs="+", metavar="CSV", help="merge these CSVs (later rows win) into --out, "
                    "print the table and exit")
    args = ap.parse_args()
    if args.merge:
        df = pd.concat([pd.read_csv(f) for f in args.merge]).drop_duplicates(["method", "base", "nfe"], keep="last")
        pair_of = {}
        for k, pair in enumerate(PAIRS):
            for name in pair:
                pair_of.setdefault(name, k)
        df = df.assign(_pair=df.method.map(pair_of), _iia=df.method != df.base)
        df = df.sort_values(["_pair", "nfe", "_iia"], kind="stable").drop(columns=["_pair", "_iia"])
        df.to_csv(args.out, index=False)
        print(table(df, sorted(df.nfe.unique())))
        return
    pairs = [p for p in PAIRS if not args.pairs or p[0] in args.pairs.split(",")]
    nfes = [7, 9] if args.quick else NFES
    n_seeds = 32 if args.quick else args.seeds
    # The paper's method as published: local target, no guard (the guard and the trajectory target have their
    # own benchmark, benchmarks/iia_targets.py), so this table shows what unguarded IIA does to each base.
    overrides = [("model.kind", "gmm-mnist"), ("calibration.out_dir", "results/coefficients/benchmark"),
                 ("calibration.val_samples", 0), ("calibration.target", "local"), ("calibration.guard", False)]
    if args.quick:
        overrides.append(("calibration.samples", 32))
    cfg = load_config(None, overrides)
    seeds = list(range(n_seeds))
    t0 = time.perf_counter()
    base_p = api.prepare(cfg, "edm", 999)
    cache = Path(args.reference_cache) if args.reference_cache else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        if saved["seeds"] != seeds or saved["fingerprint"] != base_p.fingerprint:
            raise SystemExit(f"{cache} holds the reference of other seeds or another model")
        reference, ref_err = saved["reference"], saved["check"]
    else:
        reference = solve(cfg, "edm", 999, seeds, prepared=base_p)
        check = solve(cfg, "edm", 1999, seeds[:32], prepared=api.prepare(cfg, "edm", 1999, model=base_p.model,
                                                                          fingerprint=base_p.fingerprint))
        ref_err = float((reference[:32] - check).pow(2).mean().sqrt())
        if cache is not None:
            torch.save({"seeds": seeds, "fingerprint": base_p.fingerprint, "reference": reference, "check": ref_err},
                       cache)
    print(f"reference edm@999 vs edm@1999 RMSE on 32 seeds: {ref_err:.2e} (converged if far below the errors below)")
    rows = []
    done_base: dict[tuple[str, int], float] = {}
    for base, iia in pairs:
        for nfe in nfes:
            if (base, nfe) not in done_base:
                x = solve(cfg, base, nfe, seeds, prepared=api.prepare(cfg, base, nfe, model=base_p.model,
                                                                      fingerprint=base_p.fingerprint))
                done_base[(base, nfe)] = float((x - reference).pow(2).mean().sqrt())
                rows.append(dict(method=base, base=base, nfe=nfe, rmse=done_base[(base, nfe)], calib_s=0.0))
            p = api.prepare(cfg, iia, nfe, model=base_p.model, fingerprint=base_p.fingerprint)
            cs, _ = api.calibrate(cfg, prepared=p, log=lambda m: None, verbose=False)
            x = solve(cfg, iia, nfe, seeds, coeffs=cs.coefficients, prepared=p)
            rmse = float((x - reference).pow(2).mean().sqrt())
            rows.append(dict(method=iia, base=base, nfe=nfe, rmse=rmse, calib_s=cs.calibration_seconds))
            print(f"{iia:>22s} nfe={nfe:2d}: rmse {rmse:.4f}  vs {base} {done_base[(base, nfe)]:.4f}  "
                  f"ratio {rmse / done_base[(base, nfe)]:.2f}  (calibration {cs.calibration_seconds:.1f} s)", flush=True)
    df = pd.DataFrame(rows)
    df["seeds"] = f"0-{n_seeds - 1}"
    df["reference"] = "edm@999"
    df["reference_check_rmse"] = ref_err
    df["B"] = cfg.calibration.samples
    df["M"] = cfg.calibration.substeps
    df["machine"] = f"{platform.node()} {platform.processor() or platform.machine()} {torch.get_num_threads()} threads"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(table(df, nfes))
    print(f"\n{len(seeds)} held-out seeds, B={cfg.calibration.samples}, M={cfg.calibration.substeps}; "
          f"{time.perf_counter() - t0:.0f} s on {df['machine'][0]}")


if __name__ == "__main__":
    main()
