"""CLI command ``grid``: search a sampler's time grid and write it as a grid file (``iia_cli.gits``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import CONFIG_HELP, command_config, handle_errors, key_help, set_option
from .gits import DEFAULT_CANDIDATES, DEFAULT_NOISES, DEFAULT_TEACHER_SUBSTEPS, SEARCH_KINDS
from .paths import OutputPlan


def register(app: typer.Typer) -> None:
    @app.command()
    def grid(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
        method: Optional[str] = typer.Option(None, "--method", "-m", help=key_help("sampler.method", "The method the grid is for "
                                                                        "(it serves its base solver and that solver's "
                                                                        "IIA methods)")),
        nfe: Optional[int] = typer.Option(None, "--nfe", help=key_help("sampler.nfe", "Denoiser calls per image")),
        search: str = typer.Option("gits", "--search", help=f"Search kind: {', '.join(SEARCH_KINDS)} (GITS: Chen "
                                   "et al. 2024, dynamic programming over teacher trajectories)."),
        out: Path = typer.Option(..., "--out", "-o", help="The grid file to write (.json); use it with "
                                 "--set grid.kind=file --set grid.path=FILE.", show_default=False),
        candidates: int = typer.Option(DEFAULT_CANDIDATES, "--candidates", min=3, help="Candidate sigmas (Karras "
                                       "rho 7 over grid.sigma_min..grid.sigma_max)."),
        noises: int = typer.Option(DEFAULT_NOISES, "--noises", min=1, help="Teacher trajectories (seeds from 3e9)."),
        teacher_substeps: int = typer.Option(DEFAULT_TEACHER_SUBSTEPS, "--teacher-substeps", min=1,
                                             help="Teacher Heun steps per candidate interval, uniform in log sigma."),
        batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Noises per model call (default "
                                            "sampler.batch, or 64)."),
        sets: Optional[list[str]] = set_option(),
    ) -> None:
        """Search a time grid for a method at one NFE (GITS: teacher trajectories over fine candidates, the cost
        of one step between every pair, the cheapest path by dynamic programming) and write it as a grid file."""
        from .gits import SearchSettings, search_grid
        from .progress import log

        with handle_errors(), OutputPlan() as plan:
            plan.file(out, "--out", "grid file", suffixes=(".json",), example="gits-ddim-nfe6.json")
            cfg = command_config(config, sets, {"sampler.method": method, "sampler.nfe": nfe})
            chunk = batch or (cfg.sampler.batch if isinstance(cfg.sampler.batch, int) else 64)
            settings = SearchSettings(candidates=candidates, noises=noises, teacher_substeps=teacher_substeps,
                                      batch=chunk)
            found = search_grid(cfg, cfg.sampler.method, cfg.sampler.nfe, search, settings, log)
            path = found.save(out)
            typer.echo(f"wrote {path} ({found.method}, NFE {found.nfe}, {found.search['seconds']:.1f} s)")
