"""iia evaluate end to end through the CLI: calibrate-or-reuse, FID per seed range, tidy CSV, report."""

import csv
import json
import math
import multiprocessing as mp
import subprocess
from pathlib import Path

import numpy as np
import pytest

from iia_cli.tables.results import COLUMNS


def _revision() -> str:
    """The checkout the tested code comes from, asked of git independently of iia_cli.tables.results."""
    rev = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True)
    return rev.stdout.strip() if rev.returncode == 0 else "unknown"


@pytest.fixture
def eval_cfg(tmp_path, monkeypatch, write_config):
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
    return write_config(cfg, "tiny.yaml")


@pytest.mark.slow
def test_evaluate_writes_tidy_csv_and_report(cli, eval_cfg, tmp_path, inception_weights, monkeypatch):
    monkeypatch.setenv("IIA_INCEPTION_WEIGHTS", str(inception_weights))
    r = cli(["evaluate", "--config", eval_cfg])
    assert r.exit_code == 0, r.output
    csv_path = tmp_path / "results" / "tiny.csv"
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
        assert f.seek(0) == 0 and next(csv.reader(f)) == COLUMNS
    assert len(rows) == 2 * (1 + 2 + 2)  # per method: one integration error row, a KID and a FID row per seed range
    for row in rows:  # every row carries its 95 % interval and the replicates that paired comparisons need
        assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"]), row
        assert row["ci_method"].startswith("bootstrap-seeds" if row["metric"] == "integration_rmse" else "jackknife")
        assert json.loads(row["ci_data"])["kind"] in ("seeds", "jackknife")
    fid_rows = [row for row in rows if row["metric"] == "fid"]
    assert {row["seeds"] for row in fid_rows} == {"0-14", "15-29"}
    revision = _revision()
    for row in rows:
        assert row["experiment"] == "tiny" and row["model"] == "gaussian" and len(row["model_sha256"]) == 64
        assert row["nfe"] == "5" and row["grid"] == "karras" and row["tool_version"] and row["timestamp"]
        assert row["git_revision"] in (revision, revision + "-dirty")
    values = {(row["method"], row["seeds"]): float(row["value"]) for row in fid_rows}
    assert all(math.isfinite(v) and v > 0 for v in values.values())  # 15 samples never match the reference
    assert all(values[m, "0-14"] != values[m, "15-29"] for m in ("edm", "iia-edm"))  # each range its own samples
    iia = [row for row in fid_rows if row["method"] == "iia-edm"][0]
    assert iia["r"] == "1" and iia["M"] == "4" and iia["B"] == "16" and iia["coefficient_file"].endswith(".json")
    assert iia["reference"].endswith(".npz") and len(iia["reference_sha256"]) == 64 and iia["n_samples"] == "15"
    err = {row["method"]: float(row["value"]) for row in rows if row["metric"] == "integration_rmse"}
    assert err["iia-edm"] < err["edm"]
    # the printed table shows the same numbers as the CSV
    edm_fids = sorted(float(row["value"]) for row in fid_rows if row["method"] == "edm")
    assert f"{edm_fids[0]:.2f} [" in r.stdout and f"(mean {sum(edm_fids) / 2:.2f})" in r.stdout
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


