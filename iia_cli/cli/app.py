"""The ``iia`` command line: a thin Typer layer over the library. The only module that exits.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from iia_cli.core.methods import ALIASES_TEXT, METHOD_NAMES, methods_help
from iia_cli.io.paths import OutputPlan
from iia_cli.runtime.errors import ConfigError, IIARuntimeError

from .common import CONFIG_HELP, OneLineErrorGroup, command_config, handle_errors, key_help, set_option
from .inputs import check_inputs

app = typer.Typer(
    name="iia",
    help="Fast diffusion sampling with IIA (Improved Integration Approximation): calibrate, sample, evaluate.\n\n"
    "Security: EDM pickles (model.kind=edm-pkl) run the Python source stored in them only when it is one of "
    "NVlabs/edm's own files (checked by sha256); set model.trust_code: true to run other embedded source, for "
    "pickles you trust only. model.kind=python runs the factory you name. Weights, statistics, coefficient "
    "files and CSVs are read as data, never executed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags read as flags (no `<bool>`), no boxes
    cls=OneLineErrorGroup,  # usage errors are one line `error: ...`, exit 2
)

METHOD_HELP = f"Sampling method: {', '.join(METHOD_NAMES)} (aliases {ALIASES_TEXT})."
METHODS_EPILOG = "\b\nMethods:\n" + methods_help()
DEVICE_HELP = "Device: auto, cpu, cuda or cuda:N"
DTYPE_HELP = "Network dtype: float32, float16 or bfloat16 (solver state stays float32/float64)."


def version_text() -> str:
    """``iia <version>``, with the git revision of the tool's checkout (``-dirty`` with uncommitted changes) when
    the package runs from one; the same revision the results CSV records in ``git_revision``."""
    from iia_cli import __version__
    from iia_cli.tables.results import git_revision

    rev = git_revision()
    return f"iia {__version__}" + (f" (git {rev})" if rev != "unknown" else "")


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version (and the git revision of a checkout) and exit.")) -> None:
    pass


SHARD_HELP = "Take every n-th seed (i/n, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); combine with iia merge."


def _calibrate_command(config: Optional[Path], method: str, nfe: Optional[int], sets: Optional[list[str]],
                       **options: Any) -> str:
    """The `iia calibrate` command that matches what the user typed for `iia sample`."""
    import shlex

    parts = ["iia", "calibrate"]
    if config is not None:
        parts += ["--config", str(config)]
    parts += ["--method", method] + (["--nfe", str(nfe)] if nfe is not None else [])
    for name, value in options.items():
        if value is not None:
            parts += [f"--{name}", str(value)]
    for item in sets or []:  # what shapes the coefficients; not where samples go
        if not item.split("=", 1)[0].strip().startswith(("output.", "sampler.seeds", "sampler.batch", "sampler.coeffs")):
            parts += ["--set", item]
    return " ".join(shlex.quote(p) for p in parts)


@app.command(epilog=METHODS_EPILOG)
def sample(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=key_help("sampler.method", METHOD_HELP)),
    nfe: Optional[int] = typer.Option(None, "--nfe", help=key_help("sampler.nfe", "Denoiser calls per image.")),
    seeds: Optional[str] = typer.Option(None, "--seeds", help=key_help("sampler.seeds")),
    batch: Optional[str] = typer.Option(None, "--batch", help=key_help("sampler.batch")),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="A directory for PNGs ({seed:06d}.png) or a .npz file."),
    grid_png: Optional[Path] = typer.Option(None, "--grid-png", help="Save a grid of up to 64 samples for a quick look."),
    coeffs: Optional[Path] = typer.Option(None, "--coeffs", help="IIA coefficient file (default: found by model, method, grid, NFE)."),
    calibrate_missing: bool = typer.Option(False, "--calibrate", help="Calibrate IIA coefficients on the fly when none match."),
    class_label: Optional[int] = typer.Option(None, "--class", help="Fixed class label for class-conditional models."),
    device: Optional[str] = typer.Option(None, "--device", help=key_help("sampler.device", DEVICE_HELP)),
    shard: Optional[str] = typer.Option(None, "--shard", help=SHARD_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser call."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Channels-last memory format for the network."),
    sets: Optional[list[str]] = set_option(),
) -> None:
    """Sample images with a base solver or an IIA solver (resumes an interrupted run)."""
    from iia_cli import api

    with handle_errors(), OutputPlan() as plan:
        cfg = command_config(config, sets, {"sampler.method": method, "sampler.nfe": nfe, "sampler.seeds": seeds,
                                     "sampler.batch": batch, "sampler.class_label": class_label,
                                     "sampler.device": device, "sampler.dtype": dtype,
                                     "sampler.compile": compile or None, "sampler.channels_last": channels_last or None},
                      shard)
        if out is None and cfg.output.path is None and grid_png is None and cfg.output.grid_png is None:
            raise_usage("nothing to write: give --out DIR|FILE.npz and/or --grid-png PATH")
        target = out if out is not None else cfg.output.path
        label = "--out" if out is not None else "output.path"
        if target is not None and Path(target).suffix == ".npz":
            plan.file(target, label, ".npz file")
        else:
            plan.directory(target, label, "PNG directory", clean_depth=1)
        plan.file(grid_png if grid_png is not None else cfg.output.grid_png,
                  "--grid-png" if grid_png is not None else "output.grid_png", "grid image", suffixes=(".png",))
        if calibrate_missing:
            plan.directory(cfg.calibration.out_dir, "calibration.out_dir", "coefficient directory")
        try:
            check_inputs(cfg)
            res = api.sample(cfg, out=out, grid_png=grid_png, coeffs=coeffs, calibrate_missing=calibrate_missing)
        except api.MissingCoefficientsError as exc:
            cl = None if class_label is None else f"sampler.class_label={class_label}"
            raise IIARuntimeError(exc.with_command(_calibrate_command(
                config, exc.method, nfe, [*([cl] if cl else []), *(sets or [])], device=device, dtype=dtype))) from None
        typer.echo(f"{res.method} nfe={res.nfe}" + (f" ({res.note})" if res.note else "")
                   + f": {len(res.seeds)} images in {res.seconds:.2f} s"
                   + (f" -> {res.out}" if res.out else ""))


@app.command(epilog=METHODS_EPILOG)
def calibrate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=key_help("sampler.method", METHOD_HELP)),
    nfe: Optional[int] = typer.Option(None, "--nfe", help=key_help("sampler.nfe", "Denoiser calls per image of "
                                                                   "the calibrated sampler.")),
    samples: Optional[int] = typer.Option(None, "--samples", "-B", help=key_help("calibration.samples")),
    substeps: Optional[int] = typer.Option(None, "--substeps", "-M", help=key_help("calibration.substeps")),
    target: Optional[str] = typer.Option(None, "--target", help=key_help(
        "calibration.target", "Calibration target: local (the paper's M fine sub-steps from the coarse state) or "
        "trajectory (the teacher's state on its trajectory from the same noise)")),
    teacher: Optional[str] = typer.Option(None, "--teacher", help=key_help("calibration.teacher")),
    teacher_substeps: Optional[int] = typer.Option(None, "--teacher-substeps",
                                                   help=key_help("calibration.teacher_substeps")),
    guard: Optional[bool] = typer.Option(None, "--guard/--no-guard", help=key_help(
        "calibration.guard", "Shrink all corrections by one factor in [0, 1] chosen by the final error against the "
        "teacher on the calibration noises (the worst of 4 folds), so IIA is never worse than its base there")),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Coefficient file (default: a name from model, "
                                       "method, grid and NFE in calibration.out_dir)."),
    device: Optional[str] = typer.Option(None, "--device", help=key_help("sampler.device", DEVICE_HELP)),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    sets: Optional[list[str]] = set_option(),
) -> None:
    """Fit IIA coefficients by least squares, one greedy pass against the target (local fine reference or the
    teacher's trajectory), apply the guard, and report the final-sample error of base and IIA against the
    teacher on held-out noises (a plain warning when IIA is worse)."""
    from iia_cli import api

    with handle_errors(), OutputPlan() as plan:
        cfg = command_config(config, sets, {"sampler.method": method, "sampler.nfe": nfe, "calibration.samples": samples,
                                     "calibration.substeps": substeps, "sampler.device": device,
                                     "sampler.dtype": dtype, "calibration.target": target,
                                     "calibration.teacher": teacher, "calibration.teacher_substeps": teacher_substeps,
                                     "calibration.guard": guard})
        if out is not None:
            plan.file(out, "--out", "coefficient file")
        else:
            plan.directory(cfg.calibration.out_dir, "calibration.out_dir", "coefficient directory")
        check_inputs(cfg)
        _, path = api.calibrate(cfg, out=out, log=_log_except_wrote)
        typer.echo(str(path))  # the path once, on stdout


@app.command("config")
def config_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    sets: Optional[list[str]] = set_option(),
    show: bool = typer.Option(True, "--show/--schema", help="--show (default): the effective config as YAML; "
                              "--schema: every key with its type, default and description."),
) -> None:
    """Print the effective config (the file with the --set overrides, every default filled in) as YAML that
    loads back to the same config, or the schema: every key with its type, default and description."""
    import yaml

    from iia_cli.config.experiment import describe_schema

    with handle_errors():
        if not show:
            typer.echo("\n".join(describe_schema()))
            return
        cfg = command_config(config, sets, {})
        typer.echo(yaml.safe_dump(cfg.effective(), sort_keys=False), nl=False)


def _log_except_wrote(msg: str) -> None:
    """The library's log without its closing `wrote <path>` line, which the command prints on stdout."""
    from iia_cli.runtime.progress import log

    if not msg.startswith("wrote "):
        log(msg)


def raise_usage(msg: str) -> None:
    raise ConfigError(msg)


# their commands register on ``app``, defined above
from . import evaluate as cli_evaluate, fid as cli_fid, grid as cli_grid  # noqa: E402

cli_fid.register(app)
cli_evaluate.register(app)
cli_grid.register(app)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (scancel, preemption) ends like Ctrl-C: atomic files only, exit 130


def main() -> None:
    import signal

    from iia_cli.runtime import dist

    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    finally:
        dist.teardown()


if __name__ == "__main__":
    main()
