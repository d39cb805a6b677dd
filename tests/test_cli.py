"""The CLI end to end through Typer's runner: sample, calibrate -> coefficient file -> sample, errors."""

import json

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gauss_cfg(tmp_path, write_config):
    cfg = {
        "experiment": "gauss-test",
        "model": {"kind": "gaussian", "shape": [1, 4, 4]},
        "sampler": {"method": "edm", "nfe": 7, "batch": 4},
        "calibration": {"samples": 24, "val_samples": 8, "out_dir": str(tmp_path / "coeffs")},
    }
    return write_config(cfg, "gauss.yaml")


def test_sample_npz_and_png(cli, gauss_cfg, tmp_path):
    r = cli(["sample", "--config", gauss_cfg, "--seeds", "0-9", "--out", tmp_path / "s.npz",
             "--grid-png", tmp_path / "grid.png"])
    assert r.exit_code == 0, r.output
    data = np.load(tmp_path / "s.npz")
    assert data["x"].shape == (10, 1, 4, 4) and data["x"].dtype == np.float32
    assert data["images"].shape == (10, 4, 4, 1) and data["images"].dtype == np.uint8
    assert list(data["seeds"]) == list(range(10)) and int(data["nfe"]) == 7
    expected = np.clip(data["x"].astype(np.float64) * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(data["images"], expected)
    assert (tmp_path / "grid.png").is_file()
    r = cli(["sample", "--config", gauss_cfg, "--seeds", "3,1000", "--out", tmp_path / "pngs", "--set", "output.subdirs=true"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pngs" / "000000" / "000003.png").is_file()
    assert (tmp_path / "pngs" / "001000" / "001000.png").is_file()


def test_images_depend_only_on_seed(cli, gauss_cfg, tmp_path):
    cli(["sample", "--config", gauss_cfg, "--seeds", "0-6", "--batch", "7", "--out", tmp_path / "a.npz"])
    cli(["sample", "--config", gauss_cfg, "--seeds", "5-6", "--batch", "1", "--out", tmp_path / "b.npz"])
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["x"][5:7], b["x"])


def test_calibrate_then_sample_round_trip(cli, gauss_cfg, tmp_path):
    r = cli(["sample", "--config", gauss_cfg, "--method", "iia-edm", "--nfe", "9", "--seeds", "0-3",
             "--out", tmp_path / "x.npz"])
    assert r.exit_code == 1
    assert "iia calibrate --config" in r.output and "--method iia-edm --nfe 9" in r.output
    r = cli(["calibrate", "--config", gauss_cfg, "--method", "iia-edm", "--nfe", "9"])
    assert r.exit_code == 0, r.output
    coeff_path = r.stdout.strip().splitlines()[-1]
    data = json.loads(open(coeff_path).read())
    assert data["method"] == "iia-edm" and data["method_params"] == {"r": 1} and data["nfe"] == 9
    assert data["samples"] == 24 and data["substeps"] == 10 and len(data["coefficients"]) == 5
    r = cli(["sample", "--config", gauss_cfg, "--method", "iia-edm", "--nfe", "9", "--seeds", "0-3",
             "--out", tmp_path / "iia.npz"])
    assert r.exit_code == 0, r.output
    r = cli(["sample", "--config", gauss_cfg, "--method", "edm", "--nfe", "9", "--seeds", "0-3", "--out", tmp_path / "edm.npz"])
    x_iia, x_edm = np.load(tmp_path / "iia.npz")["x"], np.load(tmp_path / "edm.npz")["x"]
    assert not np.array_equal(x_iia, x_edm)
    # Mismatches: another NFE, another model, another grid, each named.
    r = cli(["sample", "--config", gauss_cfg, "--method", "iia-edm", "--nfe", "11", "--coeffs", coeff_path,
             "--seeds", "0", "--out", tmp_path / "m.npz"])
    assert r.exit_code == 2 and "NFE 9 != 11" in r.output
    r = cli(["sample", "--config", gauss_cfg, "--method", "iia-edm", "--nfe", "9", "--coeffs", coeff_path,
             "--set", "model.std=0.4", "--seeds", "0", "--out", tmp_path / "m.npz"])
    assert r.exit_code == 2 and "another model" in r.output
    r = cli(["sample", "--config", gauss_cfg, "--method", "iia-edm", "--nfe", "9", "--coeffs", coeff_path,
             "--set", "grid.rho=5", "--seeds", "0", "--out", tmp_path / "m.npz"])
    assert r.exit_code == 2 and "grid sigmas differ" in r.output
    r = cli(["sample", "--config", gauss_cfg, "--method", "biia-edm", "--nfe", "9", "--coeffs", coeff_path,
             "--seeds", "0", "--out", tmp_path / "m.npz"])
    assert r.exit_code == 2 and "method iia-edm != biia-edm" in r.output
    # --calibrate calibrates on the fly
    r = cli(["sample", "--config", gauss_cfg, "--method", "iia-ddim", "--nfe", "6", "--calibrate", "--seeds", "0-1",
             "--out", tmp_path / "d.npz"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, needle", [
    (["--set", "sampler.method=heunn"], "unknown method 'heunn'"),
    (["--set", "grid.kind=cosine"], "grid.kind='cosine' is not valid"),
    (["--set", "sampler.bogus=1"], "unknown key sampler.bogus"),
    (["--set", "model.kind=gmm"], "model.kind='gmm' is not valid"),
    (["--set", "model.rank=3"], "unknown key model.rank for model.kind=gaussian"),
    (["--method", "dpm-solver-2", "--nfe", "7"], "nearest valid: 6 or 8"),
    (["--seeds", "9-3"], "descending"),
    (["--set", "sampler.r=5", "--method", "iia-edm"], "sampler.r=5 is not valid for iia-edm"),
    (["--set", "sampler.nfe=ten"], "sampler.nfe='ten' is not a valid int"),
])
def test_bad_config_exits_2_with_a_message(cli, gauss_cfg, tmp_path, args, needle):
    r = cli(["sample", "--config", gauss_cfg, "--out", tmp_path / "o.npz", *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_missing_files_exit_1(cli, tmp_path, gauss_cfg):
    r = cli(["sample", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "o.npz"])
    assert r.exit_code == 1 and "config file not found" in r.output and "Traceback" not in r.output
    r = cli(["sample", "--config", gauss_cfg, "--method", "iia-edm", "--coeffs", tmp_path / "c.json",
             "--out", tmp_path / "o.npz"])
    assert r.exit_code == 1 and "coefficient file not found" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    r = cli(["sample", "--config", bad, "--out", tmp_path / "o.npz"])
    assert r.exit_code == 2 and "not valid YAML" in r.output


def test_python_factory_model(cli, tmp_path, write_config):
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "class Shrink:\n"
        "    shape = (2, 3, 3); sigma_min = 0.01; sigma_max = 10.0\n"
        "    def __init__(self, scale): self.scale = scale\n"
        "    def __call__(self, x, sigma, class_labels=None):\n"
        "        assert sigma.shape == (x.shape[0],)\n"
        "        return x * self.scale / (1 + sigma.view(-1, 1, 1, 1) ** 2)\n"
        "def build(scale=1.0):\n"
        "    return Shrink(scale)\n")
    cfg = write_config({"model": {"kind": "python", "factory": f"{tmp_path / 'mymodel.py'}:build",
                                  "kwargs": {"scale": 0.5}}, "sampler": {"method": "ddim", "nfe": 5}}, "f.yaml")
    r = cli(["sample", "--config", cfg, "--seeds", "0-2", "--out", tmp_path / "f.npz"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "f.npz")["x"].shape == (3, 2, 3, 3)
    r = cli(["sample", "--config", cfg, "--set", f"model.factory={tmp_path / 'mymodel.py'}:nothere", "--out", tmp_path / "f.npz"])
    assert r.exit_code == 2 and "has no function 'nothere'" in r.output


def test_module_entry_point_and_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "iia_cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "calibrate" in out.stdout and "pickles" in out.stdout


def test_builtin_default_config_is_the_shipped_one(cli, tmp_path, monkeypatch):
    """`iia ...` without --config uses the packaged default (the trained testbed network), which is
    configs/mnist-testbed.yaml byte for byte."""
    from iia_cli.cli.common import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.read_bytes() == (ROOT / "configs" / "mnist-testbed.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)
    r = cli(["sample", "--method", "ddim", "--nfe", "3", "--seeds", "0-1", "--out", tmp_path / "d.npz"])
    assert r.exit_code == 0, r.output
    assert "built-in default" in r.output and np.load(tmp_path / "d.npz")["x"].shape == (2, 1, 32, 32)


def test_all_shipped_configs_load():
    from iia_cli.config.experiment import load_config

    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        load_config(path)
