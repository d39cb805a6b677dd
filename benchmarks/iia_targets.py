"""IIA calibration targets and the guard: final-sample error of every IIA method against its base solver.

For each (base, IIA) pair, NFE and calibration target (``local``: the paper's M fine sub-steps from the coarse
state; ``trajectory``: the teacher's state on its trajectory from the same noise), one calibration with the
guard on gives both the unguarded fit (``fitted_coefficients``) and the guarded coefficients. Each is scored by
the RMSE (pixels in [-1, 1]) of its final samples against a 500-step Heun solve (EDM NFE 999) of the same
noise, on held-out seeds 0..N-1 (the calibration noises start at 10^9). Every row keeps its per-seed squared
errors (column ``sq``), so the CSV alone gives every paired comparison on the same seeds (iia_cli.metrics.uncertainty):
each IIA row against its base solver (``ratio*``), each ``trajectory`` row against the ``local`` row of the same
method, NFE and guard setting (``vs_local*``), and per NFE the best row against the runner-up (``best``: ``*``
resolved, ``~`` tied). A comparison is resolved when its 95 % interval excludes 1. Writes results/iia_targets.csv
and prints the markdown table, the comparisons and the goals judged on the intervals.

    nice python benchmarks/iia_targets.py            # full run (gmm-mnist, 256 seeds, NFE 5-15)
    python benchmarks/iia_targets.py --quick         # a smoke run
    python benchmarks/iia_targets.py --markdown results/iia_targets.csv   # the README block
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from iia_cli import api
from iia_cli.config.experiment import load_config
from iia_cli.core.sampling import sample_batches

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.iia_targets
    import paired_rows as pr
except ImportError:  # pragma: no cover
    from benchmarks import paired_rows as pr

PAIRS = [("edm", "iia-edm"), ("edm", "biia-edm"), ("ddim", "iia-ddim"), ("dpm-solver++-2m", "iia-dpm-solver++-2m"),
         ("dpm-solver++-3m", "iia-dpm-solver++-3m"), ("dpm-solver++-3m-exact", "iia-dpm-solver++-3m-exact"),
         ("ipndm", "iia-ipndm"), ("unipc", "iia-unipc")]
NFES = list(range(5, 16))
TARGETS = ("local", "trajectory")
GOAL_DDIM = 0.55  # goal 2: trajectory IIA-DDIM at most this ratio to DDIM at NFE 5-12
GOAL_BEST = 0.8  # goal 3: the best IIA row at most this ratio to the best base solver at NFE 5-10


def solve(p, seeds: list[int], coeffs=None) -> torch.Tensor:
    return torch.cat([x for _, x in sample_batches(p.model, p.method, p.sigmas, seeds, 128, coeffs, p.device,
                                                   p.state_dtype)])


def load_reference(ref_p, seeds: list[int], cache: Path) -> torch.Tensor:
    """The reference solve of ``seeds``, from ``cache`` when it holds these seeds of this model (the format of
    integration_error.py's --reference-cache, so both benchmarks can share one solve), else solved and written."""
    if cache.is_file():
        saved = torch.load(cache)
        if isinstance(saved, dict) and saved.get("seeds") == seeds and saved.get("fingerprint") == ref_p.fingerprint:
            return saved["reference"]
    reference = solve(ref_p, seeds)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"seeds": seeds, "fingerprint": ref_p.fingerprint, "reference": reference, "check": math.nan}, cache)
    return reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two NFEs, 32 seeds, B=32")
    ap.add_argument("--seeds", type=int, default=256, help="held-out evaluation seeds 0..N-1")
    ap.add_argument("--methods", default="", help="comma-separated IIA methods (default: all)")
    ap.add_argument("--nfe", default="", help="comma-separated NFEs (default 5-15); run parts in parallel, then --merge")
    ap.add_argument("--merge", default="", help="comma-separated part CSVs: combine them into --out and print the table")
    ap.add_argument("--markdown", metavar="CSV", help="print the README block (table, comparisons, goals) of this CSV")
    ap.add_argument("--samples", type=int, default=0, help="calibration noises B (default: the config's 200)")
    ap.add_argument("--reference-cache", default="", help="file holding the reference solve (default under "
                    "results/cache/; integration_error.py's --reference-cache file of the same seeds also works)")
    ap.add_argument("--out", default="results/iia_targets.csv")
    args = ap.parse_args()
    if args.markdown:
        print(block(with_comparisons(read([args.markdown]))))
        return
    if args.merge:
        report(with_comparisons(read(args.merge.split(","))), args.out)
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
    cache = Path(args.reference_cache or f"results/cache/iia_targets_reference_{fp[:12]}_{n_seeds}.pt")
    reference = load_reference(ref_p, seeds, cache)
    elements = int(reference[0].numel())
    machine = f"{platform.node()} {platform.processor() or platform.machine()} {torch.get_num_threads()} threads"
    rows = []
    base_err: dict[tuple[str, int], float] = {}
    for nfe in nfes:  # NFE outermost: the methods on one grid share the teacher's solve
        for base, iia in pairs:
            if (base, nfe) not in base_err:
                p = api.prepare(cfg, base, nfe, model=model, fingerprint=fp)
                rows.append(dict(method=base, base=base, nfe=p.nfe, target="", guard="", alpha="", calib_s=0.0,
                                 calib_calls=0, **pr.row_stats(pr.per_seed_sq(solve(p, seeds), reference), elements)))
                base_err[(base, nfe)] = rows[-1]["rmse"]
            b = base_err[(base, nfe)]
            for target in TARGETS:
                p = api.prepare(cfgs[target], iia, nfe, model=model, fingerprint=fp)
                cs, _ = api.calibrate(cfgs[target], prepared=p, log=lambda m: None, verbose=False)
                for guarded, coeffs in ((False, cs.fitted_coefficients), (True, cs.coefficients)):
                    sq = pr.per_seed_sq(solve(p, seeds, coeffs), reference)
                    rows.append(dict(method=iia, base=base, nfe=p.nfe, target=target, guard=guarded,
                                     alpha=cs.guard_alpha if guarded else 1.0, calib_s=cs.calibration_seconds,
                                     calib_calls=cs.calibration_calls, **pr.row_stats(sq, elements)))
                r = rows[-2:]
                print(f"{iia:>26s} nfe={nfe:2d} {target:>10s}: {r[0]['rmse'] / b:.3f}x, guarded "
                      f"{r[1]['rmse'] / b:.3f}x (alpha {cs.guard_alpha:g}; {base} {b:.4f}; calibration "
                      f"{cs.calibration_seconds:.0f} s)", flush=True)
        df = pd.DataFrame(rows)
        df["seeds"] = f"0-{n_seeds - 1}"
        df["reference"] = "edm@999"
        df["B"] = cfg.calibration.samples
        df["M"] = cfg.calibration.substeps
        df["teacher"] = f"{cfg.calibration.teacher}{cfg.calibration.teacher_substeps}"
        df["machine"] = machine
        df["seconds_total"] = round(time.perf_counter() - t0)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)  # after every NFE: a long run keeps what it has (comparisons added below)
    report(with_comparisons(df), args.out)


