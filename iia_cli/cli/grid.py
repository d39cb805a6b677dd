"""CLI command ``grid``: search a sampler's time grid and write it as a grid file (``iia_cli.experiments.gits``: GITS's
dynamic programming; ``iia_cli.experiments.ld3``: an LD3-style grid learned by gradient through the solver)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from iia_cli.experiments.gits import DEFAULT_CANDIDATES, DEFAULT_NOISES, DEFAULT_TEACHER_SUBSTEPS
from iia_cli.experiments.ld3 import (DEFAULT_BATCH, DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_SLACK,
                                     DEFAULT_TEACHER_STEPS, DEFAULT_TEACHER_SUBSTEPS as LD3_TEACHER_SUBSTEPS,
                                     DEFAULT_VAL_NOISES)
from iia_cli.io.paths import OutputPlan
from iia_cli.runtime.errors import ConfigError

from .common import CONFIG_HELP, command_config, handle_errors, key_help, set_option

SEARCH_KINDS = ("gits", "learned")


def register(app: typer.Typer) -> None:
    @app.command()
    def grid(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
        method: Optional[str] = typer.Option(None, "--method", "-m", help=key_help("sampler.method", "The method the grid is for "
                                                                        "(it serves its base solver and that solver's "
                                                                        "IIA methods)")),
        nfe: Optional[int] = typer.Option(None, "--nfe", help=key_help("sampler.nfe", "Denoiser calls per image")),
        search: str = typer.Option("gits", "--search", help=f"Search kind: {', '.join(SEARCH_KINDS)} (gits: Chen "
                                   "et al. 2024, dynamic programming over teacher trajectories; learned: LD3, Tong "
                                   "et al. 2025, the sigmas learned by Adam through the solver)."),
        out: Path = typer.Option(..., "--out", "-o", help="The grid file to write (.json); use it with "
                                 "--set grid.kind=file --set grid.path=FILE.", show_default=False),
        candidates: int = typer.Option(DEFAULT_CANDIDATES, "--candidates", min=3, help="gits: candidate sigmas "
                                       "(Karras rho 7 over grid.sigma_min..grid.sigma_max)."),
        coeff: float = typer.Option(1.0, "--coeff", help="gits: the path's s-th step costs coeff^s times its local "
                                    "error (GITS's own runs use 1.15; 1 weighs every step alike)."),
        noises: int = typer.Option(DEFAULT_NOISES, "--noises", min=1, help="Teacher trajectories (gits) or training "
                                   "noises (learned); seeds from 3e9."),
        teacher_substeps: Optional[int] = typer.Option(None, "--teacher-substeps", min=1, help="Teacher Heun steps "
                                                       f"per interval, uniform in log sigma (unless given: gits "
                                                       f"{DEFAULT_TEACHER_SUBSTEPS}, learned {LD3_TEACHER_SUBSTEPS})."),
        batch: Optional[int] = typer.Option(None, "--batch", min=1, help="gits: noises per model call (default "
                                            f"sampler.batch, or 64); learned: noises per iteration (default "
                                            f"{DEFAULT_BATCH})."),
        iterations: int = typer.Option(DEFAULT_ITERATIONS, "--iterations", min=0, help="learned: Adam iterations."),
        lr: float = typer.Option(DEFAULT_LR, "--lr", help="learned: Adam learning rate on the grid's logits."),
        val_noises: int = typer.Option(DEFAULT_VAL_NOISES, "--val-noises", min=1, help="learned: held-out "
                                       "validation noises (the best grid by their MSE is kept)."),
        loss: str = typer.Option("soft", "--loss", help="learned: soft (LD3's soft teacher: the student's noise "
                                 "may move within --slack) or mse."),
        slack: float = typer.Option(DEFAULT_SLACK, "--slack", help="learned, --loss soft: the ball's radius, as an "
                                    "RMS perturbation per noise pixel."),
        teacher: str = typer.Option("edm", "--teacher", help="learned: edm (Heun on --teacher-steps Karras "
                                    "intervals) or exact (the model's closed-form solution)."),
        teacher_steps: int = typer.Option(DEFAULT_TEACHER_STEPS, "--teacher-steps", min=1, help="learned: Karras "
                                          "intervals of the teacher."),
        sets: Optional[list[str]] = set_option(),
    ) -> None:
        """Search a time grid for a method at one NFE and write it as a grid file. gits: teacher trajectories over
        fine candidates, the cost of one step between every pair, the cheapest path by dynamic programming.
        learned (LD3): the sigmas, monotone between sigma_min and sigma_max, learned by Adam through the solver
        against the teacher's final samples from the run's grid (karras, logsnr or time-uniform; else Karras), the
        best by held-out validation kept."""
        from iia_cli.experiments.gits import SearchSettings, search_grid
        from iia_cli.experiments.ld3 import LearnSettings, search_learned
        from iia_cli.runtime.progress import log

        with handle_errors(), OutputPlan() as plan:
            plan.file(out, "--out", "grid file", suffixes=(".json",), example="gits-ddim-nfe6.json")
            if search not in SEARCH_KINDS:
                raise ConfigError(f"--search {search!r} is not valid; choose one of {', '.join(SEARCH_KINDS)}")
            cfg = command_config(config, sets, {"sampler.method": method, "sampler.nfe": nfe})
            if search == "learned":
                learn = LearnSettings(iterations=iterations, lr=lr, noises=noises, val_noises=val_noises,
                                      batch=batch or DEFAULT_BATCH, loss=loss, slack=slack, teacher=teacher,
                                      teacher_steps=teacher_steps,
                                      teacher_substeps=teacher_substeps or LD3_TEACHER_SUBSTEPS)
                found = search_learned(cfg, cfg.sampler.method, cfg.sampler.nfe, learn, log)
            else:
                chunk = batch or (cfg.sampler.batch if isinstance(cfg.sampler.batch, int) else 64)
                settings = SearchSettings(candidates=candidates, noises=noises,
                                          teacher_substeps=teacher_substeps or DEFAULT_TEACHER_SUBSTEPS, batch=chunk,
                                          coeff=coeff)
                found = search_grid(cfg, cfg.sampler.method, cfg.sampler.nfe, search, settings, log)
            path = found.save(out)
            typer.echo(f"wrote {path} ({found.method}, NFE {found.nfe}, {found.search['seconds']:.1f} s)")
