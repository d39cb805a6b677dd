"""benchmarks/frontier.py on a tiny setting: its frontier ratio is the paired ratio of the two rows it names, and the
README block rebuilds from the CSV alone."""

import importlib
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
frontier = importlib.import_module("frontier")


def test_frontier_ratio_is_the_rmse_ratio_of_its_rows_and_lies_in_its_interval(tmp_path, capsys):
    out = tmp_path / "frontier"
    df = frontier.main(["--config", "", "--set", "model.kind=gmm-mnist", "--set", "model.components=2",
                        "--set", "calibration.samples=8", "--set", "grid.sigma_min=0.01", "--bases", "ddim",
                        "--nfes", "4", "--seeds", "12", "--reference-nfe", "19", "--candidates", "8",
                        "--noises", "4", "--teacher-substeps", "1", "--threads", "1", "--out", str(out)])
    assert set(df.kind) == {"fixed", "gits", "iia-fixed", "iia-gits"} and len(df) == 6
    rows = df.to_dict("records")
    f = frontier.frontier(rows)
    base, best = f["base"], f["best"]
    assert base["kind"] == "fixed" and base["rmse"] == min(r["rmse"] for r in rows if r["kind"] == "fixed")
    assert best["kind"] != "fixed" and best["rmse"] == min(r["rmse"] for r in rows if r["kind"] != "fixed")
    p = f["ratio"]
    assert math.isclose(p.ratio, best["rmse"] / base["rmse"], rel_tol=1e-9)
    assert p.low <= p.ratio <= p.high and p.low < p.high  # a real interval over seeds, not a point
    # the stored ratio of the best row is the same comparison, and IIA on the best fixed grid used that grid
    stored = df[(df.method == best["method"]) & (df.grid == best["grid"]) & (df.kind == best["kind"])].iloc[0]
    assert math.isclose(stored.ratio, p.ratio, rel_tol=1e-12)
    iia_fixed = df[df.kind == "iia-fixed"].iloc[0]
    assert iia_fixed.grid == frontier.best_fixed(rows, "ddim")["grid"]
    printed = capsys.readouterr().out
    frontier.main(["--markdown", str(out / "rows.csv")])
    again = capsys.readouterr().out.strip()
    assert again and again in printed  # the README block comes back from the CSV alone
    assert len(pd.read_csv(out / "rows.csv")) == 6


def test_add_learned_keeps_the_earlier_rows_and_adds_learned_grids_with_and_without_iia(tmp_path, capsys):
    """--add-learned computes only the learned grid and IIA on it, next to the earlier run's rows (kept as they
    were), and the report then judges IIA on the learned grid like IIA on the GITS grid."""
    from iia_cli.config.experiment import load_config
    from iia_cli.core.gridfile import load_grid_file
    from iia_cli.experiments.ld3 import LearnSettings, search_learned

    common = ["--config", "", "--set", "model.kind=gmm-mnist", "--set", "model.components=2",
              "--set", "calibration.samples=8", "--set", "grid.sigma_min=0.01", "--bases", "ddim", "--nfes", "4",
              "--seeds", "12", "--reference-nfe", "19", "--threads", "1",
              "--reference-cache", str(tmp_path / "ref.pt")]
    frontier.main([*common, "--candidates", "8", "--noises", "4", "--teacher-substeps", "1",
                   "--out", str(tmp_path / "a")])
    cfg = load_config(None, [("model.kind", "gmm-mnist"), ("model.components", 2), ("grid.sigma_min", 0.01)])
    gf = search_learned(cfg, "ddim", 4, LearnSettings(iterations=3, noises=4, val_noises=4, batch=4, teacher_steps=6,
                                                                   teacher_substeps=1),
                        log=lambda s: None)
    gf.save(tmp_path / "learned" / "ddim-nfe4.json")
    before = pd.read_csv(tmp_path / "a" / "rows.csv", keep_default_na=False)
    df = frontier.main([*common, "--learned", str(tmp_path / "learned"), "--add-learned",
                        str(tmp_path / "a" / "rows.csv"), "--out", str(tmp_path / "b")])
    # --search-learned: the missing grid is searched from the base's best fixed grid and written to OUT/learned
    searched = frontier.main([*common, "--search-learned", "--learn-iterations", "2", "--learn-noises", "4",
                              "--learn-val-noises", "4", "--learn-batch", "4", "--learn-teacher-steps", "6",
                              "--learn-teacher-substeps", "1", "--add-learned", str(tmp_path / "a" / "rows.csv"),
                              "--out", str(tmp_path / "c")])
    grid_file = load_grid_file(tmp_path / "c" / "learned" / "ddim-nfe4.json")
    assert grid_file.search["init"]["kind"] == frontier.best_fixed(before.to_dict("records"), "ddim")["grid"]
    assert list(searched.kind) == [*before.kind, "learned", "iia-learned"]
    again = frontier.main([*common, "--learned", str(tmp_path / "learned"), "--add-learned",
                           str(tmp_path / "b" / "rows.csv"), "--out", str(tmp_path / "d")])
    assert list(again.rmse) == list(df.rmse)  # the cells that have learned rows are not computed again
    assert list(df.kind) == [*before.kind, "learned", "iia-learned"]
    for col in ("rmse", "sq", "sigmas", "ratio"):  # the earlier rows as they were
        assert list(df[col][: len(before)]) == list(before[col])
    learned = df[df.kind == "learned"].iloc[0]
    assert learned.sigmas == " ".join(f"{s:.6g}" for s in gf.sigmas)
    printed = capsys.readouterr().out
    assert "IIA on learned / learned alone" in printed and "IIA on the learned grid at least as good" in printed


@pytest.mark.slow
@pytest.mark.parametrize("marker, csv", [("frontier", "frontier"), ("frontier-gmm", "frontier-gmm")])
def test_readme_frontier_block_is_the_markdown_of_the_shipped_csv(capsys, marker, csv):
    text = (ROOT / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->\n", 1)[1].split(f"\n<!-- /{marker} -->", 1)[0]
    frontier.main(["--markdown", str(ROOT / "results" / csv / "rows.csv")])
    assert capsys.readouterr().out.strip() == block.strip()
