"""What a new user sees: progress on long steps, tables and plots that say what to conclude, readable grids."""

import csv

import numpy as np
import pytest

from iia_cli.tables.results import append_rows, make_row, read_results, results_figure, row_identity


@pytest.fixture
def err_cfg(tmp_path, monkeypatch, write_config):
    """Integration error only on the Gaussian model: fast, no Inception."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IIA_PROGRESS_EVERY_S", "0")  # every progress update becomes a log line
    cfg = {"experiment": "ux", "model": {"kind": "gaussian", "shape": [1, 4, 4]}, "sampler": {"batch": 2},
           "calibration": {"samples": 4, "val_samples": 0, "substeps": 2},
           "evaluate": {"methods": ["ddim", "iia-ddim"], "nfe": [5, 7], "samples": 4, "error_samples": 4,
                        "reference_nfe": 19, "metrics": ["integration_rmse"]}}
    return write_config(cfg, "ux.yaml")


def test_progress_lines_for_reference_solve_calibration_and_sampling(cli, err_cfg):
    r = cli(["evaluate", "--config", err_cfg, "--nfe", "5"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    # not a TTY: plain lines, a start line, then the count with percentage, rate and ETA, then the end line
    assert "reference solve edm nfe=19: started, 4 images" in lines  # every error seed in one solve
    assert any(line.startswith("reference solve edm nfe=19: 4 images in ") and "img/s" in line for line in lines)
    # NFE 5: 5 DDIM steps, of which 3 are fitted (step 0 has no history for its quantities; the last is the final step)
    assert "calibrating iia-ddim (4 noises): started, 3 steps" in lines
    step = [line for line in lines if line.startswith("calibrating iia-ddim (4 noises): 2/3 steps (67%)")]
    assert step and "step/s" in step[0] and "ETA" in step[0]
    assert any(line.startswith("ddim nfe=5 integration_rmse: 2/4 images (50%)") and "ETA" in line for line in lines)


@pytest.mark.slow
def test_progress_lines_for_reference_statistics(capsys, tmp_path, monkeypatch, inception_weights, write_config):
    from iia_cli.config.experiment import load_config
    from iia_cli.experiments.evaluate import resolve_reference
    from iia_cli.runtime.progress import log

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IIA_PROGRESS_EVERY_S", "0")
    write_config({"model": {"kind": "gaussian", "shape": [1, 4, 4]},
                  "fid": {"reference": "builtin:mnist", "reference_samples": 12, "batch": 4}}, "c.yaml")
    path, mu, _, _ = resolve_reference(load_config(tmp_path / "c.yaml"), inception_weights, "cpu", log)
    err = capsys.readouterr().err.splitlines()
    assert path.is_file() and mu.shape == (2048,)
    assert "reference features of builtin:mnist: started, 12 images" in err
    assert any(line.startswith("reference features of builtin:mnist: 8/12 images (67%)") and "ETA" in line
               for line in err), err
    assert any(line.startswith("reference features of builtin:mnist: 12 images in ") for line in err), err


def test_reference_solutions_are_stored_and_reused_across_runs(cli, err_cfg):
    r = cli(["evaluate", "--config", err_cfg, "--nfe", "5", "--methods", "ddim"])
    assert r.exit_code == 0 and "reference solve edm nfe=19: started, 4 images" in r.output
    (store,) = (err_cfg.parent / "results" / "cache" / "solves").glob("edm-nfe19-*.npz")
    first = store.read_bytes()
    r = cli(["evaluate", "--config", err_cfg, "--nfe", "7", "--methods", "ddim", "--csv", "other.csv"])
    assert r.exit_code == 0, r.output
    assert "reference solve" not in r.output and f"reference solutions of 4 of 4 error seeds from {store.relative_to(err_cfg.parent)}" in r.output
    assert store.read_bytes() == first
    # more error seeds: only the new ones are solved; --fresh recomputes the store
    r = cli(["evaluate", "--config", err_cfg, "--nfe", "5", "--methods", "ddim", "--set", "evaluate.error_samples=6",
             "--set", "evaluate.samples=6"])
    assert r.exit_code == 0 and "reference solve edm nfe=19: started, 2 images" in r.output, r.output
    r = cli(["evaluate", "--config", err_cfg, "--nfe", "5", "--methods", "ddim", "--fresh"])
    assert r.exit_code == 0 and "reference solve edm nfe=19: started, 4 images" in r.output


def test_a_long_batch_is_not_silent(tmp_path, monkeypatch, capsys):
    """A heartbeat from inside a batch: one sampling batch whose steps take longer than the progress interval
    logs lines during the batch, not only at its end."""
    import time

    import torch

    from iia_cli.core.methods import make_method
    from iia_cli.runtime.progress import ImageProgress
    from iia_cli.core.sampling import sample_batches

    class Slow:
        shape, sigma_min, sigma_max, dtype = (1, 2, 2), 0.002, 80.0, torch.float64

        def __call__(self, x, sigma, class_labels=None):
            time.sleep(0.03)
            return x * 0

    sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.01, 0.0], dtype=torch.float64)
    with ImageProgress(4, "slow batch", log_every_s=0.05) as bar:
        list(sample_batches(Slow(), make_method("ddim"), sigmas, [0, 1, 2, 3], 4, heartbeat=bar))
    err = capsys.readouterr().err.splitlines()
    beats = [line for line in err if "the next 4 at" in line]
    assert len(beats) >= 2 and beats[0].startswith("slow batch: 0/4 images done, the next 4 at"), err


def test_progress_on_a_terminal_uses_one_live_display_for_nested_steps(monkeypatch):
    from iia_cli.runtime import progress

    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    with progress.ImageProgress(4, "outer") as outer:
        assert outer.tty and progress._live is not None
        with progress.ImageProgress(2, "inner") as inner:  # a reference solve inside a sampling pass
            inner.advance(2)
        assert progress._live is not None
        outer.advance(4)
    assert progress._live is None
    bar = progress.ImageProgress(3, "abandoned by an exception").__enter__()  # as in the calibration pass
    bar.advance(1)
    assert progress._live is not None
    del bar
    assert progress._live is None


def _write(path, rows):
    out = []
    for method, nfe, metric, value, seeds in rows:
        fields = {"method": method, "nfe": nfe, "metric": metric, "seeds": seeds}
        ident, text = row_identity(fields)
        params = {"r": 1} if method == "iia-edm" else {}
        out.append(make_row(experiment="toy", model="gaussian", method=method, method_params=params, nfe=nfe,
                            seeds=seeds, n_samples=10, metric=metric, value=value, reference="edm@nfe999",
                            identity=ident, identity_fields=text))
    append_rows(path, out)


ROWS = [("edm", 6, "integration_rmse", 0.8, "0-9"), ("iia-edm", 6, "integration_rmse", 0.2, "0-9"),
        ("dpm-solver++-2m", 6, "integration_rmse", 0.1, "0-9"), ("iia-dpm-solver++-2m", 6, "integration_rmse", 0.05, "0-9"),
        ("edm", 10, "integration_rmse", 0.02, "0-9"), ("iia-edm", 10, "integration_rmse", 0.01, "0-9"),
        ("edm", 6, "fid", 40.0, "0-9"), ("iia-edm", 6, "fid", 30.0, "0-9"),
        ("edm", 10, "fid", 20.0, "0-9"), ("iia-edm", 10, "fid", 25.0, "0-9"),
        ("edm", 6, "clip_score", 0.30, "0-9"), ("iia-edm", 6, "clip_score", 0.31, "0-9")]


def test_table_shows_ratio_to_base_best_mark_direction_and_error_first(cli, tmp_path):
    path = tmp_path / "r.csv"
    _write(path, ROWS)
    r = cli(["report", path])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "toy (gaussian)" in out
    assert out.index("integration RMSE") < out.index("FID") < out.index("CLIP score")  # the error column first
    assert "integration RMSE to edm@nfe999, 10 samples (lower is better)" in out
    assert "FID, 10 samples (lower is better)" in out and "CLIP score, 10 samples (higher is better)" in out
    assert "seed ranges" not in out  # one range: no min/mean wording
    table = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in out.split("FID, 10")[0].splitlines() if line.startswith("│") and line.split("│")[1].strip()}
    # rows without interval data (as an older iia_cli wrote them): ratios to the base (from the method registry)
    # are shown unpaired on a second line, and without a paired comparison no best mark is resolved: all tie
    assert table["iia-edm r=1"] == ["0.2000 ~", "0.01000 ~"]
    assert table["iia-dpm-solver++-2m"] == ["0.05000 ~", "-"]
    assert table["edm"] == ["0.8000 ~", "0.02000 ~"]
    assert "x0.25 (unpaired)" in out and "x0.50 (unpaired)" in out and "no interval data" in out
    fid = out.split("FID, 10")[1].split("CLIP")[0]
    assert "30.00 ~" in fid and "20.00 ~" in fid and "x0.75 (unpaired)" in fid and "x1.25 (unpaired)" in fid
    assert "x1.03 (unpaired)" in out.split("CLIP score")[1]  # higher is better: 0.31 / 0.30
    # two seed ranges: the best of the ranges with the mean, and the title says so
    _write(path, [("edm", 6, "fid", 44.0, "10-19")])
    out = cli(["report", path]).stdout
    assert "FID, 10 samples, min over seed ranges (mean) (lower is better)" in out
    assert "40.00 (mean 42.00)" in out


def test_plot_draws_one_panel_per_metric(cli, tmp_path):
    path = tmp_path / "r.csv"
    _write(path, ROWS)
    fig = results_figure(read_results(path))
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["integration RMSE (lower is better)", "FID (lower is better)",
                                               "CLIP score (higher is better)"]
    assert "toy (gaussian)" in fig._suptitle.get_text()
    assert axes[0].get_yscale() == "log" and axes[1].get_yscale() == "linear"  # 0.01..0.8 spans decades
    assert list(axes[0].get_xticks()) == [6, 10]
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert lines["iia-edm r=1"].get_color() == lines["edm"].get_color()  # IIA and its base: one colour
    assert lines["iia-edm r=1"].get_linestyle() == "-" and lines["edm"].get_linestyle() == "--"
    assert lines["dpm-solver++-2m"].get_color() != lines["edm"].get_color()
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert all(legend.x0 >= ax.get_window_extent().x1 for ax in axes)  # outside the lines
    r = cli(["report", path, "--plot", tmp_path / "p.png"])
    assert r.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 10000
    r = cli(["report", path, "--plot", tmp_path / "q.png", "--metric", "fid"])
    assert r.exit_code == 0 and len(results_figure(read_results(path), ["fid"]).axes) == 1
    r = cli(["report", path, "--plot", tmp_path / "q.png", "--metric", "bogus"])  # a usage error: exit 2
    assert r.exit_code == 2 and "unknown metric 'bogus' in --metric; choose from integration_rmse, kid" in r.output
    r = cli(["report", path, "--plot", tmp_path / "q.png", "--metric", "kid"])  # valid, but not in this CSV
    assert r.exit_code == 1 and "no kid rows to plot" in r.output


def test_evaluate_after_a_full_skip_says_so_and_shows_only_the_requested_nfe(cli, err_cfg, tmp_path):
    r = cli(["evaluate", "--config", err_cfg])
    assert r.exit_code == 0 and "NFE 5" in r.stdout and "NFE 7" in r.stdout
    with open(tmp_path / "results" / "ux.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    r = cli(["evaluate", "--config", err_cfg, "--nfe", "7"])
    assert r.exit_code == 0, r.output
    assert "all 2 rows already in results/ux.csv (same identity); --fresh recomputes" in r.output
    assert "NFE 7" in r.stdout and "NFE 5" not in r.stdout and "appended" not in r.output
    r = cli(["evaluate", "--config", err_cfg, "--nfe", "7,9", "--methods", "ddim"])
    assert r.exit_code == 0 and "1 of 2 rows already in results/ux.csv" in r.output
    assert "NFE 7" in r.stdout and "NFE 9" in r.stdout and "iia-ddim" not in r.stdout
    assert "(1 rows)" in r.stdout


def test_sample_grid_is_about_512_px_and_padded():
    from iia_cli.io.images import grid_image

    images = np.full((16, 28, 28, 1), 7, dtype=np.uint8)
    grid = grid_image(images)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3 and 450 <= grid.shape[1] <= 600
    scale = 5  # round(512 / (4 * 28))
    assert grid.shape[1] == 4 * (28 * scale + 2) + 2
    assert (grid[:2] == 255).all() and (grid[2 : 2 + 28 * scale, 2 : 2 + 28 * scale] == 7).all()
    big = grid_image(np.zeros((4, 512, 512, 3), dtype=np.uint8))
    assert big.shape[1] == 2 * 514 + 2  # never downscaled
