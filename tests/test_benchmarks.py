"""The error benchmarks (benchmarks/integration_error.py, benchmarks/iia_targets.py) judge every comparison on a
paired 95 % interval from per-seed squared errors, and the README's tables of them are their --markdown output."""

import csv
import importlib
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pr = importlib.import_module("paired_rows")


def _row(method, sq, nfe=6, base=None):
    return dict(method=method, base=base or method, nfe=nfe, seeds="0-63", calib_s=0.0, **pr.row_stats(sq, 784))


def test_a_row_compared_with_itself_is_never_resolved_and_ratio_is_the_rmse_ratio():
    rng = np.random.default_rng(3)
    a = rng.gamma(0.5, size=64) * 784
    b = a * rng.uniform(0.3, 0.9, size=64)  # b lower on every seed
    ra, rb = _row("base", a), _row("iia", b, base="base")
    same = pr.compare(ra, ra)
    assert same.ratio == 1.0 and not same.resolved and pr.ratio_text(same) == "= base"
    p = pr.compare(rb, ra)
    assert math.isclose(p.ratio, rb["rmse"] / ra["rmse"], rel_tol=1e-12)
    assert p.low <= p.ratio <= p.high < 1 and p.resolved and p.prob_improvement == 1.0
    assert ra["ci_low"] <= ra["rmse"] <= ra["ci_high"]


def test_best_mark_needs_a_resolved_runner_up_and_identical_rows_share_it():
    rng = np.random.default_rng(4)
    a = rng.gamma(2.0, size=128) * 784
    rows = [_row("ipndm", a), _row("iia-ipndm", a.copy(), base="ipndm"),  # alpha = 0: the same numbers
            _row("ddim", a * 4)]
    marks, p = pr.best_marks(rows)
    assert marks == {0: "*", 1: "*"} and p.resolved
    rows[2] = _row("ddim", a * rng.uniform(0.95, 1.06, size=128))  # about as good: a tie, never a winner
    marks, p = pr.best_marks(rows)
    assert not p.resolved and set(marks.values()) == {"~"} and len(marks) == 3


def _run(script: str, argv: list[str], monkeypatch, tmp_path) -> list[dict]:
    monkeypatch.chdir(tmp_path)  # coefficient files and caches land under tmp_path
    out = tmp_path / f"{script}.csv"
    monkeypatch.setattr(sys, "argv", [script, *argv, "--out", str(out), "--reference-cache", str(tmp_path / "r.pt")])
    runpy.run_path(str(ROOT / "benchmarks" / f"{script}.py"), run_name="__main__")
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def _check_ratio_columns(rows: list[dict]) -> None:
    for r in rows:
        base = next(b for b in rows if b["method"] == r["base"] and b["nfe"] == r["nfe"] and not b.get("target"))
        ratio, low, high = float(r["ratio"]), float(r["ratio_low"]), float(r["ratio_high"])
        assert math.isclose(ratio, float(r["rmse"]) / float(base["rmse"]), rel_tol=1e-12)
        assert low <= ratio <= high
        assert r["ratio_resolved"] == str(low > 1 or high < 1)
        if r is base:  # compared with itself: never resolved
            assert ratio == 1.0 and r["ratio_resolved"] == "False"
        assert float(r["ci_low"]) <= float(r["rmse"]) <= float(r["ci_high"]) and r["ci_method"]


@pytest.mark.slow
def test_integration_error_tiny_run(monkeypatch, tmp_path, capsys):
    rows = _run("integration_error", ["--seeds", "12", "--nfe", "6", "--pairs", "ddim", "--samples", "16"],
                monkeypatch, tmp_path)
    assert [r["method"] for r in rows] == ["ddim", "iia-ddim"]
    _check_ratio_columns(rows)
    iia = rows[1]
    assert float(iia["ratio_high"]) < 1 and iia["ratio_resolved"] == "True"  # IIA-DDIM at NFE 6: 0.3x, resolved
    assert 0 <= float(iia["ratio_prob_improvement"]) <= 1
    assert pr.arrays(iia)[0].size == 12
    printed = capsys.readouterr().out
    assert "| iia-ddim | " in printed and " [" in printed


@pytest.mark.slow
def test_iia_targets_tiny_run(monkeypatch, tmp_path, capsys):
    rows = _run("iia_targets", ["--seeds", "12", "--nfe", "9", "--methods", "iia-ipndm", "--samples", "16"],
                monkeypatch, tmp_path)
    assert len(rows) == 5
    _check_ratio_columns(rows)
    off = 0
    for r in rows:
        if r["target"] == "trajectory":
            local = next(x for x in rows if x["target"] == "local" and x["guard"] == r["guard"])
            assert math.isclose(float(r["vs_local"]), float(r["rmse"]) / float(local["rmse"]), rel_tol=1e-12)
            assert float(r["vs_local_low"]) <= float(r["vs_local"]) <= float(r["vs_local_high"])
        else:
            assert r["vs_local"] == ""
        if r["guard"] == "True" and r["alpha"] == "0.0":  # the guard turned IIA off: its base, never resolved
            assert r["sq"] == rows[0]["sq"] and r["ratio_resolved"] == "False"
            off += 1
    assert off  # iPNDM at NFE 9: the guard chooses alpha = 0 (deterministic at these settings)
    assert "goal 1" in capsys.readouterr().out


def _readme_block(marker: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"<!-- {marker} -->\n") + len(f"<!-- {marker} -->\n")
    return text[start:text.index(f"<!-- /{marker} -->", start)].rstrip("\n").splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["integration_error", "iia_targets"])
def test_readme_block_is_the_markdown_of_the_shipped_csv(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--markdown", str(ROOT / "results" / f"{script}.csv")])
    runpy.run_path(str(ROOT / "benchmarks" / f"{script}.py"), run_name="__main__")
    assert _readme_block(script.replace("_", "-")) == capsys.readouterr().out.rstrip("\n").splitlines()


@pytest.mark.slow
def test_cpu_chunks_benchmark_runs_and_reports_equal_outputs(inception_weights, monkeypatch, capsys):
    """benchmarks/cpu_chunks.py (the README's Speed table) at tiny sizes: a table per choice, every row with its
    rate and its difference from the reference call; chunking changes no Inception feature, folding and the UNet's
    layout only float32 rounding."""
    monkeypatch.setattr(sys, "argv", ["cpu_chunks", "--inception", "4,2", "--images", "4", "--unet", "8,4",
                                      "--samples", "8", "--repeats", "1"])
    runpy.run_path(str(ROOT / "benchmarks" / "cpu_chunks.py"), run_name="__main__")
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in row] for row in rows if not row[0].strip().startswith(("per call", "network",
                                                                                               "layout"))]
    by_name = {row[0]: row for row in rows}
    assert set(by_name) >= {"4", "2", "batch norms kept", "8", "contiguous"}, by_name
    assert float(by_name["2"][3]) == 0.0  # Inception: 2 images per call = 4 images per call, bit for bit
    assert all(float(row[1]) > 0 and float(row[3]) < 1e-4 for row in rows), rows
