"""Speed benchmark: sampler overhead, IIA vs base sampling time, calibration time vs its denoiser calls.

A model of realistic cost: a randomly initialised diffusers UNet2DModel (3x32x32, about 9M parameters)
behind our discrete-time adapter, float32 network, float64 solver state on the CPU (float32 on a GPU).

* overhead = sampling wall time / time spent inside the NFE denoiser calls of the same run (= wall time /
  (NFE x one call), with the call timed in the same run so that machine noise cancels); target <= 1.05
* IIA / base = median over interleaved runs of the IIA variant's wall time / the base solver's, and the
  same ratio normalised by the time inside the denoiser; target within 2%
* calibration = wall time / time inside its denoiser calls, calls = B x (NFE + fine NFE) at its minimum

    python benchmarks/speed.py [--device cuda] [--batch 16] [--nfe 10]

Measure ratios in one run: machines are shared and noisy; each timing is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from iia_cli.calibration.iia import CalibrationSetup, greedy_pass
from iia_cli.config.experiment import GridConfig
from iia_cli.core.grids import make_grid
from iia_cli.core.methods import METHODS, make_method
from iia_cli.core.sampling import BoundDenoiser, make_noise, sample_batches
from iia_cli.core.solvers.registry import BASE_SOLVER_NAMES



def solver_families() -> list[tuple[str, list[str]]]:
    """Every base solver with the IIA methods built on it, from the registries: a solver or IIA method added
    there is timed too."""
    return [(base, [name for name, spec in METHODS.items() if spec.is_iia and spec.base == base])
            for base in BASE_SOLVER_NAMES]


def build_model(device: str, dtype: str):
    from diffusers import UNet2DModel

    from iia_cli.models.diffusers_unet import load_diffusers_unet

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    tmp = Path(tempfile.mkdtemp()) / "unet"
    unet.save_pretrained(tmp)
    return load_diffusers_unet(tmp, dtype=dtype, device=device)


class TimedModel:
    """Forwards to the model and adds up the wall time spent inside its calls."""

    def __init__(self, model):
        self._model, self.inside = model, 0.0

    def __call__(self, *args):
        sync()
        t0 = time.perf_counter()
        out = self._model(*args)
        sync()
        self.inside += time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_timed(model: TimedModel, fn) -> tuple[float, float]:
    """(wall seconds, seconds inside the denoiser) of fn()."""
    model.inside = 0.0
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0, model.inside


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--out", default="results/speed.csv")
    args = ap.parse_args()
    device = torch.device(args.device)
    state_dtype = torch.float64 if device.type == "cpu" else torch.float32
    model = TimedModel(build_model(args.device, args.dtype))
    seeds = list(range(args.batch))
    x = make_noise(seeds, model.shape, device)[0].to(state_dtype) * 80
    den = BoundDenoiser(model)
    den(x, 1.0)  # warm-up
    t_call = timed(lambda: den(x, 1.0), 5 * args.repeats)
    print(f"one denoiser call, batch {args.batch}: {t_call * 1e3:.1f} ms on {device}", flush=True)
    rows = []
    for base, iias in solver_families():
        bm = make_method(base)
        try:
            sig = make_grid(GridConfig(kind="discrete"), bm.solver.plan(args.nfe), model)
        except Exception:
            sig = make_grid(GridConfig(kind="karras"), bm.solver.plan(args.nfe), model)
        nfe = bm.solver.nfe_of_grid(sig)

        def run(method, coeffs=None):
            return [x for _, x in sample_batches(model, method, sig, seeds, args.batch, coeffs, device, state_dtype)]

        fitted = []  # (IIA method, its calibration pass, calibration wall seconds, seconds inside the network)
        for iia in iias:
            im = make_method(iia)
            model.inside = 0.0
            t0 = time.perf_counter()
            fit = greedy_pass(CalibrationSetup(im, model, sig, 10, args.batch, device, state_dtype),
                              list(range(10**9, 10**9 + args.calib_samples)))
            fitted.append((im, fit, time.perf_counter() - t0, model.inside))
        base_runs, iia_runs = [], [[] for _ in fitted]
        for _ in range(args.repeats):  # interleaved: base, each IIA method, base, ...
            base_runs.append(run_timed(model, lambda: run(bm)))
            for runs, (im, fit, _, _) in zip(iia_runs, fitted):
                runs.append(run_timed(model, lambda: run(im, fit.coeffs)))
        wall = statistics.median(w for w, _ in base_runs)
        over = statistics.median(w / i for w, i in base_runs)
        rows.append(dict(method=base, nfe=nfe, call_ms=t_call * 1e3, sample_s=wall, overhead=over))
        print(f"{base:>26s} nfe={nfe}: {wall:.3f} s, overhead {over:.3f}", flush=True)
        for runs, (im, fit, t_cal, t_cal_inside) in zip(iia_runs, fitted):
            ratios = [wi / wb for (wb, _), (wi, _) in zip(base_runs, runs)]
            norm = [(wi / ii) / (wb / ib) for (wb, ib), (wi, ii) in zip(base_runs, runs)]
            rows.append(dict(method=im.name, nfe=nfe, call_ms=t_call * 1e3,
                             sample_s=statistics.median(w for w, _ in runs),
                             overhead=statistics.median(w / i for w, i in runs),
                             iia_vs_base=statistics.median(ratios), iia_vs_base_normalised=statistics.median(norm),
                             calib_s=t_cal, calib_calls=fit.calls * args.calib_samples,
                             calib_vs_min=t_cal / t_cal_inside))
            r = rows[-1]
            print(f"{im.name:>26s} nfe={nfe}: {r['sample_s']:.3f} s, overhead {r['overhead']:.3f}, IIA/base "
                  f"{r['iia_vs_base']:.3f} (normalised {r['iia_vs_base_normalised']:.3f}), calibration {t_cal:.1f} s "
                  f"= {r['calib_vs_min']:.3f} x the time inside its {r['calib_calls']} denoiser calls", flush=True)
    df = pd.DataFrame(rows)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    df["machine"] = f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads {gpu}".strip()
    df["batch"] = args.batch
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    cols = ["method", "nfe", "sample_s", "overhead", "iia_vs_base", "iia_vs_base_normalised", "calib_vs_min"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for _, r in df.iterrows():
        cells = [str(r[c]) if c in ("method", "nfe") else ("" if pd.isna(r.get(c)) else f"{r[c]:.3f}") for c in cols]
        print("| " + " | ".join(cells) + " |")
    print(f"\nmachine: {df['machine'][0]}, batch {args.batch}, one call {t_call * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
