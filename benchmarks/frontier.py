"""The calibrated-sampler frontier: base solvers on fixed grids vs GITS grids vs IIA vs IIA on a GITS grid.

On one model (default: the trained testbed network, configs/mnist-testbed.yaml), for each base solver and NFE:

* the base solver on every fixed grid (``--fixed``: Karras rho 7, logSNR-uniform, time-uniform; the kinds of
  ``iia_cli.core.grids``) and on a GITS grid (``iia_cli.experiments.gits``; one teacher solve over the candidates and
  DDIM's step costs shared by every solver and NFE, as benchmarks/gits_grids.py does: GITS costs multistep solvers with
  DDIM's step, so the three default bases get the same GITS grid at one NFE);
* the IIA method of the base, calibrated with the config's calibration settings (testbed: B = 64, M = 4, local
  target, guard on), on the base's best fixed grid at that NFE (lowest RMSE) and on the GITS grid;
* learned grids: LD3-style grid files (``--learned DIR`` reads ``DIR/<base>-nfe<N>.json`` grid files written by
  ``iia grid --search learned``; ``--search-learned`` searches the missing ones, each from the base's best fixed
  grid), the base on them and its IIA method calibrated on them; with
  ``--add-learned CSV`` only these rows are computed, for the (base, NFE) cells that lack them, and added to an
  earlier run's rows (same NFEs, bases, seeds and reference, its ``--reference-cache``), so learned grids can join
  a finished table without running it again.

Integration error: RMSE of the final samples on ``--seeds`` held-out seeds (0..N-1) against one converged reference
solve per noise (EDM's Heun at ``--reference-nfe`` on a Karras grid), the same reference for every cell: the final
samples are compared, so the error does not depend on a cell's grid. Every row keeps its per-seed squared errors
(``sq``), so the CSV alone gives every paired comparison (benchmarks/paired_rows.py, iia_cli.metrics.uncertainty).

Cost: GITS search (teacher + step costs + dynamic programming, the shared parts counted in every search, as a
standalone search would spend them) and IIA calibration (``calibration_calls``: fit, teacher and guard passes;
seconds as measured: the teacher's states are shared between the calibrations on one grid, so ``calib_s`` of a
row with ``teacher_shared`` leaves the teacher out, its calls do not).

    nice python benchmarks/frontier.py                                   # the README run
    python benchmarks/frontier.py --markdown results/frontier/rows.csv   # the README block from the CSV
    python benchmarks/frontier.py --learned DIR --add-learned results/frontier/rows.csv \
        --reference-cache REF.pt --out results/frontier                  # learned grids added to a finished run

NFEs run in the order given and the CSV is rewritten after each, so a run stopped early keeps the NFEs it finished.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from iia_cli import api
from iia_cli.config.experiment import load_config
from iia_cli.core.gridfile import GridFile, load_grid_file
from iia_cli.core.methods import IIA_METHODS
from iia_cli.core.sampling import sample_batches
from iia_cli.core.solvers.registry import make_solver
from iia_cli.experiments.gits import SearchSettings, candidate_sigmas, cheapest_path, step_costs, teacher_states
from iia_cli.experiments.ld3 import LearnSettings, search_learned

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.frontier
    import paired_rows as pr
except ImportError:  # pragma: no cover
    from benchmarks import paired_rows as pr

BASES = ["ddim", "ipndm", "dpm-solver++-2m"]
GRID_LABEL = {"gits": "GITS", "learned": "learned"}
FIXED = ["karras", "logsnr", "time-uniform"]
NFES = [6, 4, 5, 8, 10]  # run order: a run stopped early keeps the first ones
# Goals of the issue: (largest ratio best calibrated / best base on its best fixed grid, NFEs).
FRONTIER_GOALS = [(0.75, (4, 5, 6, 7, 8, 9, 10)), (0.5, (5, 6))]


def final_states(p: api.Prepared, sigmas: torch.Tensor, seeds: list[int], coeffs=None) -> torch.Tensor:
    return torch.cat([x.to(torch.float64) for _, x in sample_batches(p.model, p.method, sigmas, seeds, 128, coeffs,
                                                                      p.device, p.state_dtype)])


def iia_of(base: str) -> str | None:
    name = f"iia-{base}"
    return name if name in IIA_METHODS else None


# ---------------------------------------------------------------------------------------------------------------
# Report (from the rows alone)


def _rows(df: pd.DataFrame, n: int) -> list[dict]:
    return df[df.nfe == n].to_dict("records")


def best_fixed(rows: list[dict], base: str) -> dict:
    """The base solver's row on its best fixed grid (lowest RMSE) at one NFE."""
    fixed = [r for r in rows if r["method"] == base and r["kind"] == "fixed"]
    return min(fixed, key=lambda r: float(r["rmse"]))


