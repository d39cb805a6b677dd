"""IIA calibration targets and the guard: final-sample error of every IIA method against its base solver.

For each (base, IIA) pair, NFE and calibration target (``local``: the paper's M fine sub-steps from the coarse
state; ``trajectory``: the teacher's state on its trajectory from the same noise), one calibration with the
guard on gives both the unguarded fit (``fitted_coefficients``) and the guarded coefficients. Each is scored by
the RMSE (pixels in [-1, 1]) of its final samples against a 500-step Heun solve (EDM NFE 999) of the same
noise, on held-out seeds 0..N-1 (the calibration noises start at 10^9). Writes results/iia_targets.csv and
prints a markdown table (best sampler per NFE in bold) and the issue's goals.

    nice python benchmarks/iia_targets.py            # full run (gmm-mnist, 256 seeds, NFE 5-15)
    python benchmarks/iia_targets.py --quick         # a smoke run
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
NFES = list(range(5, 16))
TARGETS = ("local", "trajectory")


def solve(p, seeds: list[int], coeffs=None) -> torch.Tensor:
    return torch.cat([x for _, x in sample_batches(p.model, p.method, p.sigmas, seeds, 128, coeffs, p.device,
                                                   p.state_dtype)])


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two NFEs, 32 seeds, B=32")
    ap.add_argument("--seeds", type=int, default=256, help="held-out evaluation seeds 0..N-1")
    ap.add_argument("--methods", default="", help="comma-separated IIA methods (default: all)")
    ap.add_argument("--nfe", default="", help="comma-separated NFEs (default 5-15); run parts in parallel, then --merge")
    ap.add_argument("--merge", default="", help="comma-separated part CSVs: combine them into --out and print the table")
    ap.add_argument("--samples", type=int, default=0, help="calibration noises B (default: the config's 200)")
    ap.add_argument("--out", default="results/iia_targets.csv")
    args = ap.parse_args()
    if args.merge:
        df = pd.concat([pd.read_csv(f, keep_default_na=False) for f in args.merge.split(",")], ignore_index=True)
        df["guard"] = df.guard.map(lambda v: "" if v == "" else str(v) == "True")
        df["target"] = df.target.astype(str)
        report(df, args.out, sorted(df.nfe.unique()))
        return
    nfes = [int(v) for v in args.nfe.split(",")] if args.nfe else ([6, 10] if args.quick else NFES)
    pairs = [pq for pq in PAIRS if not args.methods or pq[1] in args.methods.split(",")]
    n_seeds = 32 if args.quick else args.seeds
    common = [("model.kind", "gmm-mnist"), ("calibration.out_dir", "results/coefficients/iia_targets"),
              ("calibration.val_samples", 0), ("calibration.guard", True), ("calibration.batch", 200)]
    if args.quick or args.samples:
        common.append(("calibration.samples", args.samples or 32))
    cfgs = {t: load_config(None, common + [("calibration.target", t)]) for t in TARGETS}
    cfg = cfgs["local"]
    seeds = list(range(n_seeds))
    t0 = time.perf_counter()
    ref_p = api.prepare(cfg, "edm", 999)
    model, fp = ref_p.model, ref_p.fingerprint
    cache = Path(f"results/cache/iia_targets_reference_{fp[:12]}_{n_seeds}.pt")
    if cache.is_file():
        reference = torch.load(cache)
    else:
        reference = solve(ref_p, seeds)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(reference, cache)
    machine = f"{platform.node()} {platform.processor() or platform.machine()} {torch.get_num_threads()} threads"
    rows = []
    base_err: dict[tuple[str, int], float] = {}
    for nfe in nfes:  # NFE outermost: the methods on one grid share the teacher's solve
        for base, iia in pairs:
            if (base, nfe) not in base_err:
                p = api.prepare(cfg, base, nfe, model=model, fingerprint=fp)
                base_err[(base, nfe)] = rmse(solve(p, seeds), reference)
                rows.append(dict(method=base, base=base, nfe=p.nfe, target="", guard="", alpha="",
                                 rmse=base_err[(base, nfe)], ratio=1.0, calib_s=0.0, calib_calls=0))
            b = base_err[(base, nfe)]
            for target in TARGETS:
                p = api.prepare(cfgs[target], iia, nfe, model=model, fingerprint=fp)
                cs, _ = api.calibrate(cfgs[target], prepared=p, log=lambda m: None, verbose=False)
                for guarded, coeffs in ((False, cs.fitted_coefficients), (True, cs.coefficients)):
                    e = rmse(solve(p, seeds, coeffs), reference)
                    rows.append(dict(method=iia, base=base, nfe=p.nfe, target=target, guard=guarded,
                                     alpha=cs.guard_alpha if guarded else 1.0, rmse=e, ratio=e / b,
                                     calib_s=cs.calibration_seconds, calib_calls=cs.calibration_calls))
                r = rows[-2:]
                print(f"{iia:>20s} nfe={nfe:2d} {target:>10s}: {r[0]['ratio']:.3f}x, guarded {r[1]['ratio']:.3f}x "
                      f"(alpha {cs.guard_alpha:g}; {base} {b:.4f}; calibration {cs.calibration_seconds:.0f} s)",
                      flush=True)
        df = pd.DataFrame(rows)
        df["seeds"] = f"0-{n_seeds - 1}"
        df["reference"] = "edm@999"
        df["B"] = cfg.calibration.samples
        df["M"] = cfg.calibration.substeps
        df["teacher"] = f"{cfg.calibration.teacher}{cfg.calibration.teacher_substeps}"
        df["machine"] = machine
        df["seconds_total"] = round(time.perf_counter() - t0)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)  # after every NFE: a long run keeps what it has
    report(df, args.out, nfes)


def report(df: pd.DataFrame, out: str, nfes) -> None:
    df.to_csv(out, index=False)
    pairs = [pq for pq in PAIRS if pq[1] in set(df.method)]
    print(markdown(df, pairs, nfes))
    print(f"\n{df.seeds[0]} held-out seeds, B={df.B[0]}, M={df.M[0]}, teacher {df.teacher[0]}; "
          f"{df.seconds_total.max()} s (longest part) on {df.machine[0]}")
    for line in goals(df, nfes):
        print(line)


def label(r) -> str:
    if not r.target:
        return r.method
    return f"{r.method} {r.target}" + (" + guard" if r.guard else "")


def markdown(df: pd.DataFrame, pairs, nfes) -> str:
    df = df.assign(label=[label(r) for r in df.itertuples()])
    best = {n: df[df.nfe == n].rmse.min() for n in nfes}
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    seen = []
    for base, iia in pairs:
        names = [base] + [f"{iia} {t}" + g for t in TARGETS for g in ("", " + guard")]
        for name in names:
            if name in seen:
                continue
            seen.append(name)
            cells = []
            for n in nfes:
                r = df[(df.label == name) & (df.nfe == n)].iloc[0]
                text = f"{r.rmse:.4f}" if not r.target else f"{r.rmse:.4f} ({r.ratio:.2f}x)"
                cells.append(f"**{text}**" if r.rmse == best[n] else text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(df: pd.DataFrame, nfes) -> list[str]:
    out = []
    g = df[(df.guard == True) & (df.target != "")]  # noqa: E712
    worst = g.loc[g.ratio.idxmax()] if len(g) else None
    if worst is not None:
        out.append(f"goal 1 (guard: every IIA <= 1.00x its base, NFE 5-15): worst {worst.ratio:.3f}x "
                   f"({worst.method} {worst.target} NFE {worst.nfe}) -> {'met' if worst.ratio <= 1.0 else 'NOT met'}")
    t = df[(df.method == "iia-ddim") & (df.target == "trajectory") & (df.guard == False) & (df.nfe <= 12)]  # noqa: E712
    if len(t):
        out.append(f"goal 2 (trajectory IIA-DDIM <= 0.55x DDIM, NFE 5-12): worst {t.ratio.max():.3f}x -> "
                   f"{'met' if t.ratio.max() <= 0.55 else 'NOT met'}")
    for n in [n for n in nfes if 5 <= n <= 10]:
        at = df[df.nfe == n]
        bb, bi = at[at.target == ""].rmse.min(), at[at.target != ""].rmse.min()
        who = at[at.target != ""].loc[at[at.target != ""].rmse.idxmin()]
        out.append(f"goal 3 NFE {n}: best IIA {bi:.4f} ({label(who)}) vs best base {bb:.4f}: "
                   f"{100 * (1 - bi / bb):.0f}% better -> {'met' if bi <= 0.8 * bb else 'NOT met'}")
    return out


if __name__ == "__main__":
    main()
