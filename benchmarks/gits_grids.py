"""GITS grids vs Karras grids on gmm-mnist: integration error of DDIM, iPNDM, DPM-Solver++(2M) and EDM (Heun), and
IIA-DDIM calibrated on either grid.

The search is GITS (Chen et al., ICML 2024) as ``iia grid --search gits`` runs it (:mod:`iia_cli.experiments.gits`),
with its parts shared where they coincide: one teacher solve over the candidates serves every solver, DDIM's step costs
serve DDIM, iPNDM and DPM-Solver++(2M) (multistep solvers are costed with DDIM's step), Heun's serve EDM. ``search_s``
is the wall time of one standalone search (teacher + that cost matrix + the dynamic programming), ``search_calls``
its denoiser evaluations (one image at one sigma). The integration error is the RMSE of the final samples against
EDM's Heun at NFE 999 on a Karras grid, on held-out seeds; ``ratio`` = RMSE on the GITS grid / RMSE of the same
solver on the Karras grid with a paired 95 % bootstrap interval over the seeds
(``iia_cli.metrics.uncertainty.paired_rmse``).

    nice python benchmarks/gits_grids.py                # 128 seeds, 32 teacher noises, 100 candidates
    nice python benchmarks/gits_grids.py --quick        # a smoke run

``--search learned`` adds LD3-style learned grids (Tong et al., ICLR 2025; ``iia grid --search learned``,
:mod:`iia_cli.experiments.ld3`) for DDIM and iPNDM beside their Karras and GITS grids (no IIA, EDM or 2M rows): one
search per solver and NFE, the teacher's final samples shared between them (its time counted in every search's
``search_s``, as a standalone search would spend it).
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
from iia_cli.core.gridfile import GridFile
from iia_cli.core.sampling import sample_batches
from iia_cli.core.solvers.registry import make_solver
from iia_cli.experiments.gits import SearchSettings, candidate_sigmas, cheapest_path, step_costs, teacher_states
from iia_cli.experiments.ld3 import LearnSettings, search_learned
from iia_cli.metrics.uncertainty import paired_rmse

BASES = ["ddim", "ipndm", "dpm-solver++-2m", "edm"]
IIA = {"ddim": "iia-ddim"}  # calibrated on both grids
NFES = [4, 5, 6, 8, 10]


def final_states(p: api.Prepared, sigmas: torch.Tensor, seeds: list[int], coeffs=None) -> torch.Tensor:
    return torch.cat([x.to(torch.float64) for _, x in sample_batches(p.model, p.method, sigmas, seeds, 128, coeffs,
                                                                      p.device, p.state_dtype)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/mnist-gmm.yaml")
    ap.add_argument("--seeds", type=int, default=128, help="held-out evaluation seeds 0..N-1")
    ap.add_argument("--noises", type=int, default=32, help="teacher noises of the search")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--teacher-substeps", type=int, default=5)
    ap.add_argument("--calib-samples", type=int, default=64, help="IIA calibration noises B")
    ap.add_argument("--nfes", default=",".join(map(str, NFES)))
    ap.add_argument("--out", default="results/gits")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--search", choices=["gits", "learned"], default="gits",
                    help="learned: add LD3-style learned grids for DDIM and iPNDM (and leave out IIA, EDM and 2M)")
    ap.add_argument("--reference-nfe", type=int, default=999, help="EDM Heun NFE of the reference solve")
    ap.add_argument("--learn-noises", type=int, default=64, help="learned: training noises")
    ap.add_argument("--learn-val-noises", type=int, default=32, help="learned: validation noises")
    ap.add_argument("--learn-iterations", type=int, default=150, help="learned: Adam iterations")
    ap.add_argument("--learn-loss", choices=["soft", "mse"], default="soft", help="learned: loss")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.noises, a.candidates, a.teacher_substeps, a.calib_samples, a.nfes = 16, 8, 30, 2, 16, "5,6"
        a.learn_noises, a.learn_val_noises, a.learn_iterations, a.reference_nfe = 8, 8, 10, 199
    learned = a.search == "learned"
    bases = ["ddim", "ipndm"] if learned else BASES
    iia = {} if learned else IIA
    learn = LearnSettings(iterations=a.learn_iterations, noises=a.learn_noises, val_noises=a.learn_val_noises,
                          loss=a.learn_loss)
    teacher_memo: dict = {}
    nfes = [int(n) for n in a.nfes.split(",")]
    out = Path("results/ld3" if learned and a.out == "results/gits" else a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(a.config, [("sampler.batch", 128), ("calibration.samples", a.calib_samples),
                                 ("calibration.val_samples", 0), ("calibration.guard", False)])
    settings = SearchSettings(candidates=a.candidates, noises=a.noises, teacher_substeps=a.teacher_substeps, batch=64)
    base = api.prepare(cfg, "ddim", 6)
    model, fp = base.model, base.fingerprint

    # The search, shared parts timed once.
    t0 = time.perf_counter()
    cand = candidate_sigmas(cfg.grid, model, settings.candidates)
    seeds_search = list(range(settings.seed_start, settings.seed_start + settings.noises))
    states, labels, teacher_calls = teacher_states(model, cand, seeds_search, settings, base.device, base.state_dtype)
    t_teacher = time.perf_counter() - t0
    costs = {}
    for name in ("ddim",) if learned else ("ddim", "edm"):
        t0 = time.perf_counter()
        cost, calls = step_costs(make_solver(name), model, cand, states, labels)
        costs[name] = (cost, calls, time.perf_counter() - t0)
        print(f"step costs {name}: {costs[name][2]:.1f} s, {calls} calls", flush=True)

    seeds = list(range(a.seeds))
    ref = api.prepare(cfg, "edm", a.reference_nfe, model=model, fingerprint=fp)
    x_ref = final_states(ref, ref.sigmas, seeds)
    d = x_ref[0].numel()

    def sq_err(x: torch.Tensor) -> np.ndarray:
        return ((x - x_ref) ** 2).flatten(1).sum(1).numpy()

    rows, grids = [], []
    tmp = Path(tempfile.mkdtemp(prefix="gits-bench-"))
    for m in bases:
        for n in nfes:
            try:
                p = api.prepare(cfg, m, n, model=model, fingerprint=fp)
            except Exception as exc:  # an NFE this solver does not take
                print(f"skip {m} NFE {n}: {exc}")
                continue
            solver = p.method.solver
            plan = solver.plan(n)
            steps = plan.n_points - 1
            cost, cost_calls, t_cost = costs["edm" if solver.calls_per_step == 2 else "ddim"]
            t0 = time.perf_counter()
            path, path_cost = cheapest_path(cost, steps * solver.calls_per_step, solver.calls_per_step)
            t_dp = time.perf_counter() - t0
            gits = cand[path]
            if plan.append_zero:
                gits = torch.cat([gits, gits.new_zeros(1)])
            assert solver.nfe_of_grid(gits) == n
            search_s, search_calls = t_teacher + t_cost + t_dp, teacher_calls + cost_calls
            grids.append({"method": m, "nfe": n, "karras": p.sigmas.tolist(), "gits": gits.tolist()})
            sq_k = sq_err(final_states(p, p.sigmas, seeds))
            sq_g = sq_err(final_states(p, gits, seeds))
            variants = [("karras", m, sq_k, 0.0, 0), ("gits", m, sq_g, search_s, search_calls)]
            if learned:
                gl = search_learned(cfg, m, n, learn, log=lambda line: print(line, flush=True),
                                    teacher_memo=teacher_memo)
                ls = gl.search
                grids[-1]["learned"] = gl.sigmas
                variants.append(("learned", m, sq_err(final_states(p, gl.tensor(), seeds)),
                                 ls["teacher_seconds"] + ls["training_seconds"], sum(ls["denoiser_calls"].values())))
            if m in iia:
                gf = GridFile(sigmas=gits.tolist(), nfe=n, method=m, solver=solver.name, convention=solver.convention,
                              model_kind=cfg.model.kind, model_sha256=fp, search={"kind": "gits", "benchmark": True})
                gpath = gf.save(tmp / f"{m}-{n}.json")
                for gname, overrides in (("karras", []), ("gits", [("grid.kind", "file"), ("grid.path", str(gpath))])):
                    c2 = load_config(a.config, [("sampler.batch", 128), ("calibration.samples", a.calib_samples),
                                                ("calibration.val_samples", 0), ("calibration.guard", False),
                                                ("calibration.out_dir", str(tmp)), *overrides])
                    pi = api.prepare(c2, iia[m], n, model=model, fingerprint=fp)
                    cs, _ = api.calibrate(c2, prepared=pi, verbose=False, log=lambda s: None)
                    variants.append((gname, iia[m], sq_err(final_states(pi, pi.sigmas, seeds, cs.coefficients)),
                                     search_s if gname == "gits" else 0.0, search_calls if gname == "gits" else 0))
            for gname, meth, sq, s_s, s_c in variants:
                pr = paired_rmse(sq, np.full(len(sq), d), sq_k, np.full(len(sq_k), d))
                rows.append({"method": meth, "base": m, "grid": gname, "nfe": n,
                             "rmse": float(np.sqrt(sq.sum() / (len(sq) * d))), "ratio_vs_base_karras": pr.ratio,
                             "ci_low": pr.low, "ci_high": pr.high, "p_better": pr.prob_improvement, "seeds": len(sq),
                             "search_s": round(s_s, 2), "search_calls": s_c, "candidates": len(cand),
                             "noises": settings.noises if gname != "learned" else learn.noises,
                             "teacher": f"edm{settings.teacher_substeps}" if gname != "learned" else
                             f"edm{learn.teacher_substeps} on {learn.teacher_steps} Karras intervals"})
                print(f"{meth:18s} {gname:6s} NFE {n:2d}: rmse {rows[-1]['rmse']:.4f} x{pr.ratio:.2f} "
                      f"[{pr.low:.2f}, {pr.high:.2f}]", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "integration_error.csv", index=False)
    pd.DataFrame(grids).to_csv(out / "grids.csv", index=False)
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}; "
          f"teacher {t_teacher:.1f} s ({teacher_calls} calls)")
    print(table(df, nfes))


def table(df: pd.DataFrame, nfes: list[int]) -> str:
    """Markdown: RMSE on the GITS grid and its ratio to the same solver on Karras (paired 95 % interval)."""
    lines = ["| method | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " | search |",
             "|---|---|" + "---|" * len(nfes) + "---|"]
    for (meth, grid), g in df.groupby(["method", "grid"], sort=False):
        cells = []
        for n in nfes:
            r = g[g.nfe == n]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            cells.append(f"{r.rmse:.4f}" if (grid == "karras" and meth == r.base) else
                         f"{r.rmse:.4f} x{r.ratio_vs_base_karras:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]")
        s = g.iloc[0]
        search = f"{s.search_s:.0f} s, {int(s.search_calls):,} calls" if grid == "gits" else ""
        if grid == "learned":  # one search per NFE
            search = (f"{g.search_s.min():.0f}-{g.search_s.max():.0f} s, {int(g.search_calls.min()):,}-"
                      f"{int(g.search_calls.max()):,} calls")
        lines.append(f"| {meth} | {grid} | " + " | ".join(cells) + f" | {search} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
