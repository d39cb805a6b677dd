"""Every number with its uncertainty, end to end: intervals on result rows, paired comparisons in report, KID,
rows of an older iia_cli, and bad shard sums refused."""

import csv
import json

import numpy as np
import pytest
import yaml

from iia_cli.metrics.compare import LEGACY, compare_rows
from iia_cli.metrics.registry import IntegrationErrorAccumulator, KidAccumulator, MetricContext, result_fields
from iia_cli.tables.results import append_rows, make_row, read_results, row_identity, summary_table

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _err_row(method, nfe, per_seed_sq, seeds="0-63", params=None):
    """A result row of integration_rmse from per-seed squared errors, through the accumulator."""
    acc = IntegrationErrorAccumulator(range(len(per_seed_sq)))
    acc.state["sq"] = np.asarray(per_seed_sq, np.float64)
    acc.state["count"] = np.full(len(per_seed_sq), 16.0)
    fields = {"method": method, "nfe": nfe, "metric": "integration_rmse", "seeds": seeds}
    ident, text = row_identity(fields)
    return make_row(experiment="toy", model="gaussian", method=method, method_params=params or {}, nfe=nfe,
                    seeds=seeds, n_samples=len(per_seed_sq), metric="integration_rmse", reference="edm@nfe99",
                    identity=ident, identity_fields=text, **result_fields(acc))


@pytest.fixture
def synthetic_csv(tmp_path):
    """edm, iia-edm (clearly better, on the same seeds) and ddim (within noise of iia-edm) at NFE 6."""
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 1.0, 64) * 16
    rows = [_err_row("edm", 6, base), _err_row("iia-edm", 6, base * 0.5 * rng.uniform(0.8, 1.2, 64), params={"r": 1}),
            _err_row("ddim", 6, base * 0.5 * rng.uniform(0.8, 1.2, 64))]
    path = tmp_path / "r.csv"
    append_rows(path, rows)
    return path


def test_paired_ratio_resolved_and_ties_marked(cli, synthetic_csv):
    g = summary_table(read_results(synthetic_csv), "integration_rmse").set_index("label")
    p = g.loc["iia-edm r=1", "paired"]
    assert p.resolved and p.high < 1 and 0.6 < p.ratio < 0.8 and p.prob_improvement > 0.9
    # the best two are within noise of each other: no '*', both marked tied; edm is not tied
    assert sorted(g["mark"]) == ["", "~", "~"] and g.loc["edm", "mark"] == ""
    out = cli(["report", synthetic_csv]).stdout
    assert "resolved" in out and "[" in out and "~ = tied for best" in out
    r = cli(["report", synthetic_csv, "--compare", "iia-edm", "edm"])
    assert r.exit_code == 0 and "iia-edm r=1 better" in r.stdout, r.stdout
    r = cli(["report", synthetic_csv, "--compare", "iia-edm", "ddim"])
    assert r.exit_code == 0 and "not resolved" in r.stdout and "seeds would resolve it" in r.stdout, r.stdout


def test_a_method_compared_with_itself_is_never_resolved(cli, synthetic_csv):
    row = _rows(synthetic_csv)[0]
    p = compare_rows(row, row)
    assert p.ratio == 1 and p.low <= 1 <= p.high and not p.resolved and p.prob_improvement == 0.5
    r = cli(["report", synthetic_csv, "--compare", "edm", "edm"])
    body = r.stdout.split("┡")[1]
    assert r.exit_code == 0 and "x1.000 [1.000, 1.000]" in body and "not resolved" in body and "better" not in body


def test_an_iia_row_identical_to_its_base_says_so(cli, tmp_path):
    base = np.random.default_rng(1).gamma(2.0, 1.0, 32) * 16
    path = tmp_path / "same.csv"
    append_rows(path, [_err_row("ddim", 6, base, "0-31"), _err_row("iia-ddim", 6, base, "0-31")])
    out = cli(["report", path]).stdout
    assert "= base (same samples)" in out and "identical to ddim on these seeds" in out
    cells = out.split("┡")[1].split("└")[0]
    assert "x1.00" not in cells and "*" not in cells and cells.count("~") == 2  # a tie, not a win