def frontier(rows: list[dict]) -> dict:
    """At one NFE: the best base solver on its best fixed grid, the best calibrated sampler (a searched grid, IIA, or
    both) and their paired ratio."""
    base = min((r for r in rows if r["kind"] == "fixed"), key=lambda r: float(r["rmse"]))
    cal = [r for r in rows if r["kind"] != "fixed"]
    best = min(cal, key=lambda r: float(r["rmse"])) if cal else None
    return {"base": base, "best": best, "ratio": pr.compare(best, base) if best else None}


def label(r: dict) -> str:
    return f"{r['method']} on {r['grid']}"


def with_comparisons(df: pd.DataFrame) -> pd.DataFrame:
    """Every row compared (paired, same seeds) with the best base solver on its best fixed grid at its NFE
    (``ratio*`` columns), and ``best`` marks (``*`` / ``~``) per NFE."""
    df = df.reset_index(drop=True)
    cols = []
    for r in df.to_dict("records"):
        ref = frontier(_rows(df, r["nfe"]))["base"]
        cols.append(pr.paired_columns(pr.compare(r, ref)))
    df = pd.concat([df.drop(columns=[c for c in cols[0] if c in df], errors="ignore"), pd.DataFrame(cols)], axis=1)
    return pr.with_best_column(df)