def read(paths: list[str]) -> pd.DataFrame:
    """Part CSVs combined (later rows of the same method, NFE, target and guard win)."""
    df = pd.concat([pd.read_csv(f, keep_default_na=False) for f in paths], ignore_index=True)
    df["guard"] = df.guard.map(lambda v: "" if v == "" else str(v) == "True")
    df["target"] = df.target.astype(str)
    df["_key"] = [f"{r.method}|{r.nfe}|{r.target}|{r.guard}" for r in df.itertuples()]
    return df.drop_duplicates("_key", keep="last").drop(columns="_key").reset_index(drop=True)


def with_comparisons(df: pd.DataFrame) -> pd.DataFrame:
    """Adds the paired comparisons: ``ratio*`` (each row vs its base solver; a base row vs itself: 1, never
    resolved), ``vs_local*`` (a trajectory row vs the local row of the same method, NFE and guard; empty otherwise)
    and ``best`` (``*`` / ``~`` per NFE, see paired_rows.best_marks)."""
    df = df.reset_index(drop=True)
    recs = df.to_dict("records")
    base_cols, local_cols = [], []
    for r in recs:
        base = df[(df.method == r["base"]) & (df.nfe == r["nfe"]) & (df.target == "")].iloc[0].to_dict()
        base_cols.append(pr.paired_columns(pr.compare(r, base)))
        local = df[(df.method == r["method"]) & (df.nfe == r["nfe"]) & (df.target == "local")
                   & (df.guard == r["guard"])] if r["target"] == "trajectory" else df.iloc[0:0]
        local_cols.append(pr.paired_columns(pr.compare(r, local.iloc[0].to_dict()), "vs_local") if len(local) else {})
    new = pd.concat([pd.DataFrame(base_cols), pd.DataFrame(local_cols, columns=list(pr.paired_columns(
        pr.compare(recs[0], recs[0]), "vs_local")))], axis=1)
    df = pd.concat([df.drop(columns=[c for c in new.columns if c in df]), new], axis=1)
    return pr.with_best_column(df)