def test_rows_of_an_older_iia_cli_are_read_but_never_paired(cli, synthetic_csv, tmp_path):
    old = tmp_path / "old.csv"
    with open(synthetic_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [c for c in rows[0] if not c.startswith("ci_")]
    with open(old, "w", newline="") as f:  # the columns an older iia_cli wrote: no interval columns
        w = csv.DictWriter(f, fieldnames=keep, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows[:1])  # edm, old
    df = read_results(old)
    assert np.isnan(df["ci_low"].iloc[0])
    r = cli(["report", old])
    assert r.exit_code == 0 and "[" not in r.stdout.split("method")[1].split("\n")[3]
    # an old edm row and a new iia-edm row of the same experiment: shown, not paired, not resolved
    import pandas as pd

    both = pd.concat([df, read_results(synthetic_csv).iloc[1:2]])
    g = summary_table(both, "integration_rmse").set_index("label")
    assert g.loc["iia-edm r=1", "paired"] == LEGACY and not g.loc["iia-edm r=1", "mark"] == "*"
    # appending new rows to an old file is refused with the reason, not mixed into it
    r = cli(["report", old, "--metric", "integration_rmse"])
    assert r.exit_code == 0
    from iia_cli.runtime.errors import IIARuntimeError

    with pytest.raises(IIARuntimeError, match="no interval columns"):
        append_rows(old, rows[1:2])


def test_report_metric_option_is_checked_as_usage(cli, synthetic_csv):
    r = cli(["report", synthetic_csv, "--metric", "bogus"])
    assert r.exit_code == 2 and "unknown metric 'bogus' in --metric" in r.output and "kid" in r.output
    r = cli(["report", synthetic_csv, "--compare", "edm", "nope"])
    assert r.exit_code == 2 and "no rows of method 'nope'" in r.output


@pytest.mark.slow
def test_iia_edm_against_edm_on_gmm_mnist_at_nfe6_is_resolved(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli(["evaluate", "--config", ROOT / "configs" / "mnist-gmm.yaml", "--methods", "edm,iia-edm", "--nfe", "6",
             "--metrics", "integration_rmse", "--set", "evaluate.reference_nfe=199", "--set", "calibration.samples=64",
             "--set", "calibration.val_samples=0"])
    assert r.exit_code == 0, r.output
    rows = {row["method"]: row for row in _rows(tmp_path / "results" / "mnist-gmm.csv")}
    p = compare_rows(rows["iia-edm"], rows["edm"])
    assert p.resolved and p.high < 0.5, p
    assert "resolved" in r.stdout and "x0.3" in r.stdout


@pytest.mark.slow
def test_nan_shard_sums_are_refused_naming_the_file(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"experiment": "nan", "model": {"kind": "gaussian", "shape": [1, 4, 4]}, "sampler": {"batch": 4},
           "evaluate": {"methods": ["ddim"], "nfe": [5], "samples": 8, "error_samples": 8, "reference_nfe": 19,
                        "metrics": ["integration_rmse"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    for i in range(2):
        assert cli(["evaluate", "--config", "c.yaml", "--shard", f"{i}/2"]).exit_code == 0
    shard = sorted((tmp_path / "results" / "shards" / "nan").glob("*.shard-1-of-2.npz"))[0]
    with np.load(shard) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["sq"] = arrays["sq"] * np.nan
    np.savez(shard, **arrays)
    r = cli(["merge", tmp_path / "results" / "shards" / "nan", "--csv", "m.csv"])
    assert r.exit_code == 1 and str(shard) in r.output and "NaN" in r.output
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.slow
def test_kid_of_real_halves_contains_zero_and_edm_nfe6_is_resolved_above(cli, tmp_path, monkeypatch,
                                                                         inception_weights):
    from iia_cli.models.testbed import heldout_images, mnist_split

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IIA_INCEPTION_WEIGHTS", str(inception_weights))
    # 20 held-out digits of each class, classes interleaved (the built-in set is sorted by class)
    labels = np.repeat(np.arange(10), 100)
    assert len(heldout_images()) == len(labels) == len(mnist_split()[1])
    pick = np.stack([np.flatnonzero(labels == c)[:20] for c in range(10)], axis=1).reshape(-1)
    np.save(tmp_path / "ref.npy", heldout_images()[pick])
    cfg = yaml.safe_load((ROOT / "configs" / "mnist-testbed.yaml").read_text())
    cfg["fid"].update(reference=str(tmp_path / "ref.npy"), reference_samples=None)
    cfg["evaluate"].update(methods=["edm"], nfe=[6], samples=100, metrics=["kid"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = cli(["evaluate", "--config", "c.yaml"])
    assert r.exit_code == 0, r.output
    (row,) = _rows(tmp_path / "results" / "mnist-testbed.csv")
    # the reference features evaluate cached: two disjoint halves (the first and last 10 of each class) of one
    # real set
    from iia_cli.metrics.fid.compute import load_reference_features

    feats, _ = load_reference_features(row["reference"])
    assert feats.shape == (200, 2048)
    halves = KidAccumulator(range(100), MetricContext(ref_features=feats[100:]))
    halves.state["features"] = feats[:100].copy()
    halves.state["filled"][:] = 1
    real = result_fields(halves)
    assert real["ci_low"] < 0 < real["ci_high"], real
    assert float(row["ci_low"]) > real["ci_high"] > 0, (row["ci_low"], real)
