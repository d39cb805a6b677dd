"""iia evaluate end to end through the CLI: calibrate-or-reuse, FID per seed range, tidy CSV, report."""

import csv

import pytest
import yaml

from iia_cli.results import COLUMNS


@pytest.fixture
def eval_cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {
        "experiment": "tiny",
        "model": {"kind": "gaussian", "shape": [1, 8, 8]},
        "sampler": {"batch": 10},
        "calibration": {"samples": 16, "val_samples": 4, "substeps": 4},
        "fid": {"reference": "builtin:mnist", "reference_samples": 30, "batch": 20},
        "evaluate": {"methods": ["edm", "iia-edm"], "nfe": [5], "seed_ranges": ["0-14", "15-29"],
                     "error_samples": 8, "reference_nfe": 199},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_evaluate_writes_tidy_csv_and_report(cli, eval_cfg, tmp_path, inception_weights, monkeypatch):
    monkeypatch.setenv("IIA_INCEPTION_WEIGHTS", str(inception_weights))
    r = cli(["evaluate", "--config", eval_cfg])
    assert r.exit_code == 0, r.output
    csv_path = tmp_path / "results" / "tiny.csv"
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
        assert f.seek(0) == 0 and next(csv.reader(f)) == COLUMNS
    assert len(rows) == 2 * (1 + 2)  # per method: one integration error row, one FID row per seed range
    fid_rows = [row for row in rows if row["metric"] == "fid"]
    assert {row["seeds"] for row in fid_rows} == {"0-14", "15-29"}
    for row in rows:
        assert row["experiment"] == "tiny" and row["model"] == "gaussian" and len(row["model_sha256"]) == 64
        assert row["nfe"] == "5" and row["grid"] == "karras" and row["tool_version"] and row["timestamp"]
        assert row["git_revision"]
        assert float(row["value"]) >= 0
    iia = [row for row in fid_rows if row["method"] == "iia-edm"][0]
    assert iia["r"] == "1" and iia["M"] == "4" and iia["B"] == "16" and iia["coefficient_file"].endswith(".json")
    assert iia["reference"].endswith(".npz") and len(iia["reference_sha256"]) == 64 and iia["n_samples"] == "15"
    err = {row["method"]: float(row["value"]) for row in rows if row["metric"] == "integration_rmse"}
    assert err["iia-edm"] < err["edm"]
    # the printed table shows the same numbers as the CSV
    edm_fids = sorted(float(row["value"]) for row in fid_rows if row["method"] == "edm")
    assert f"FID {edm_fids[0]:.2f} (mean {sum(edm_fids) / 2:.2f})" in r.stdout
    # rerunning skips what is done; --fresh recomputes, appends (never rewrites) and reuses the coefficients
    before = csv_path.read_bytes()
    r = cli(["evaluate", "--config", eval_cfg, "--methods", "iia-edm", "--no-fid"])
    assert r.exit_code == 0 and "already in" in r.output and csv_path.read_bytes() == before
    r = cli(["evaluate", "--config", eval_cfg, "--methods", "iia-edm", "--no-fid", "--fresh"])
    assert r.exit_code == 0, r.output
    assert "reusing coefficients" in r.output
    after = csv_path.read_bytes()
    assert after.startswith(before) and len(after.splitlines()) == len(before.splitlines()) + 1
    r = cli(["report", csv_path, "--plot", tmp_path / "fid.png"])
    assert r.exit_code == 0 and (tmp_path / "fid.png").stat().st_size > 1000


def test_evaluate_without_weights_fails_fast(cli, eval_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("IIA_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    r = cli(["evaluate", "--config", eval_cfg])
    assert r.exit_code == 1 and "fid-weights --from-fid-helper" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "results" / "tiny.csv").exists()


def test_evaluate_bad_method_exits_2(cli, eval_cfg):
    r = cli(["evaluate", "--config", eval_cfg, "--methods", "edm,nope", "--no-fid"])
    assert r.exit_code == 2 and "unknown method 'nope'" in r.output
