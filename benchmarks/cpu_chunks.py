"""Throughput on the CPU by samples per network call, and whether the outputs depend on it.

The FID Inception (torch-fidelity's, at 299 x 299) and the testbed UNet run faster on a CPU in small calls: a large
call's activations (125 images: 64 x 147 x 147 floats per image after the Inception stem's second convolution) spill
out of the caches. So ``FeatureExtractor`` feeds the Inception at most ``features.CPU_CHUNK`` images per call and the
diffusers adapter its UNet at most ``diffusers_unet.CPU_CHUNK`` samples, whatever batch they are handed. This
measures, for each call size, images (or denoiser calls) per second, interleaved over repeats so that machine noise
hits every size alike, and the largest difference of the outputs from those of the largest call: the chunk sizes
are fast sizes whose outputs equal the largest call's bit for bit here.

It also compares, at the chunk sizes, the two other CPU choices: the Inception with its batch norms folded into
the convolutions or not (``--fold``), and the UNet in channels_last or the default layout (``--layouts``).

    python benchmarks/cpu_chunks.py [--inception 125,32,16,8,4,2] [--unet 128,64,32,16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from iia_cli.metrics.fid import features
from iia_cli.metrics.fid.sources import iter_image_batches
from iia_cli.metrics.fid.weights import resolve_inception_weights
from iia_cli.models import diffusers_unet


def measure(run: Callable[[Any], torch.Tensor], sizes: list[Any], n: int, repeats: int
            ) -> list[tuple[Any, float, float]]:
    """(size, items per second (median over repeats), max relative difference from the first size's output)."""
    rates: dict[Any, list[float]] = {s: [] for s in sizes}
    outputs: dict[Any, torch.Tensor] = {}
    for _ in range(repeats):
        for size in sizes:
            run(size)  # warm the kernels for this shape (the timed run ends with a smaller call when size ∤ n)
            start = time.perf_counter()
            outputs[size] = run(size)
            rates[size].append(n / (time.perf_counter() - start))
    largest = outputs[sizes[0]]
    scale = largest.abs().max()
    return [(s, statistics.median(rates[s]), ((outputs[s] - largest).abs().max() / scale).item()) for s in sizes]


def table(title: str, unit: str, rows: list[tuple[Any, float, float]], chunk: Any, repeats: int,
          column: str = "per call") -> None:
    top = rows[0][1]
    print(f"\n{title}\n\n| {column} | {unit} (median of {repeats}) | x {rows[0][0]} | max rel. difference |")
    print("|---|---|---|---|")
    for size, rate, diff in rows:
        print(f"| {size}{' (used)' if size == chunk else ''} | {rate:.1f} | x{rate / top:.2f} | {diff:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inception", default="125,32,16,8,4,2", help="images per Inception call, comma-separated")
    ap.add_argument("--images", type=int, default=200, help="images of builtin:mnist-heldout32 per timing")
    ap.add_argument("--unet", default="128,64,32,16", help="samples per testbed UNet call, comma-separated")
    ap.add_argument("--samples", type=int, default=256, help="float64 states per UNet timing (the solvers' dtype)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-choices", action="store_true", help="skip the fold and layout comparisons")
    args = ap.parse_args()
    torch.manual_seed(0)

    inc_sizes = sorted((int(s) for s in args.inception.split(",") if s), reverse=True)
    if inc_sizes:
        images = next(iter(iter_image_batches("builtin:mnist-heldout32", args.images)))  # uint8 [N, 32, 32, 1]
        extractor = features.FeatureExtractor(resolve_inception_weights()[0], device="cpu", batch_size=len(images))

        def inception(size: int) -> torch.Tensor:
            extractor.chunk = size
            return extractor(images)

        rows = measure(inception, inc_sizes, len(images), args.repeats)
        table(f"FID Inception, {len(images)} images of builtin:mnist-heldout32", "images/s", rows,
              features.CPU_CHUNK, args.repeats)
        if not args.no_choices:
            fold = features.fold_batch_norms
            features.fold_batch_norms = lambda net: 0  # type: ignore[assignment]
            try:
                unfolded = features.FeatureExtractor(resolve_inception_weights()[0], device="cpu",
                                                     batch_size=len(images))
            finally:
                features.fold_batch_norms = fold
            nets = {"batch norms kept": unfolded, "folded": extractor}
            extractor.chunk = unfolded.chunk = features.CPU_CHUNK
            rows = measure(lambda name: nets[name](images), list(nets), len(images), args.repeats)
            table(f"FID Inception, {features.CPU_CHUNK} images per call", "images/s", rows, "folded", args.repeats,
                  "network")

    unet_sizes = sorted((int(s) for s in args.unet.split(",") if s), reverse=True)
    if unet_sizes:
        model = diffusers_unet.load_diffusers_unet("builtin:mnist-ddpm")
        x = torch.randn(args.samples, *model.shape, dtype=torch.float64) * 5
        sigma = torch.full((args.samples,), 5.0, dtype=torch.float64)
        used = model.chunk

        def unet(size: int) -> torch.Tensor:
            model.chunk = size
            with torch.no_grad():
                return model(x, sigma)

        rows = measure(unet, unet_sizes, args.samples, args.repeats)
        model.chunk = used
        table(f"testbed UNet (builtin:mnist-ddpm), {args.samples} float64 states at sigma 5", "denoiser calls/s",
              rows, used, args.repeats)
        if not args.no_choices:
            layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
            used_layout = model._layout

            def layout(name: str) -> torch.Tensor:
                model._layout = layouts[name]
                model.unet.to(memory_format=layouts[name])
                with torch.no_grad():
                    return model(x, sigma)

            try:
                rows = measure(layout, list(layouts), args.samples, args.repeats)
            finally:
                model._layout = used_layout
                model.unet.to(memory_format=used_layout)
            table(f"testbed UNet, {used} samples per call", "denoiser calls/s", rows,
                  str(used_layout).removeprefix("torch."), args.repeats, "layout")

    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {platform.node()} {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
