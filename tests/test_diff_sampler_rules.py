"""``sampler.thresholding`` and ``sampler.afs`` (diff-sampler's dynamic thresholding and analytical first step)
through the CLI: recorded in row identities and coefficient files only when set, shown in tables, refused with
one-line errors (exit 2) where not defined. Solver-level parity with diff-sampler is in ``test_parity.py``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def cfg(tmp_path, monkeypatch, write_config):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IIA_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return write_config({"experiment": "rules", "model": {"kind": "gaussian", "shape": [1, 4, 4], "mean": 2.0},
                         "sampler": {"method": "iia-unipc", "nfe": 5, "batch": 4, "convention": "diff-sampler"},
                         "calibration": {"samples": 8, "val_samples": 0, "substeps": 2,
                                         "out_dir": str(tmp_path / "coeffs")},
                         "evaluate": {"methods": ["dpm-solver++-2m", "unipc"], "nfe": [5], "samples": 4,
                                      "error_samples": 4, "reference_nfe": 20, "metrics": ["integration_rmse"]}},
                        "rules.yaml")


def test_rules_enter_row_identities_only_when_set(cli, cfg, tmp_path):
    """Default rows carry no trace of the options (their identities are those of before); each option gives new
    rows (a thresholded row is never reused for an unthresholded run), recorded in method_params and shown in
    the table; a rerun with the same options is skipped."""
    csv_path = tmp_path / "results" / "rules.csv"
    variants = [[], ["--set", "sampler.thresholding=dynamic"], ["--set", "sampler.afs=true"],
                ["--set", "sampler.thresholding=dynamic", "--set", "sampler.afs=true"]]
    for extra in variants:
        r = cli(["evaluate", "--config", cfg, *extra])
        assert r.exit_code == 0 and "already in" not in r.output, (extra, r.output)
    rows = _rows(csv_path)
    assert len(rows) == 8 and len({r["identity"] for r in rows}) == 8
    params = [json.loads(r["method_params"]) for r in rows]
    assert params[0] == params[1] == {"convention": "diff-sampler"}
    assert params[2] == {"convention": "diff-sampler", "thresholding": "dynamic"}
    assert params[4] == {"convention": "diff-sampler", "afs": True}
    assert params[6] == {"convention": "diff-sampler", "thresholding": "dynamic", "afs": True}
    for row in rows[:2]:
        text = row["identity_fields"]
        assert "thresholding" not in text and "afs" not in text
    values = [float(r["value"]) for r in rows]
    assert values[0] != values[2] and values[0] != values[4]  # the options change the samples (mean 2: |D| > 1)
    r = cli(["evaluate", "--config", cfg, "--set", "sampler.thresholding=dynamic"])
    assert r.exit_code == 0 and "already in" in r.output and len(_rows(csv_path)) == 8
    r = cli(["report", csv_path])
    assert r.exit_code == 0 and "thresholding=dynamic" in r.stdout and "afs=True" in r.stdout


def test_rules_in_coefficient_files(cli, cfg, tmp_path):
    """An IIA method calibrated with thresholding and AFS records both (file and name); a run without them
    refuses that file, naming the difference; the sample with them makes NFE model calls on NFE + 2 sigmas."""
    rules = ["--set", "sampler.thresholding=dynamic", "--set", "sampler.afs=true"]
    r = cli(["calibrate", "--config", cfg, *rules])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip().splitlines()[-1])
    data = json.loads(path.read_text())
    assert data["method_params"] == {"convention": "diff-sampler", "thresholding": "dynamic", "afs": True}
    assert data["nfe"] == 5 and len(data["sigmas"]) == 7 and "-tdynamic" in path.name and "-aTrue" in path.name
    r = cli(["sample", "--config", cfg, *rules, "--seeds", "0-3", "--out", tmp_path / "a.npz"])
    assert r.exit_code == 0, r.output
    assert len(np.load(tmp_path / "a.npz")["sigmas"]) == 7
    r = cli(["sample", "--config", cfg, "--coeffs", path, "--seeds", "0-3", "--out", tmp_path / "b.npz"])
    assert r.exit_code == 2 and "method parameters" in r.output and "thresholding" in r.output


@pytest.mark.parametrize("args, message", [
    (["--set", "sampler.thresholding=static"], "sampler.thresholding"),
    (["--set", "sampler.afs=maybe"], "sampler.afs"),
    (["--set", "sampler.thresholding=dynamic", "--method", "ddim"],
     "sampler.thresholding=dynamic is defined for the data-prediction solvers"),
    (["--set", "sampler.thresholding=dynamic", "--method", "iia-edm"], "not edm; use sampler.thresholding=none"),
    (["--set", "sampler.afs=true", "--method", "edm", "--nfe", "6"], "afs=true cannot make NFE 6"),
])
def test_bad_rules_are_one_line_errors(cli, cfg, tmp_path, args, message):
    r = cli(["sample", "--config", cfg, "--seeds", "0", "--out", tmp_path / "x.npz", *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_gits_search_refuses_the_rules(cli, cfg, tmp_path):
    r = cli(["grid", "--config", cfg, "--method", "ddim", "--nfe", "5", "--search", "gits", "--set",
             "sampler.afs=true", "--out", tmp_path / "g.json"])
    assert r.exit_code == 2 and "does not model sampler.afs or sampler.thresholding" in r.output, r.output
