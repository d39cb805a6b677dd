"""Per-seed squared errors for the interval coverage study (tests/test_coverage.py, report in the commit log).

For a model config, sample seeds ``start .. start+n-1`` with each base method at each NFE and a reference solve of
the same noises, and save per-seed sums of squared error and element counts as ``.npz`` files:

  python scripts/coverage_data.py --config configs/mnist-gmm.yaml --n 5120 --ref-nfe 199 --out /tmp/cov
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from iia_cli.api import prepare
from iia_cli.config.experiment import load_config
from iia_cli.core.sampling import sample_batches


def final_states(p, seeds, batch):
    parts = [x.to(torch.float64).cpu() for _, x in sample_batches(p.model, p.method, p.sigmas, seeds, batch,
                                                                  device=p.device, state_dtype=torch.float64)]
    return torch.cat(parts)


def per_seed_sq(cfg, methods, nfes, seeds, ref, batch, exact=False):
    """{(method, nfe): (sq [n], count [n])}; ``ref``: (method, nfe) of the reference solve, or exact=True for the
    Gaussian model's closed-form solution."""
    base = prepare(cfg, methods[0], nfes[0])
    model = base.model
    if exact:
        from iia_cli.core.sampling import make_noise
        noise, _ = make_noise(seeds, model.shape, base.device)
        s0 = float(base.sigmas[0])
        target = model.exact_solution(noise.to(torch.float64) * s0, s0, float(base.sigmas[-1]))
    else:
        r = prepare(cfg, ref[0], ref[1], model=model, fingerprint=base.fingerprint)
        target = final_states(r, seeds, batch)
    out = {}
    for m in methods:
        for nfe in nfes:
            p = prepare(cfg, m, nfe, model=model, fingerprint=base.fingerprint)
            if exact:
                # the exact solution to the method's own last grid point
                s0 = float(p.sigmas[0])
                noise, _ = make_noise(seeds, model.shape, p.device)
                target = model.exact_solution(noise.to(torch.float64) * s0, s0, float(p.sigmas[-1]))
            d = (final_states(p, seeds, batch) - target).flatten(1)
            out[(m, p.nfe)] = (d.pow(2).sum(1).numpy(), np.full(len(seeds), d.shape[1], dtype=np.float64))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--methods", default="ddim,edm,dpm-solver++-2m")
    ap.add_argument("--nfe", default="6,10")
    ap.add_argument("--n", type=int, default=5120)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--ref-method", default="edm")
    ap.add_argument("--ref-nfe", type=int, default=199)
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from iia_cli.config.experiment import parse_set
    cfg = load_config(a.config, parse_set(a.set) if a.set else None)
    t = time.time()
    res = per_seed_sq(cfg, a.methods.split(","), [int(x) for x in a.nfe.split(",")],
                      list(range(a.start, a.start + a.n)), (a.ref_method, a.ref_nfe), a.batch, a.exact)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for (m, nfe), (sq, cnt) in res.items():
        np.savez(Path(a.out) / f"{cfg.model.kind}_{m}_{nfe}.npz", sq=sq, count=cnt)
    print(f"{time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
