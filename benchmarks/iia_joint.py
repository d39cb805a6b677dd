"""Richer IIA-iPNDM bases and a joint final-target refinement (issue 14, item 4), measured on gmm-mnist.

A research benchmark, not a CLI feature: it asks whether any IIA variant of iPNDM, the best base solver at NFE 8
to 10, gets 20 % below iPNDM's final-sample error. Each variant is an IIA step ``x_{i+1} = iPNDM update +
sum_k c[i, k] q_k`` with per-step coefficients on quantities the sampler already has (same NFE):

* ``diff``: the shipped IIA-iPNDM basis, D_comb,i - D_comb,i-1 and eps_comb,i - eps_comb,i-1 (from step 1 on);
* ``xd``: the state x_i and the denoised D_i, as in IIA-DPM-Solver (eq. 23), at every step including step 0;
* ``xdh``: x_i, D_i and the earlier eps_{i-1}, eps_{i-2}, eps_{i-3} (per-step multistep weights).

The coefficients are fitted on the calibration noises only (B from 10^9): first the greedy ``trajectory`` pass
(each step's least squares against the teacher's state at sigma_{i+1}, the teacher being Heun with 10 steps per
interval), then, from that solution, all coefficients jointly by L-BFGS through the (differentiable) analytic
denoiser to minimise the final samples' mean squared error against the teacher's (the S4S-style ``final``
target). Scored like benchmarks/iia_targets.py: RMSE against a 500-step Heun solve on held-out seeds 0..N-1.
Also printed: how many held-out samples *flip* (per-sample MSE > 0.02: they end near another mode than the
reference), the RMSE of the others, and for iPNDM the RMSE its flips alone give (the others counted as exact):
a variant that keeps iPNDM's flips cannot get below it.

    nice python benchmarks/iia_joint.py --wide 1024           # results/iia_joint.csv (NFE 8-10, seeds 0-255 and 0-1023)
    nice python benchmarks/iia_joint.py --wide 1024 --trim    # fit without iPNDM's flips: results/iia_joint_trim.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from iia_cli import api
from iia_cli.calibration.lstsq import solve_least_squares
from iia_cli.calibration.teacher import Teacher, teacher_trajectory
from iia_cli.config.experiment import load_config
from iia_cli.core.sampling import make_noise, sample_batches
from iia_cli.core.solvers.ipndm import AB_WEIGHTS

BASES = ("diff", "xd", "xdh")
FLIP = 0.02  # per-sample MSE (pixels in [-1, 1]) above which a sample ended near another mode than the reference


def quantities(basis: str, x: torch.Tensor, D: torch.Tensor, comb: torch.Tensor, s: float,
               history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor] | None:
    """The IIA quantities of one step; ``history``: (eps, eps_comb, D_comb) of the earlier steps, oldest first."""
    if basis == "diff":
        if not history:
            return None
        return [(x - s * comb) - history[-1][2], comb - history[-1][1]]
    if basis == "xd":
        return [x, D]
    if basis == "xdh":
        return [x, D] + [h[0] for h in reversed(history[-3:])]
    raise ValueError(f"unknown basis {basis!r}; choose one of {', '.join(BASES)}")


def ipndm_iia(model, sigmas: torch.Tensor, x: torch.Tensor, basis: str, coeffs: list[torch.Tensor] | None = None,
              targets: list[torch.Tensor] | None = None, ridge: float = 1e-8):
    """iPNDM (fixed Adams-Bashforth weights, as iia_cli.core.solvers.ipndm) with IIA corrections on ``basis``.
    ``coeffs`` None and ``targets`` given: the greedy trajectory fit (returns the fitted coefficients);
    ``coeffs`` given: sampling (differentiable in the coefficients). Returns (final states, coefficients)."""
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    used = []
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D = model(x, s)
        eps = (x - D) / s
        order = min(4, len(history) + 1)
        past = [eps] + [h[0] for h in reversed(history[len(history) - order + 1:])] if order > 1 else [eps]
        comb = sum(w * e for w, e in zip(AB_WEIGHTS[order], past))
        x_next = x + (s_next - s) * comb
        q = quantities(basis, x, D, comb, s, history) if s_next > 0 else None  # the final denoise stays as it is
        c = torch.zeros(0, dtype=torch.float64)
        if q is not None:
            if coeffs is None:
                Q = torch.stack([v.reshape(-1) for v in q]).detach()
                c = solve_least_squares(Q @ Q.T, Q @ (targets[i + 1] - x_next).reshape(-1).detach(), ridge, step=i)
            else:
                c = coeffs[i]
            for ck, qk in zip(c, q):
                x_next = x_next + ck * qk
        used.append(c)
        history.append((eps, comb, x - s * comb))
        x = x_next
    return x, used


def refine(model, sigmas: torch.Tensor, x0: torch.Tensor, basis: str, start: list[torch.Tensor],
           teacher_final: torch.Tensor, iters: int) -> list[torch.Tensor]:
    """All coefficients jointly: L-BFGS on the final samples' MSE against the teacher, from ``start``."""
    sizes = [len(c) for c in start]
    params = torch.cat(start).clone().requires_grad_(True)

    def split(v: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(v, sizes))

    opt = torch.optim.LBFGS([params], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (ipndm_iia(model, sigmas, x0, basis, split(params))[0] - teacher_final).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return [c.detach() for c in split(params.detach())]


def scores(x: torch.Tensor, ref: torch.Tensor, n: int) -> dict[str, float]:
    """On the first n held-out seeds (the goal's set); with more seeds, also ``wide_*`` on all of them."""
    per_all = (x - ref).flatten(1).pow(2).mean(1)
    per = per_all[:n]
    rest = per[per <= FLIP]
    out = dict(rmse=float(per.mean().sqrt()), flips=int((per > FLIP).sum()), rest=float(rest.mean().sqrt()),
               flip_floor=float((per * (per > FLIP)).mean().sqrt()))
    if len(per_all) > n:
        out.update(wide_rmse=float(per_all.mean().sqrt()), wide_flips=int((per_all > FLIP).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nfe", default="8,9,10", help="comma-separated NFEs")
    ap.add_argument("--bases", default=",".join(BASES), help="comma-separated IIA bases (diff, xd, xdh)")
    ap.add_argument("--samples", type=int, default=200, help="calibration noises B (seeds from 10^9)")
    ap.add_argument("--seeds", type=int, default=256, help="held-out seeds 0..N-1")
    ap.add_argument("--wide", type=int, default=0,
                    help="also score on held-out seeds 0..W-1 (W > --seeds): how much the flips of 256 seeds decide")
    ap.add_argument("--iters", type=int, default=30, help="L-BFGS iterations of the joint refinement (0: none)")
    ap.add_argument("--trim", action="store_true",
                    help="fit only on the calibration noises iPNDM does not flip (final MSE vs the teacher <= 0.02)")
    ap.add_argument("--out", default="", help="default results/iia_joint.csv (results/iia_joint_trim.csv with --trim)")
    args = ap.parse_args()
    args.out = args.out or f"results/iia_joint{'_trim' if args.trim else ''}.csv"
    torch.set_num_threads(1)
    cfg = load_config(None, [("model.kind", "gmm-mnist")])  # as benchmarks/iia_targets.py
    ref_p = api.prepare(cfg, "edm", 999)
    model, fp = ref_p.model, ref_p.fingerprint
    held = list(range(max(args.seeds, args.wide)))
    cache = Path(f"results/cache/iia_targets_reference_{fp[:12]}_{len(held)}.pt")  # shared with iia_targets.py
    if cache.is_file():
        reference = torch.load(cache)
    else:
        reference = torch.cat([x for _, x in sample_batches(model, ref_p.method, ref_p.sigmas, held, 128, None,
                                                            ref_p.device, ref_p.state_dtype)])
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(reference, cache)
    cal = list(range(cfg.calibration.seed_start, cfg.calibration.seed_start + args.samples))
    teacher = Teacher(cfg.calibration.teacher, cfg.calibration.teacher_substeps)
    rows = []
    for nfe in [int(v) for v in args.nfe.split(",")]:
        sig = api.prepare(cfg, "ipndm", nfe, model=model, fingerprint=fp).sigmas.to(torch.float64)
        xc = make_noise(cal, model.shape, torch.device("cpu"))[0].to(torch.float64) * float(sig[0])
        xh = make_noise(held, model.shape, torch.device("cpu"))[0].to(torch.float64) * float(sig[0])
        states, _ = teacher_trajectory(teacher, model, sig, [cal], [xc], [None])
        targets = [s[0] for s in states]
        with torch.no_grad():
            zero = [torch.zeros(0, dtype=torch.float64)] * (len(sig) - 1)
            base_c = ipndm_iia(model, sig, xc, "diff", zero)[0]  # no quantities used: plain iPNDM
            base_h = scores(ipndm_iia(model, sig, xh, "diff", zero)[0], reference, args.seeds)
        e0 = float((base_c - targets[-1]).pow(2).mean().sqrt())
        keep = (base_c - targets[-1]).flatten(1).pow(2).mean(1) <= FLIP  # the calibration noises iPNDM does not flip
        if not args.trim:
            keep[:] = True
        fit_x, fit_t = xc[keep], [t[keep] for t in targets]
        rows.append(dict(nfe=nfe, basis="", fit="ipndm", cal_rmse=e0, cal_ratio=1.0, **base_h, ratio=1.0, seconds=0.0))
        print(f"NFE {nfe} ipndm: held-out {base_h['rmse']:.4f} ({base_h['flips']} flips, rest {base_h['rest']:.4f}; "
              f"the flips alone: {base_h['flip_floor']:.4f} = {base_h['flip_floor'] / base_h['rmse']:.3f}x); "
              f"calibration {e0:.4f}" + (f"; seeds 0-{args.wide - 1}: {base_h['wide_rmse']:.4f} "
                                         f"({base_h['wide_flips']} flips)" if args.wide else ""), flush=True)
        for basis in args.bases.split(","):
            t0 = time.perf_counter()
            with torch.no_grad():
                _, greedy = ipndm_iia(model, sig, fit_x, basis, targets=fit_t)
            fits = [("trajectory", greedy, time.perf_counter() - t0)]
            if args.iters:
                t0 = time.perf_counter()
                fits.append(("trajectory+final", refine(model, sig, fit_x, basis, greedy, fit_t[-1], args.iters),
                             time.perf_counter() - t0))
            for name, coeffs, seconds in fits:
                with torch.no_grad():
                    ec = float((ipndm_iia(model, sig, xc, basis, coeffs)[0] - targets[-1]).pow(2).mean().sqrt())
                    h = scores(ipndm_iia(model, sig, xh, basis, coeffs)[0], reference, args.seeds)
                rows.append(dict(nfe=nfe, basis=basis, fit=name + ("-trim" if args.trim else ""), cal_rmse=ec,
                                 cal_ratio=ec / e0, **h,
                                 ratio=h["rmse"] / base_h["rmse"], seconds=seconds,
                                 **({"wide_ratio": h["wide_rmse"] / base_h["wide_rmse"]} if args.wide else {})))
                print(f"NFE {nfe} {basis:>4s} {name:>16s}: calibration {ec / e0:.3f}x, held-out {h['rmse']:.4f} "
                      f"({h['rmse'] / base_h['rmse']:.3f}x; {h['flips']} flips, rest {h['rest']:.4f})"
                      + (f"; seeds 0-{args.wide - 1}: {h['wide_rmse'] / base_h['wide_rmse']:.3f}x "
                         f"({h['wide_flips']} flips vs {base_h['wide_flips']})" if args.wide else "")
                      + f" {seconds:.0f} s",
                      flush=True)
        df = pd.DataFrame(rows).assign(B=args.samples, seeds=f"0-{args.seeds - 1}", wide=args.wide, teacher=teacher.tag,
                                       iters=args.iters)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