def report(df: pd.DataFrame, out: str) -> None:
    df.to_csv(out, index=False)
    print(block(df))
    print(f"\n{df.seeds[0]} held-out seeds, B={df.B[0]}, M={df.M[0]}, teacher {df.teacher[0]}; "
          f"{df.seconds_total.max()} s (longest part) on {df.machine[0]}")


def label(r) -> str:
    if not r.target:
        return r.method
    return f"{r.method} {r.target}" + (" + guard" if r.guard else "")


def block(df: pd.DataFrame) -> str:
    """The README block: table, comparison notes, goals."""
    nfes = sorted(int(n) for n in df.nfe.unique())
    pairs = [pq for pq in PAIRS if pq[1] in set(df.method)]
    return "\n".join([markdown(df, pairs, nfes), "", *notes(df, nfes), "", "Goals, judged on the intervals:",
                      *goals(df, nfes)])


def markdown(df: pd.DataFrame, pairs, nfes) -> str:
    """Rows = method (target, guard), columns = NFE. Base rows: RMSE [95 % interval]; IIA rows: RMSE and the paired
    ratio to the base solver [95 % interval] ('n.r.': not resolved; '= base': the same numbers on every seed).
    ``!``: heavy-tail warning on the RMSE's interval; ``*``: best at this NFE, resolved against the runner-up;
    ``~``: tied for best."""
    df = df.assign(label=[label(r) for r in df.itertuples()])
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
                text = f"{r.rmse:.4f}" + ("!" if r.ci_warning else "")
                if not r.target:
                    text += f" [{r.ci_low:.4f}, {r.ci_high:.4f}]"
                else:
                    text += " " + pr.ratio_text(pr.stored(r, "ratio"))
                cells.append(f"{text} {r.best}" if r.best else text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(df: pd.DataFrame, nfes) -> list[str]:
    """Best vs runner-up per NFE; trajectory vs local, counted on the intervals; heavy-tail warnings."""
    out = []
    for n in nfes:
        rows = df[df.nfe == n].to_dict("records")
        marks, p = pr.best_marks(rows)
        order = sorted(range(len(rows)), key=lambda i: rows[i]["rmse"])
        best = rows[order[0]]
        runner = next((rows[i] for i in order if rows[i]["sq"] != best["sq"]), None)
        if p is None or runner is None:
            continue
        ties = {label(pd.Series(rows[i])) for i, m in marks.items() if m == "~" and rows[i]["sq"] != best["sq"]}
        out.append(f"- NFE {n}: best {label(pd.Series(best))} vs runner-up {label(pd.Series(runner))}: "
                   f"{pr.ratio_text(p)}, P(best lower) {p.prob_improvement:.2f}"
                   + (f"; {len(ties)} rows tied with it" if ties else ""))
    for guarded in (True, False):
        t = df[(df.target == "trajectory") & (df.guard == guarded)]
        if not len(t):
            continue
        better = int(((t.vs_local_high < 1)).sum())
        worse = int(((t.vs_local_low > 1)).sum())
        same = int(sum(pr.identical(pr.stored(r._asdict(), "vs_local")) for r in t.itertuples()))
        gm = math.exp(sum(math.log(v) for v in t.vs_local) / len(t))
        per = []
        for m in [iia for _, iia in PAIRS if iia in set(t.method)]:
            tm = t[t.method == m]
            per.append(f"{m} {int((tm.vs_local_high < 1).sum())}/{int((tm.vs_local_low > 1).sum())}")
        out.append(f"- trajectory vs local ({'guarded' if guarded else 'unguarded'}, {len(t)} cells): resolved "
                   f"better in {better}, resolved worse in {worse}, not resolved in {len(t) - better - worse} (of "
                   f"which {same} identical); geometric mean ratio {gm:.3f}. Better/worse per method: "
                   + ", ".join(per))
    open_ = pr.unresolved(df[df.target != ""].to_dict("records"), lambda r: label(pd.Series(r)))
    if open_:
        out.append(f"- IIA vs base not resolved (the interval holds 1; rows equal to their base left out), "
                   f"{len(open_)} cells: " + ", ".join(open_))
    warned = df[df.ci_warning != ""]
    if len(warned):
        out.append(f"- heavy tail (`!`): {len(warned)} rows, tail shares {warned.tail_share.min():.2f} to "
                   f"{warned.tail_share.max():.2f} (the worst 5 % of seeds' share of the squared error)")
    return out


def goals(df: pd.DataFrame, nfes) -> list[str]:
    """The issue's goals, each judged on paired ratios and their 95 % intervals."""
    out = []
    g = df[(df.guard == True) & (df.target != "")]  # noqa: E712
    if len(g):
        worse = g[g.ratio_low > 1]
        above = g[(g.ratio > 1) & ~(g.ratio_low > 1)]
        worst = g.loc[g.ratio.idxmax()]
        out.append(f"- goal 1 (guard: no guarded IIA resolved worse than its base, i.e. no lower bound above 1, NFE "
                   f"{min(g.nfe)}-{max(g.nfe)}): {len(worse)} of {len(g)} cells resolved worse -> "
                   f"{pr.fmt_goal(len(worse) == 0)}"
                   + "".join(f"; {label(r)} NFE {r.nfe} {pr.ratio_text(pr.stored(r._asdict(), 'ratio'))}"
                             for r in worse.itertuples())
                   + f". Point estimate above 1 but not resolved: {len(above)} cells; worst {label(worst)} NFE "
                   f"{worst.nfe} {pr.ratio_text(pr.stored(worst, 'ratio'))}")
    t = df[(df.method == "iia-ddim") & (df.target == "trajectory") & (df.guard == False) & (df.nfe <= 12)]  # noqa: E712
    if len(t):
        t = t.sort_values("nfe")
        verdicts = [pr.goal_verdict(r.ratio, r.ratio_low, r.ratio_high, GOAL_DDIM) for r in t.itertuples()]
        met = sum(v.startswith("met") for v in verdicts)
        out.append(f"- goal 2 (trajectory IIA-DDIM <= {GOAL_DDIM}x DDIM with the upper bound below 1, NFE "
                   f"{min(t.nfe)}-{max(t.nfe)}): {pr.fmt_goal(met == len(t))} ({met} of {len(t)} NFEs; "
                   + "; ".join(f"NFE {r.nfe} {pr.ratio_text(pr.stored(r._asdict()))} {v}"
                               for r, v in zip(t.itertuples(), verdicts)) + ")")
    for n in [n for n in nfes if 5 <= n <= 10]:
        at = df[df.nfe == n]
        bases, iias = at[at.target == ""], at[at.target != ""]
        bb, bi = bases.loc[bases.rmse.idxmin()], iias.loc[iias.rmse.idxmin()]
        p = pr.compare(bi.to_dict(), bb.to_dict())
        verdict = pr.goal_verdict(p.ratio, p.low, p.high, GOAL_BEST)
        out.append(f"- goal 3 NFE {n} (best IIA <= {GOAL_BEST}x the best base with the upper bound below 1): "
                   f"{label(bi)} vs {bb.method}: {pr.ratio_text(p)}, P(IIA lower) {p.prob_improvement:.2f} -> "
                   f"{pr.fmt_goal(verdict.startswith('met'))} ({verdict})")
    return out


if __name__ == "__main__":
    main()
