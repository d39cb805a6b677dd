"""CLI commands ``evaluate`` and ``report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from iia_cli.io import layout
from iia_cli.io.paths import PLOT_SUFFIXES, OutputPlan
from iia_cli.metrics.registry import METRICS
from iia_cli.tables.results import COLUMNS

from .common import CONFIG_HELP, command_config, handle_errors, key_help, set_option

NFE_HELP = key_help("evaluate.nfe", "One NFE or a comma-separated list")


def plan_evaluate_outputs(plan: OutputPlan, cfg: object, csv: str | Path | None, shard: bool, fid: bool) -> None:
    """Everything ``iia evaluate`` writes: the results CSV (or, with --shard, the shard directory), the
    coefficient directory, and the cache of reference statistics and FID checkpoints."""
    ev, name = cfg.evaluate, cfg.experiment  # type: ignore[attr-defined]
    if shard:
        plan.directory(layout.shard_dir(name), "shard directory")
    else:
        label = "--csv" if csv is not None else "evaluate.csv" if ev.csv else "results CSV"
        plan.csv(csv or ev.csv or layout.results_csv(name), label, columns=COLUMNS)
    plan.directory(cfg.calibration.out_dir, "calibration.out_dir", "coefficient directory")  # type: ignore[attr-defined]
    if fid:
        plan.directory(layout.partial_dir(), "FID checkpoint directory", clean_depth=0)


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
        nfe: Optional[str] = typer.Option(None, "--nfe", help=NFE_HELP),
        methods: Optional[str] = typer.Option(None, "--methods", help=key_help("evaluate.methods", "Comma-separated methods")),
        samples: Optional[int] = typer.Option(None, "--samples", "-n", help=key_help("evaluate.samples", "Images per seed range")),
        seed_ranges: Optional[str] = typer.Option(None, "--seed-ranges", help="e.g. '0-49999;50000-99999' (one row each)."),
        csv: Optional[Path] = typer.Option(None, "--csv", help="Results CSV (default results/<experiment>.csv)."),
        inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="FID Inception weights file."),
        no_fid: bool = typer.Option(False, "--no-fid", help="Integration error only, no FID (= --metrics integration_rmse)."),
        metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metrics to compute: "
                                              + "; ".join(f"{k} ({v.help})" for k, v in METRICS.items())
                                              + " (overrides evaluate.metrics; default: integration_rmse, kid, fid "
                                              "and, with CLIP weights, clip_score)."),
        fresh: bool = typer.Option(False, "--fresh", help="Recompute results already in the CSV (default: skip them, resume)."),
        shard: Optional[str] = typer.Option(None, "--shard", help="i/n: this SLURM array task's share; combine with iia merge."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Network dtype: float32, float16 or bfloat16."),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the denoiser call."),
        batch: Optional[str] = typer.Option(None, "--batch", help=key_help("sampler.batch")),
        sets: Optional[list[str]] = set_option(),
    ) -> None:
        """Calibrate (when needed), sample and score every (method, NFE): FID per seed range and the
        integration error against a high-NFE reference; rows append to a tidy CSV."""
        from iia_cli.experiments.evaluate import evaluate as run_evaluate, print_table
        from iia_cli.runtime.schema import parse_int_list

        with handle_errors(), OutputPlan() as plan:
            cfg = command_config(config, sets, {"sampler.dtype": dtype, "sampler.compile": compile or None,
                                         "sampler.batch": batch}, shard)
            from .inputs import check_inputs

            check_inputs(cfg, fid=not no_fid)  # every missing checkpoint / reference file in one error
            plan_evaluate_outputs(plan, cfg, csv, shard=bool(shard), fid=not no_fid)
            nfes = parse_int_list(nfe, "--nfe") if nfe is not None else None
            meths = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
            if meths:
                from iia_cli.core.methods import canonical_method

                meths = [canonical_method(m) for m in meths]
            from iia_cli.runtime import dist

            res = run_evaluate(cfg, nfes, meths, samples, seed_ranges, csv, inception_weights, fid=not no_fid,
                               fresh=fresh, metrics=metrics)
            if dist.context().is_main and not dist.context().shard:
                print_table(res.csv, cfg.experiment, identities=res.identities)  # this run's rows only
                if res.rows:
                    typer.echo(f"results appended to {res.csv} ({len(res.rows)} rows)")

    @app.command()
    def merge(
        shard_dir: Path = typer.Argument(..., help="results/shards/<experiment> written by evaluate --shard i/n."),
        csv: Path = typer.Option(..., "--csv", help="Results CSV to append the merged rows to."),
    ) -> None:
        """Combine the shard files of SLURM array tasks into result rows (exact: float64 sums merge)."""
        from iia_cli.experiments.evaluate import merge_shards, print_table

        with handle_errors(), OutputPlan() as plan:
            plan.csv(csv, "--csv", columns=COLUMNS)
            res = merge_shards(shard_dir, csv)
            print_table(res.csv, only_rows=res.rows or None)
            typer.echo(f"results appended to {res.csv} ({len(res.rows)} rows)")

    @app.command()
    def report(
        csv: Path = typer.Argument(..., help="A results CSV written by iia evaluate."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Draw value-vs-NFE curves into this PNG, one panel "
                                            "per metric."),
        experiment: Optional[str] = typer.Option(None, "--experiment", help="Only rows of this experiment."),
        metric: Optional[str] = typer.Option(None, "--metric", help="Plot only these metrics (comma-separated: "
                                             + ", ".join(METRICS) + "; default: every metric in the CSV)."),
        compare: Optional[tuple[str, str]] = typer.Option(None, "--compare", metavar="A B", help="Two method labels "
                                                          "as in the table (e.g. --compare iia-ddim ddim): print "
                                                          "their paired comparison across NFEs and metrics."),
    ) -> None:
        """Print the methods x NFE tables of a results CSV again, one per metric (latest row per identity; IIA
        rows with their ratio to the base solver, the best method per NFE marked; a note where one method, NFE
        and metric has rows of different settings), and optionally plot them."""
        from iia_cli.experiments.evaluate import print_comparison, print_table
        from iia_cli.metrics.registry import parse_metrics
        from iia_cli.tables.results import plot_results, read_results

        with handle_errors(), OutputPlan() as plan:
            metrics = parse_metrics(metric, "--metric") if metric is not None else None
            plan.file(plot, "--plot", "plot image", suffixes=PLOT_SUFFIXES)
            if compare and any(compare):
                print_comparison(csv, compare[0], compare[1], experiment)
            else:
                print_table(csv, experiment)
            if plot:
                df = read_results(csv)
                if experiment:
                    df = df[df["experiment"] == experiment]
                typer.echo(f"wrote {plot_results(df, plot, metrics)}")