# ----------------------------------------------------------------------------------------------------------
# Row identity, metrics, shards (fast: integration error on the Gaussian model unless marked slow)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def err_cfg(tmp_path, monkeypatch, write_config):
    """Integration error only: no FID reference and no Inception weights anywhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IIA_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    cfg = {"experiment": "ident", "model": {"kind": "gaussian", "shape": [1, 4, 4]}, "sampler": {"batch": 3},
           "calibration": {"samples": 8, "val_samples": 0, "substeps": 2},
           "evaluate": {"methods": ["iia-ddim"], "nfe": [5], "samples": 6, "error_samples": 4, "reference_nfe": 19,
                        "metrics": ["integration_rmse"]}}
    return write_config(cfg, "ident.yaml")


def test_identity_skips_identical_reruns_and_recomputes_changed_settings(cli, err_cfg, tmp_path):
    csv_path = tmp_path / "results" / "ident.csv"
    r = cli(["evaluate", "--config", err_cfg])
    assert r.exit_code == 0, r.output
    first = _rows(csv_path)
    assert len(first) == 1 and first[0]["metric"] == "integration_rmse" and len(first[0]["identity"]) == 16
    fields = json.loads(first[0]["identity_fields"])
    assert fields["calibration.substeps"] == 2 and fields["calibration.samples"] == 8 and fields["reference"]["nfe"] == 19
    before = csv_path.read_bytes()
    r = cli(["evaluate", "--config", err_cfg])  # identical: skipped, nothing appended, no calibration
    assert r.exit_code == 0 and "already in" in r.output and "calibrat" not in r.output
    assert csv_path.read_bytes() == before
    changes = [["--set", "calibration.substeps=3"], ["--set", "calibration.samples=6"],
               ["--set", "calibration.ridge=0.001"], ["--set", "grid.rho=3"], ["--set", "evaluate.reference_nfe=29"]]
    for extra in changes:
        r = cli(["evaluate", "--config", err_cfg, *extra])
        assert r.exit_code == 0 and "already in" not in r.output, (extra, r.output)
    rows = _rows(csv_path)
    assert len(rows) == 1 + len(changes) and len({r["identity"] for r in rows}) == len(rows)
    # the row records B and M of the coefficient file actually used
    assert [r["B"] for r in rows] == ["8", "8", "6", "8", "8", "8"] and rows[1]["M"] == "3"
    assert json.loads(rows[3]["identity_fields"])["calibration.ridge"] == 0.001
    # --fresh recomputes an identical row and appends it
    r = cli(["evaluate", "--config", err_cfg, "--fresh"])
    assert r.exit_code == 0 and len(_rows(csv_path)) == len(rows) + 1
    # report: one row per identity, and a note naming the settings that differ for one (method, NFE, metric)
    r = cli(["report", csv_path])
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "iia-ddim nfe=5 integration_rmse: rows of 6 different settings" in out
    for name in ("calibration.substeps", "calibration.samples", "calibration.ridge", "grid.rho", "reference"):
        assert name in out


def test_metrics_option_and_errors(cli, err_cfg, tmp_path):
    r = cli(["evaluate", "--config", err_cfg, "--metrics", "fid"])
    assert r.exit_code == 2 and "fid.reference is not set" in r.output and "Traceback" not in r.output
    r = cli(["evaluate", "--config", err_cfg, "--metrics", "fid,bogus"])
    assert r.exit_code == 2 and "unknown metric 'bogus'" in r.output
    r = cli(["evaluate", "--config", err_cfg, "--metrics", "clip_score"])
    assert r.exit_code == 2 and "clip_score needs a text-to-image model" in r.output
    r = cli(["evaluate", "--config", err_cfg, "--no-fid", "--metrics", "fid"])
    assert r.exit_code == 2 and "--no-fid contradicts" in r.output
    r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--metrics", "integration_rmse"])
    assert r.exit_code == 0 and {r["method"] for r in _rows(tmp_path / "results" / "ident.csv")} == {"ddim"}
    assert not list((tmp_path / "results" / "cache").glob("reference-*"))  # no FID reference was computed


def test_empty_shards_write_empty_sums_and_merge_equals_single_process(cli, err_cfg, tmp_path):
    r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--csv", "single.csv"])
    assert r.exit_code == 0, r.output
    for i in range(8):  # 4 error seeds over 8 shards: shards 4..7 have no seed of their own
        r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--shard", f"{i}/8"])
        assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "results" / "shards" / "ident").glob("*.npz"))) == 8
    r = cli(["merge", "results/shards/ident", "--csv", "merged.csv"])
    assert r.exit_code == 0, r.output
    single, merged = _rows(tmp_path / "single.csv"), _rows(tmp_path / "merged.csv")
    assert len(single) == len(merged) == 1 and merged[0]["identity"] == single[0]["identity"]
    assert float(merged[0]["value"]) == pytest.approx(float(single[0]["value"]), rel=1e-12)
    r = cli(["merge", "results/shards/ident", "--csv", "merged.csv"])  # merged twice: nothing appended twice
    assert r.exit_code == 0 and len(_rows(tmp_path / "merged.csv")) == 1
    # sample: a shard without seeds writes an empty .npz
    r = cli(["sample", "--config", err_cfg, "--method", "ddim", "--seeds", "0-1", "--shard", "5/8", "--out", "s.npz"])
    assert r.exit_code == 0, r.output
    data = np.load(tmp_path / "s.shard-5-of-8.npz")
    assert data["x"].shape == (0, 1, 4, 4) and data["images"].shape == (0, 4, 4, 1) and len(data["seeds"]) == 0


def test_merge_and_report_reject_bad_files_in_one_line(cli, err_cfg, tmp_path):
    r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--shard", "0/2"])
    assert r.exit_code == 0, r.output
    shard = next((tmp_path / "results" / "shards" / "ident").glob("*.npz"))
    good = shard.read_bytes()
    for bad in (good[: len(good) // 2], b"", b"PK\x03\x04garbage"):
        shard.write_bytes(bad)
        r = cli(["merge", shard.parent, "--csv", "m.csv"])
        assert r.exit_code == 1 and "unreadable" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    np.savez(shard, meta=np.asarray(json.dumps({"row": {"metric": "fid"}, "shard": 0, "shards": 2})))
    r = cli(["merge", shard.parent, "--csv", "m.csv"])
    assert r.exit_code == 1 and "no valid iia_cli metadata" in r.output and len(r.output.strip().splitlines()) == 1
    odd = {"empty.csv": "", "nocols.csv": "a,b\n1,2\n", "text.csv": "method,nfe,metric,value\nedm,6,fid,abc\n",
           "nfe.csv": "method,nfe,metric,value\nedm,six,fid,1.0\n"}
    for name, text in odd.items():
        (tmp_path / name).write_text(text)
        r = cli(["report", tmp_path / name])
        assert r.exit_code == 1 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert name in r.output
    (tmp_path / "ok.csv").write_text("method,nfe,metric,value\nedm,6,fid,12.5\n")  # minimal foreign CSV: readable
    r = cli(["report", tmp_path / "ok.csv"])
    assert r.exit_code == 0 and "FID (lower is better)" in r.stdout and "12.50 *" in r.stdout
    # the README's rows, written before rows had an identity, still report
    from pathlib import Path

    r = cli(["report", Path(__file__).resolve().parents[1] / "results" / "readme" / "mnist-gmm.csv"])
    assert r.exit_code == 0 and "248.32" in r.stdout and "0.8035" in r.stdout


def _append_at_once(path, row, barrier, written):
    """A writer process: waits for the others, appends ``row`` with skip_done, reports how many rows it wrote."""
    from iia_cli.tables.results import append_rows

    barrier.wait(120)
    written.put(len(append_rows(path, [row], skip_done=True)))


@pytest.mark.slow
def test_append_checks_identity_under_the_lock(tmp_path):
    from iia_cli.tables.results import append_rows, make_row, row_identity

    ident, text = row_identity({"method": "edm", "nfe": 6})
    row = make_row(method="edm", nfe=6, metric="fid", value=1.0, identity=ident, identity_fields=text)
    path = tmp_path / "r.csv"
    ctx = mp.get_context("spawn")
    barrier, written = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_append_at_once, args=(path, row, barrier, written)) for _ in range(3)]
    for p in procs:
        p.start()
    counts = [written.get(timeout=180) for _ in procs]  # before join: a child exits once its queue is flushed
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(counts) == [0, 0, 1]  # all three raced; exactly one wrote the row, the others saw it done
    assert len(_rows(path)) == 1
    assert append_rows(path, [row], skip_done=True) == [] and len(_rows(path)) == 1
    assert len(append_rows(path, [row])) == 1 and len(_rows(path)) == 2  # --fresh appends


COUNTING_MODEL = '''
import torch
class Counting:
    shape = (1, 6, 6); sigma_min = 0.002; sigma_max = 80.0; dtype = torch.float64
    def __init__(self, log):
        self.log = log
        self.mu = torch.linspace(-0.5, 0.5, 36, dtype=torch.float64).view(1, 1, 6, 6)
    def fingerprint(self):
        return "counting-v1"
    def __call__(self, x, sigma, class_labels=None):
        with open(self.log, "a") as f:
            f.write(f"{x.shape[0]}\\n")
        s2 = sigma.view(-1, 1, 1, 1).to(torch.float64) ** 2
        return self.mu + 0.2 / (0.2 + s2) * (x - self.mu)
def build(log):
    return Counting(log)
'''


@pytest.mark.slow
def test_one_pass_per_seed_range_counts_the_minimum_denoiser_calls(cli, tmp_path, inception_weights, monkeypatch,
                                                                    write_config):
    from iia_cli.api import prepare
    from iia_cli.config.experiment import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IIA_INCEPTION_WEIGHTS", str(inception_weights))
    (tmp_path / "counting.py").write_text(COUNTING_MODEL)
    log = tmp_path / "calls.txt"
    cfg = {"experiment": "count", "model": {"kind": "python", "factory": f"{tmp_path / 'counting.py'}:build",
                                            "kwargs": {"log": str(log)}},
           "sampler": {"batch": 4}, "fid": {"reference": "builtin:mnist", "reference_samples": 12, "batch": 12},
           "evaluate": {"methods": ["ddim", "dpm-solver++-2m"], "nfe": [5], "samples": 10, "error_samples": 6,
                        "reference_nfe": 19}}
    path = write_config(cfg, "count.yaml")
    ref_nfe = prepare(load_config(path), "edm", 19).nfe

    def calls():
        n = sum(int(v) for v in log.read_text().split()) if log.is_file() else 0
        log.unlink(missing_ok=True)
        return n

    r = cli(["evaluate", "--config", path])
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "results" / "count.csv")
    assert sorted((r["method"], r["metric"]) for r in rows) == sorted(
        (m, k) for m in ("ddim", "dpm-solver++-2m") for k in ("fid", "integration_rmse", "kid"))
    # each seed sampled once per (method, NFE) for every metric, plus one reference solve of the error seeds
    assert calls() == 2 * 10 * 5 + 6 * ref_nfe
    # another FID reference: the KID and FID rows are recomputed (the integration errors are skipped, no
    # reference solve)
    r = cli(["evaluate", "--config", path, "--set", "fid.reference_samples=14"])
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "results" / "count.csv")
    assert [r["metric"] for r in rows[6:]] == ["kid", "fid", "kid", "fid"] and calls() == 2 * 10 * 5
    old = {r["metric"]: r["reference_sha256"] for r in rows[:3]}
    assert rows[6]["reference_sha256"] != old["kid"] and rows[7]["reference_sha256"] != old["fid"]
    r = cli(["evaluate", "--config", path, "--set", "fid.reference_samples=14"])
    assert r.exit_code == 0 and "all 6 rows already in" in r.output and calls() == 0


def _refuse_writes(monkeypatch, match):
    """Make every atomic write whose target path contains ``match`` fail as on a full disk."""
    from iia_cli.io import atomic

    real = atomic._write_via_temp

    def write(path, fn):
        if match in str(path):
            raise OSError(28, "No space left on device")
        return real(path, fn)

    monkeypatch.setattr(atomic, "_write_via_temp", write)


def test_unwritable_shard_is_rescued_and_merges_after_moving(cli, err_cfg, tmp_path, monkeypatch):
    r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--csv", "single.csv"])
    assert r.exit_code == 0, r.output
    r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--shard", "1/2"])
    assert r.exit_code == 0, r.output
    with monkeypatch.context() as m:
        _refuse_writes(m, "results/shards")
        r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--shard", "0/2"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    msg = " ".join(r.output.split())
    assert "No space left on device" in msg and "shard sums were saved to" in msg, msg
    rescued = Path(msg.split("were saved to ")[1].split(" instead")[0])
    destination = Path(msg.split("move it to ")[1].rstrip(")"))
    assert rescued.parent == tmp_path / "iia-rescued" and destination.name.endswith(".shard-0-of-2.npz")
    rescued.rename(destination)
    r = cli(["merge", "results/shards/ident", "--csv", "merged.csv"])
    assert r.exit_code == 0, r.output
    single, merged = _rows(tmp_path / "single.csv"), _rows(tmp_path / "merged.csv")
    assert merged[0]["identity"] == single[0]["identity"]
    assert float(merged[0]["value"]) == pytest.approx(float(single[0]["value"]), rel=1e-12)


def test_unwritable_checkpoint_warns_and_the_run_goes_on(cli, err_cfg, tmp_path, monkeypatch):
    r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--csv", "plain.csv"])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("IIA_CHECKPOINT_EVERY_S", "0")  # a checkpoint after every batch
    _refuse_writes(monkeypatch, "partial")
    r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim", "--csv", "nockpt.csv"])
    assert r.exit_code == 0, r.output
    assert r.output.count("could not write the checkpoint") == 1 and "sampling goes on" in r.output
    assert _rows(tmp_path / "nockpt.csv")[0]["value"] == _rows(tmp_path / "plain.csv")[0]["value"]
    r = cli(["sample", "--config", err_cfg, "--method", "ddim", "--seeds", "0-8", "--out", "s.npz"])
    assert r.exit_code == 0, r.output
    assert r.output.count("could not write the checkpoint") == 1 and np.load(tmp_path / "s.npz")["x"].shape[0] == 9


def test_a_changed_solver_definition_is_part_of_the_row_identity(cli, err_cfg, tmp_path):
    """dpm-solver++-3m changed from the exact-integral form to the published 3M: its rows carry the solver's
    revision (rows of the old definition are not reused); unchanged solvers keep identities without one."""
    r = cli(["evaluate", "--config", err_cfg, "--methods", "ddim,dpm-solver++-3m,dpm-solver++-3m-exact",
             "--set", "evaluate.reference_method=dpm-solver++-3m"])
    assert r.exit_code == 0, r.output
    fields = {row["method"]: json.loads(row["identity_fields"]) for row in _rows(tmp_path / "results" / "ident.csv")}
    assert fields["dpm-solver++-3m"]["solver_revision"] == 2
    assert "solver_revision" not in fields["ddim"] and "solver_revision" not in fields["dpm-solver++-3m-exact"]
    assert all(f["reference"]["solver_revision"] == 2 for f in fields.values())