def table(df: pd.DataFrame) -> str:
    """Rows = (method, grid), columns = NFE: RMSE and the paired ratio to the best base solver on its best fixed grid
    at that NFE [95 % interval]; ``fixed*``: the fixed grid the IIA row was calibrated on (the base's best)."""
    nfes = sorted(int(n) for n in df.nfe.unique())
    lines = ["| method | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    order = []
    bases = list(dict.fromkeys(df.base))
    kinds = ["fixed", *SEARCHED, "iia-fixed", *(f"iia-{k}" for k in SEARCHED)]
    for r in sorted(df.to_dict("records"), key=lambda r: (bases.index(r["base"]), kinds.index(r["kind"]))):
        key = (r["method"], r["grid"] if r["kind"] != "iia-fixed" else "best fixed")  # per base: its grids, then IIA
        if key not in order:
            order.append(key)
    for meth, grid in order:
        cells = []
        for n in nfes:
            at = df[(df.method == meth) & (df.nfe == n)
                    & ((df.kind == "iia-fixed") if grid == "best fixed" else (df.grid == grid))]
            if at.empty:
                cells.append("")
                continue
            r = at.iloc[0]
            text = f"{r.rmse:.4f}" + ("!" if r.ci_warning else "") + " " + pr.ratio_text(pr.stored(r, "ratio"))
            if grid == "best fixed":
                text += f" ({r.grid})"
            cells.append(f"{text} {r.best}" if r.best else text)
        lines.append(f"| {meth} | {grid} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEARCHED = ("gits", "learned")  # the optimized grid kinds; IIA on one is kind "iia-<grid>"


def searched_kinds(df: pd.DataFrame) -> list[str]:
    return [k for k in SEARCHED if (df.kind == k).any()]


def composed(rows: list[dict], base: str, k: str) -> tuple[dict | None, dict | None, dict | None]:
    """At one NFE, for one base and searched grid kind ``k``: (IIA on that grid, IIA on the best fixed grid, the base
    on that grid); None where a row is missing."""
    def one(pred):
        return next((r for r in rows if r["base"] == base and pred(r)), None)
    return (one(lambda r: r["kind"] == f"iia-{k}"), one(lambda r: r["kind"] == "iia-fixed"),
            one(lambda r: r["method"] == base and r["kind"] == k))


def summary(df: pd.DataFrame) -> list[str]:
    """Per NFE: the best base on its best fixed grid, the best calibrated sampler, their ratio; IIA on each optimized
    grid (GITS, learned) against IIA alone (on the best fixed grid) and against that grid alone."""
    nfes = sorted(int(n) for n in df.nfe.unique())
    kinds = searched_kinds(df)
    head = "".join(f" IIA on {GRID_LABEL[k]} / IIA alone | IIA on {GRID_LABEL[k]} / {GRID_LABEL[k]} alone |"
                   for k in kinds)
    out = ["| NFE | best base (best fixed grid) | best calibrated | ratio [95 %] |" + head,
           "|---|---|---|---|" + "---|---|" * len(kinds)]
    for n in nfes:
        rows = _rows(df, n)
        f = frontier(rows)
        cells = []
        for k in kinds:
            vs_iia, vs_grid = [], []
            for base in dict.fromkeys(r["base"] for r in rows):
                both, alone, grid = composed(rows, base, k)
                if both and alone:
                    vs_iia.append(f"{both['method']} {pr.ratio_text(pr.compare(both, alone))}")
                if both and grid:
                    vs_grid.append(f"{both['method']} {pr.ratio_text(pr.compare(both, grid))}")
            cells += ["; ".join(vs_iia), "; ".join(vs_grid)]
        b, c = f["base"], f["best"]
        out.append(f"| {n} | {label(b)} {b['rmse']:.4f} | " + (f"{label(c)} {c['rmse']:.4f} | "
                   f"{pr.ratio_text(f['ratio'])} |" if c else " | |")
                   + "".join(f" {x} |" for x in cells))
    return out


def goals(df: pd.DataFrame) -> list[str]:
    """The issue's goals judged on the paired intervals, NFE by NFE (only the NFEs measured)."""
    nfes = sorted(int(n) for n in df.nfe.unique())
    out = []
    for target, want in FRONTIER_GOALS:
        cells, met, judged = [], 0, 0
        for n in nfes:
            if n not in want:
                continue
            f = frontier(_rows(df, n))
            if f["ratio"] is None:
                continue
            p = f["ratio"]
            v = pr.goal_verdict(p.ratio, p.low, p.high, target)
            judged += 1
            met += v.startswith("met")
            cells.append(f"NFE {n} x{p.ratio:.2f} [{p.low:.2f}, {p.high:.2f}] {v}")
        missing = [n for n in want if n not in nfes]
        verdict = pr.fmt_goal(met == judged) if judged else "not measured"
        out.append(f"- best calibrated <= {target:g}x the best base on its best fixed grid (upper bound below 1), "
                   f"NFE {want[0]}-{want[-1]}: {verdict} on the NFEs measured "
                   f"({met} of {judged}; {'; '.join(cells)})"
                   + (f"; not measured: NFE {', '.join(map(str, missing))}" if missing else ""))
    for k in searched_kinds(df):
        cells, bad = [], 0
        for n in nfes:
            rows = _rows(df, n)
            for base in dict.fromkeys(r["base"] for r in rows):
                both, alone, grid = composed(rows, base, k)
                if not (both and alone and grid):
                    continue
                better = min((alone, grid), key=lambda r: float(r["rmse"]))
                p = pr.compare(both, better)
                ok = not (p.resolved and p.ratio > 1)
                bad += not ok
                cells.append(f"{both['method']} NFE {n} vs {label(better)} {pr.ratio_text(p)}"
                             + ("" if ok else " MISSED"))
        out.append(f"- IIA on the {GRID_LABEL[k]} grid at least as good as the better of IIA alone and the "
                   f"{GRID_LABEL[k]} grid alone (ratio <= 1.00 or not resolved): "
                   f"{pr.fmt_goal(bad == 0 and bool(cells))} ({len(cells) - bad} of {len(cells)}; {'; '.join(cells)})")
    return out


def costs(df: pd.DataFrame) -> list[str]:
    """Search and calibration cost per NFE (denoiser calls and seconds), ranges over the bases."""
    kinds = searched_kinds(df)
    out = ["| NFE |" + "".join(f" {GRID_LABEL[k]} search (one standalone search) |" for k in kinds)
           + " IIA calibration on the best fixed grid |"
           + "".join(f" IIA calibration on the {GRID_LABEL[k]} grid |" for k in kinds),
           "|---|" + "---|" * (1 + 2 * len(kinds))]

    def rng(v, fmt):
        lo, hi = fmt(min(v)), fmt(max(v))
        return lo if lo == hi else f"{lo}-{hi}"

    for n in sorted(int(k) for k in df.nfe.unique()):
        at = df[df.nfe == n]
        cells = []
        for k in kinds:
            g = at[at.kind == k]
            cells.append(f"{rng(g.search_calls, lambda x: f'{int(x):,}')} calls, "
                         f"{rng(g.search_s, lambda x: f'{x:.0f}')} s" if len(g) else "")
        for kind in ("iia-fixed", *(f"iia-{k}" for k in kinds)):
            c = at[at.kind == kind]
            cells.append(f"{rng(c.calib_calls, lambda x: f'{int(x):,}')} calls, "
                         f"{rng(c.calib_s, lambda x: f'{x:.0f}')} s" if len(c) else "")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return out


def report(df: pd.DataFrame) -> str:
    df = with_comparisons(df)
    return "\n".join([table(df), "", *summary(df), "", "Goals (judged on the paired 95 % intervals):", *goals(df), "",
                      "Cost (denoiser calls = images x sigmas; seconds on this machine):", "", *costs(df)])


# ---------------------------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/mnist-testbed.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--bases", default=",".join(BASES))
    ap.add_argument("--fixed", default=",".join(FIXED), help="fixed grid kinds (iia_cli.core.grids)")
    ap.add_argument("--nfes", default=",".join(map(str, NFES)), help="NFEs, run in this order")
    ap.add_argument("--seeds", type=int, default=128, help="held-out evaluation seeds 0..N-1")
    ap.add_argument("--reference-nfe", type=int, default=99, help="EDM Heun NFE of the reference (Karras grid)")
    ap.add_argument("--reference-cache", default="", help="file holding the reference solve (written if absent)")
    ap.add_argument("--candidates", type=int, default=50, help="GITS candidates")
    ap.add_argument("--noises", type=int, default=16, help="GITS teacher noises")
    ap.add_argument("--teacher-substeps", type=int, default=2, help="GITS teacher Heun steps per candidate interval")
    ap.add_argument("--no-iia", action="store_true", help="base solvers and grids only")
    ap.add_argument("--learned", default="", metavar="DIR",
                    help="add learned grids: DIR/<base>-nfe<N>.json grid files (iia grid --search learned)")
    ap.add_argument("--add-learned", default="", metavar="CSV",
                    help="with --learned DIR or --search-learned: add the learned grids (and IIA on them) to the rows "
                         "of an earlier run "
                         "(its NFEs, bases and seeds; --reference-cache of that run required), written to --out")
    ap.add_argument("--search-learned", action="store_true",
                    help="search the learned grids missing from --learned DIR (default OUT/learned), each starting "
                         "from the base's best fixed grid at that NFE, the teacher shared by all searches")
    ap.add_argument("--learn-noises", type=int, default=32, help="learned: training noises")
    ap.add_argument("--learn-val-noises", type=int, default=16, help="learned: validation noises")
    ap.add_argument("--learn-iterations", type=int, default=40, help="learned: Adam iterations")
    ap.add_argument("--learn-batch", type=int, default=8, help="learned: noises per iteration")
    ap.add_argument("--learn-teacher-steps", type=int, default=20, help="learned: teacher's Karras intervals")
    ap.add_argument("--learn-teacher-substeps", type=int, default=2, help="learned: teacher Heun steps per interval")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default="results/frontier")
    ap.add_argument("--markdown", metavar="CSV", help="print the README block of this rows CSV and exit")
    a = ap.parse_args(argv)
    if a.markdown:
        print(report(pd.read_csv(a.markdown, keep_default_na=False)))
        return None
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="frontier-"))
    overrides = [tuple(s.split("=", 1)) for s in a.set]
    base_overrides = [*overrides, ("calibration.out_dir", str(tmp)), ("calibration.val_samples", 0)]

    def config(extra=()):
        return load_config(a.config or None, [*base_overrides, *extra])

    cfg = config()
    c = cfg.calibration
    bases = a.bases.split(",")
    fixed = a.fixed.split(",")
    nfes = [int(n) for n in a.nfes.split(",")]
    seeds = list(range(a.seeds))
    earlier: list[dict] = []
    learned_dir = Path(a.learned) if a.learned else (out / "learned" if a.search_learned else None)
    learn = LearnSettings(iterations=a.learn_iterations, noises=a.learn_noises, val_noises=a.learn_val_noises,
                          batch=a.learn_batch, teacher_steps=a.learn_teacher_steps,
                          teacher_substeps=a.learn_teacher_substeps)
    learn_memo: dict = {}
    if a.add_learned:  # the earlier run's rows, NFEs, bases and seeds; only learned rows are computed
        if not (learned_dir and a.reference_cache and Path(a.reference_cache).is_file()):
            raise SystemExit("--add-learned needs --learned DIR or --search-learned, and the earlier run's "
                             "--reference-cache file")
        try:
            old = pd.read_csv(a.add_learned, keep_default_na=False)  # learned rows already there are kept
        except Exception as err:  # noqa: BLE001 -- pandas' parser errors, an unreadable file
            raise SystemExit(f"--add-learned {a.add_learned}: not a readable CSV ({type(err).__name__})") from None
        missing = {"method", "base", "kind", "grid", "nfe", "seeds", "rmse", "sq"} - set(old.columns)
        if missing or old.empty:
            raise SystemExit(f"--add-learned {a.add_learned}: not rows of this script (missing columns: "
                             f"{', '.join(sorted(missing)) or 'none, but no rows'})")
        earlier = old.drop(columns=[k for k in old.columns if k.startswith("ratio") or k == "best"]).to_dict("records")
        nfes = list(dict.fromkeys(int(n) for n in old.nfe))
        bases = list(dict.fromkeys(str(b) for b in old.base))
        first, _, last = str(old.seeds.iloc[0]).partition("-")
        if not (first == "0" and last.isdigit()):
            raise SystemExit(f"--add-learned {a.add_learned}: seeds {old.seeds.iloc[0]!r} are not 0-N")
        seeds = list(range(int(last) + 1))
    first = api.prepare(cfg, bases[0], nfes[0])
    model, fp = first.model, first.fingerprint

    # The reference: one converged solve per noise, shared by every cell.
    t0 = time.perf_counter()
    cache = Path(a.reference_cache) if a.reference_cache else None
    if cache is not None and cache.is_file():
        try:  # tensors and plain data only: nothing in the file runs
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            saved["seeds"], saved["fingerprint"], saved["nfe"], saved["reference"]
        except Exception as err:  # noqa: BLE001 -- unpickling, a missing key, a non-dict
            raise SystemExit(f"{cache} is not a reference cache of this script ({type(err).__name__}); remove it "
                             "to solve the reference again") from None
        if saved["seeds"] != seeds or saved["fingerprint"] != fp or saved["nfe"] != a.reference_nfe:
            raise SystemExit(f"{cache} holds the reference of other seeds, NFE or model")
        x_ref = saved["reference"]
    else:
        ref = api.prepare(config([("grid.kind", "karras"), ("grid.rho", 7.0)]), "edm", a.reference_nfe, model=model,
                          fingerprint=fp)
        x_ref = final_states(ref, ref.sigmas, seeds)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"seeds": seeds, "fingerprint": fp, "nfe": a.reference_nfe, "reference": x_ref}, cache)
    print(f"reference edm@{a.reference_nfe}: {time.perf_counter() - t0:.0f} s", flush=True)
    elements = int(x_ref[0].numel())

    # GITS: the teacher over the candidates and DDIM's step costs, shared by every solver and NFE.
    settings = SearchSettings(candidates=a.candidates, noises=a.noises, teacher_substeps=a.teacher_substeps, batch=64)
    if not earlier:
        t0 = time.perf_counter()
        cand = candidate_sigmas(cfg.grid, model, settings.candidates)
        search_seeds = list(range(settings.seed_start, settings.seed_start + settings.noises))
        states, labels, teacher_calls = teacher_states(model, cand, search_seeds, settings, first.device,
                                                       first.state_dtype)
        t_teacher = time.perf_counter() - t0
        t0 = time.perf_counter()
        cost, cost_calls = step_costs(make_solver("ddim"), model, cand, states, labels)
        t_cost = time.perf_counter() - t0
        del states
        print(f"GITS teacher {t_teacher:.0f} s ({teacher_calls:,} calls), DDIM step costs {t_cost:.0f} s", flush=True)

    rows: list[dict] = []
    teachers_seen: set = set()

    def add(method, base, kind, grid, n, x, sigmas, **extra):
        rows.append(dict(method=method, base=base, kind=kind, grid=grid, nfe=n,
                         sigmas=" ".join(f"{float(s):.6g}" for s in sigmas), search_s=0.0, search_calls=0,
                         calib_s=0.0, calib_calls=0, guard_alpha="", teacher_shared="", **extra,
                         **pr.row_stats(pr.per_seed_sq(x, x_ref), elements)))
        r = rows[-1]
        print(f"NFE {n:2d} {method:22s} {grid:13s} rmse {r['rmse']:.4f}"
              + (f"  calibration {r['calib_s']:.0f} s" if r["calib_s"] else ""), flush=True)

    def calibrate(method, n, extra, grid_name, kind, base):
        c2 = config(extra)
        pi = api.prepare(c2, method, n, model=model, fingerprint=fp)
        key = tuple(float(s) for s in pi.sigmas)
        shared = key in teachers_seen
        teachers_seen.add(key)
        cs, _ = api.calibrate(c2, prepared=pi, verbose=False, log=lambda s: None)
        x = final_states(pi, pi.sigmas, seeds, cs.coefficients)
        return dict(method=method, base=base, kind=kind, grid=grid_name, n=n, x=x, sigmas=pi.sigmas,
                    calib_s=round(cs.calibration_seconds, 1), calib_calls=int(cs.calibration_calls),
                    guard_alpha=cs.guard_alpha, teacher_shared=shared)

    def save():
        df = pd.DataFrame(rows)
        df["seeds"] = f"0-{len(seeds) - 1}"
        df["reference"] = f"edm@{a.reference_nfe} karras"
        df["B"], df["M"], df["guard"], df["target"] = c.samples, c.substeps, c.guard, c.target
        df["gits"] = ("" if earlier else
                      f"{len(cand)} candidates, {settings.noises} noises, edm{settings.teacher_substeps}, ddim cost")
        df["machine"] = f"{platform.machine()} {torch.get_num_threads()} threads"
        df["seconds_total"] = round(time.perf_counter() - t_start)  # of the run that wrote the row
        if earlier:  # the earlier run's rows as they were, this run's learned rows after them
            df = pd.concat([pd.DataFrame(earlier), df], ignore_index=True)
        df = with_comparisons(df)
        df.to_csv(out / "rows.csv", index=False)
        return df

    def learned_grid(base, n, start_kind):
        """The learned grid file of (base, NFE) in the learned directory, searched from ``start_kind`` (the base's
        best fixed grid) when it is missing and --search-learned asks for it; None when there is none."""
        if learned_dir is None:
            return None
        lpath = learned_dir / f"{base}-nfe{n}.json"
        if lpath.is_file() or not a.search_learned:
            return lpath if lpath.is_file() else None
        t0 = time.perf_counter()
        gf = search_learned(config([("grid.kind", start_kind)]), base, n, learn, log=lambda s: None,
                            teacher_memo=learn_memo)
        lpath.parent.mkdir(parents=True, exist_ok=True)
        gf.save(lpath)
        print(f"NFE {n:2d} {base}: learned grid from {start_kind} in {time.perf_counter() - t0:.0f} s (validation "
              f"MSE x{gf.search['val_mse'] / gf.search['val_mse_init']:.2f} of the start) -> {lpath}", flush=True)
        return lpath

    def learned(base, n, p, lpath):
        """The base solver on the learned grid file ``lpath``; returns its search seconds and calls."""
        lg = load_grid_file(lpath)
        s = lg.search or {}
        calls = s.get("denoiser_calls", 0)
        add(base, base, "learned", "learned", n, final_states(p, lg.tensor(), seeds), lg.tensor())
        rows[-1].update(search_s=float(s.get("seconds", 0.0)),
                        search_calls=sum(calls.values()) if isinstance(calls, dict) else int(calls))
        return rows[-1]["search_s"], rows[-1]["search_calls"]

    def iia_on(iia, base, n, grid):
        """IIA calibrated on a searched grid file: ``grid`` = (name, kind, path, search seconds, search calls)."""
        gname, kind_name, path_, s_s, s_c = grid
        r = calibrate(iia, n, [("grid.kind", "file"), ("grid.path", str(path_))], gname, f"iia-{kind_name}", base)
        add(r.pop("method"), r.pop("base"), r.pop("kind"), r.pop("grid"), r.pop("n"), r.pop("x"), r.pop("sigmas"))
        rows[-1].update(r, search_s=s_s, search_calls=s_c)

    for n in nfes:
        for base in bases:
            p = api.prepare(cfg, base, n, model=model, fingerprint=fp)
            iia = None if a.no_iia else iia_of(base)
            if earlier:  # only the learned grid and IIA on it, where the earlier rows lack them
                if any(r["kind"] == "learned" and r["base"] == base and int(r["nfe"]) == n for r in earlier):
                    continue
                lpath = learned_grid(base, n, best_fixed([r for r in earlier if int(r["nfe"]) == n], base)["grid"])
                if lpath is None:
                    print(f"NFE {n:2d} {base}: no learned grid in {learned_dir}", flush=True)
                    continue
                grid = ("learned", "learned", lpath, *learned(base, n, p, lpath))
                if iia is not None:
                    iia_on(iia, base, n, grid)
                continue
            for kind in fixed:
                pk = api.prepare(config([("grid.kind", kind)]), base, n, model=model, fingerprint=fp)
                add(base, base, "fixed", kind, n, final_states(pk, pk.sigmas, seeds), pk.sigmas)
            # GITS grid of this solver's plan (DDIM's step cost; see the module doc).
            solver = p.method.solver
            plan = solver.plan(n)
            t0 = time.perf_counter()
            path, _ = cheapest_path(cost, (plan.n_points - 1) * solver.calls_per_step, solver.calls_per_step)
            gits = cand[path]
            if plan.append_zero:
                gits = torch.cat([gits, gits.new_zeros(1)])
            assert solver.nfe_of_grid(gits) == n
            search_s = round(t_teacher + t_cost + time.perf_counter() - t0, 1)
            add(base, base, "gits", "gits", n, final_states(p, gits, seeds), gits, )
            rows[-1].update(search_s=search_s, search_calls=teacher_calls + cost_calls)
            gf = GridFile(sigmas=gits.tolist(), nfe=n, method=base, solver=solver.name, convention=solver.convention,
                          model_kind=cfg.model.kind, model_sha256=fp, search={"kind": "gits", "benchmark": True})
            gpath = gf.save(tmp / f"gits-{base}-nfe{n}.json")
            grids = [("gits", "gits", gpath, search_s, teacher_calls + cost_calls)]
            bf = best_fixed([r for r in rows if r["nfe"] == n], base)
            lpath = learned_grid(base, n, bf["grid"])
            if lpath is not None:
                grids.append(("learned", "learned", lpath, *learned(base, n, p, lpath)))
            if iia is None:
                continue
            r = calibrate(iia, n, [("grid.kind", bf["grid"])], bf["grid"], "iia-fixed", base)
            add(r.pop("method"), r.pop("base"), r.pop("kind"), r.pop("grid"), r.pop("n"), r.pop("x"),
                r.pop("sigmas"), **{})
            rows[-1].update(r)
            for grid in grids:
                iia_on(iia, base, n, grid)
        df = save()
        print(f"-- NFE {n} done, {time.perf_counter() - t_start:.0f} s so far; {out / 'rows.csv'} written", flush=True)
    df = save()
    print()
    print(report(df))
    print(f"\n{len(seeds)} held-out seeds; {time.perf_counter() - t_start:.0f} s on {df['machine'][0]}")
    return df


if __name__ == "__main__":
    main()
