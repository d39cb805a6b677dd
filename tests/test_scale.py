"""Scale and reliability: torchrun ranks and shards give single-process results, interrupted runs resume
to identical results, concurrent CSV writers lose nothing, bad runs fail loudly."""

import csv
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from iia_cli.tables.results import COLUMNS, append_rows, make_row

SLOW_MODEL = '''
import time, torch
class Slow:
    shape = (1, 6, 6); sigma_min = 0.002; sigma_max = 80.0; dtype = torch.float64
    def __init__(self, delay, nan):
        self.delay, self.nan = delay, nan
        self.mu = torch.linspace(-0.5, 0.5, 36, dtype=torch.float64).view(1, 1, 6, 6)
        self.var = torch.linspace(0.05, 0.5, 36, dtype=torch.float64).view(1, 1, 6, 6)
    def __call__(self, x, sigma, class_labels=None):
        time.sleep(self.delay)
        s2 = sigma.view(-1, 1, 1, 1).to(torch.float64) ** 2
        d = self.mu + self.var / (self.var + s2) * (x - self.mu)
        return d * float("nan") if self.nan else d
def build(delay=0.0, nan=False):
    return Slow(delay, nan)
'''


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in extra.items()}})
    return env


def _iia(args, cwd, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "iia_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _torchrun(args, cwd, env, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "iia_cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def slow_cfg(tmp_path, write_config):
    (tmp_path / "slow.py").write_text(SLOW_MODEL)

    def make(delay=0.0, nan=False, **sections):
        cfg = {"experiment": "scale", "model": {"kind": "python", "factory": f"{tmp_path / 'slow.py'}:build",
                                                "kwargs": {"delay": delay, "nan": nan}},
               "sampler": {"method": "iia-ddim", "nfe": 6, "batch": 4},
               "calibration": {"samples": 24, "val_samples": 0, "substeps": 4},
               "evaluate": {"methods": ["ddim", "iia-ddim"], "nfe": [6], "samples": 12, "error_samples": 12,
                            "reference_nfe": 99}}
        return write_config(cfg, f"cfg_{delay}_{nan}_{len(sections)}.yaml", **sections)

    return make


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(tmp_path, slow_cfg):
    cfg = slow_cfg()
    env = _env(tmp_path)
    one = tmp_path / "one"
    two = tmp_path / "two"
    one.mkdir()
    two.mkdir()
    r = _iia(["calibrate", "--config", cfg, "--out", "c.json"], one, env)
    assert r.returncode == 0, r.stderr
    r = _torchrun(["calibrate", "--config", cfg, "--out", "c.json"], two, env)
    assert r.returncode == 0, r.stderr
    c1 = json.loads((one / "c.json").read_text())
    c2 = json.loads((two / "c.json").read_text())
    for a, b in zip(c1["coefficients"], c2["coefficients"]):
        assert np.allclose(a, b, rtol=1e-6, atol=1e-12)
    assert c1["calibration_calls"] == c2["calibration_calls"]
    assert np.allclose([v or 0 for v in c1["residual_iia"]], [v or 0 for v in c2["residual_iia"]], rtol=1e-6)
    # sampling: rank 0 writes every seed, in order, identical to one process
    for d in (one, two):
        run = _iia if d is one else _torchrun
        r = run(["sample", "--config", cfg, "--coeffs", "c.json", "--seeds", "0-9", "--out", "s.npz"], d, env)
        assert r.returncode == 0, r.stderr
    a, b = np.load(one / "s.npz"), np.load(two / "s.npz")
    assert list(b["seeds"]) == list(range(10))
    assert np.allclose(a["x"], b["x"], rtol=1e-5, atol=1e-6)
    # evaluate: integration error all-reduced over ranks
    for d in (one, two):
        run = _iia if d is one else _torchrun
        r = run(["evaluate", "--config", cfg, "--no-fid", "--methods", "ddim"], d, env)
        assert r.returncode == 0, r.stderr
    v1 = [_ci(row) for row in csv.DictReader(open(one / "results" / "scale.csv"))]
    v2 = [_ci(row) for row in csv.DictReader(open(two / "results" / "scale.csv"))]
    assert len(v1) == len(v2) == 1
    # per-seed states: value, interval and replicates are bit-identical however the seeds were split
    assert v1 == v2 and v1[0][3].startswith("bootstrap-seeds")


def _ci(row):
    return row["value"], row["ci_low"], row["ci_high"], row["ci_method"], row["ci_data"]


@pytest.mark.slow
def test_shards_merge_to_single_process_rows(tmp_path, slow_cfg, inception_weights):
    cfg = slow_cfg(fid={"reference": "builtin:mnist", "reference_samples": 20, "batch": 12},
                   evaluate={"metrics": ["integration_rmse", "kid", "fid"]})
    env = _env(tmp_path, IIA_INCEPTION_WEIGHTS=inception_weights)
    r = _iia(["evaluate", "--config", cfg, "--methods", "iia-ddim", "--csv", "single.csv"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    for i in range(3):
        r = _iia(["evaluate", "--config", cfg, "--methods", "iia-ddim", "--shard", f"{i}/3"], tmp_path, env)
        assert r.returncode == 0, r.stderr
        if i == 1:  # an incomplete set is reported, not merged
            r = _iia(["merge", "results/shards/scale", "--csv", "merged.csv"], tmp_path, env)
            assert r.returncode == 1 and "incomplete" in r.stderr
    r = _iia(["merge", "results/shards/scale", "--csv", "merged.csv"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    single = {row["metric"]: _ci(row) for row in csv.DictReader(open(tmp_path / "single.csv"))}
    merged = {row["metric"]: _ci(row) for row in csv.DictReader(open(tmp_path / "merged.csv"))}
    assert single.keys() == merged.keys() == {"fid", "kid", "integration_rmse"}
    assert merged == single  # value, interval and replicates bit for bit


def _wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.slow
def test_interrupted_sample_resumes_to_identical_images(tmp_path, slow_cfg):
    cfg = slow_cfg(delay=0.02, sampler={"method": "ddim"})
    env = _env(tmp_path)
    args = ["sample", "--config", cfg, "--seeds", "0-39", "--nfe", "5"]
    r = _iia([*args, "--out", "full"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "iia_cli", *map(str, args), "--out", "part"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list((tmp_path / "part").glob("*.png"))) >= 8, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    written = sorted((tmp_path / "part").glob("*.png"))
    assert 8 <= len(written) < 40 and not list((tmp_path / "part").glob(".*"))  # only complete files
    r = _iia([*args, "--out", "part"], tmp_path, env)
    assert r.returncode == 0 and "resuming" in r.stderr
    for f in sorted((tmp_path / "full").glob("*.png")):
        assert f.read_bytes() == (tmp_path / "part" / f.name).read_bytes()


@pytest.mark.slow
def test_interrupted_evaluate_resumes_to_identical_fid(tmp_path, slow_cfg, inception_weights):
    cfg = slow_cfg(delay=0.01, fid={"reference": "builtin:mnist", "reference_samples": 20, "batch": 4},
                   evaluate={"samples": 24, "error_samples": 0})
    env = _env(tmp_path, IIA_INCEPTION_WEIGHTS=inception_weights, IIA_CHECKPOINT_EVERY_S=0)
    args = ["evaluate", "--config", cfg, "--methods", "ddim"]
    r = _iia([*args, "--csv", "full.csv"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "iia_cli", *map(str, args), "--csv", "part.csv"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial_dir = tmp_path / "results" / "cache" / "partial"

    def some_done():
        for f in partial_dir.glob("*.npz"):
            try:
                return int(np.load(f)["done"]) >= 8
            except Exception:
                return False
        return False

    _wait_for(some_done, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130 and not (tmp_path / "part.csv").exists()
    r = _iia([*args, "--csv", "part.csv"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    full = [row for row in csv.DictReader(open(tmp_path / "full.csv"))]
    part = [row for row in csv.DictReader(open(tmp_path / "part.csv"))]
    assert [_ci(r) for r in full] == [_ci(r) for r in part]  # bit-identical FID and interval
    assert not list(partial_dir.glob("*.npz"))


def _append_many(path, worker):
    for k in range(40):
        append_rows(path, [make_row(experiment=f"w{worker}", method="edm", nfe=k, metric="fid", value=k * 0.5)])


@pytest.mark.slow
def test_concurrent_writers_lose_no_rows(tmp_path):
    path = tmp_path / "r.csv"
    procs = [mp.get_context("spawn").Process(target=_append_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = list(csv.reader(open(path)))
    assert rows[0] == COLUMNS and len(rows) == 1 + 4 * 40
    assert all(len(r) == len(COLUMNS) for r in rows)
    for w in range(4):
        assert sorted(int(r[COLUMNS.index("nfe")]) for r in rows[1:] if r[0] == f"w{w}") == list(range(40))


def test_nan_samples_fail_loudly_and_write_no_row(cli, tmp_path, slow_cfg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = slow_cfg(nan=True)
    r = cli(["evaluate", "--config", cfg, "--methods", "ddim", "--no-fid"])
    assert r.exit_code == 1 and "ddim at NFE 6: non-finite samples (NaN/Inf) for seeds [0, 1, 2, 3]" in r.output
    assert not (tmp_path / "results" / "scale.csv").exists()


def test_least_squares_warns_only_where_the_ridge_changes_the_fit(cli, tmp_path, write_config):
    import torch

    from iia_cli.calibration.lstsq import solve_least_squares

    # nearly collinear quantities (q2 = 2 q1 + tiny): G is singular to working precision, the ridge picks the
    # small coefficients and every fit is as good: nothing to warn about, the same coefficients as before
    gen = torch.Generator().manual_seed(0)
    q1 = torch.randn(500, generator=gen, dtype=torch.float64)
    q2 = 2 * q1 + 1e-10 * torch.randn(500, generator=gen, dtype=torch.float64)
    target = 0.3 * q1 + 0.01 * torch.randn(500, generator=gen, dtype=torch.float64)
    Q = torch.stack([q1, q2])
    G, g = Q @ Q.T, Q @ target
    seen = []
    c = solve_least_squares(G, g, ridge=1e-8, step=1, warn=seen.append)
    assert not seen
    a = float(q1 @ target / (q1 @ q1))  # the best fit along the one direction the data resolve
    assert float((c @ Q - target).pow(2).sum()) == pytest.approx(float((a * q1 - target).pow(2).sum()), rel=1e-6)
    # a weak direction that carries part of the target: the ridge suppresses it and costs fit -> one warning
    G, g = torch.diag(torch.tensor([1.0, 1e-13], dtype=torch.float64)), torch.tensor([1.0, 1e-6], dtype=torch.float64)
    solve_least_squares(G, g, ridge=1e-8, step=3, warn=seen.append)
    assert len(seen) == 1 and "IIA step 3" in seen[0] and "nearly collinear" in seen[0] and "calibration.ridge" in seen[0]
    # the default evaluation's IIA calibrations (gaussian model here) print no conditioning warning
    cfg = write_config({"model": {"kind": "gaussian"}, "calibration": {
        "samples": 8, "val_samples": 0, "out_dir": str(tmp_path)}}, "g.yaml")
    for method in ("iia-edm", "iia-ddim"):
        r = cli(["calibrate", "--config", cfg, "--method", method, "--nfe", "7"])
        assert r.exit_code == 0 and "warning" not in r.output, r.output


def test_unreadable_files_exit_1(cli, tmp_path, slow_cfg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    weights = tmp_path / "w.pth"
    r = cli(["evaluate", "--config", slow_cfg(fid={"reference": "builtin:mnist"}), "--inception-weights", weights])
    assert r.exit_code == 1 and str(weights) in r.output and "Traceback" not in r.output
    r = cli(["fid", "--images", tmp_path, "--ref", bad])
    assert r.exit_code == 1 and str(bad) in r.output
    r = cli(["merge", tmp_path / "nothing", "--csv", tmp_path / "m.csv"])
    assert r.exit_code == 1 and "no shard files" in r.output
    r = cli(["sample", "--config", slow_cfg(), "--shard", "3/2", "--out", "x.npz"])
    assert r.exit_code == 2 and "--shard '3/2' is not valid" in r.output


@pytest.mark.slow
def test_compile_and_channels_last_give_the_same_samples(cli, tmp_path, write_config):
    cfg = write_config({"model": {"kind": "gaussian", "shape": [2, 4, 4]}, "sampler": {"method": "edm", "nfe": 5}},
                       "g.yaml")
    outs = {}
    for name, extra in [("plain", []), ("fast", ["--compile", "--channels-last"])]:
        r = cli(["sample", "--config", cfg, "--seeds", "0-5", "--out", tmp_path / f"{name}.npz", *extra])
        assert r.exit_code == 0, r.output
        outs[name] = np.load(tmp_path / f"{name}.npz")["x"]
    np.testing.assert_allclose(outs["fast"], outs["plain"], rtol=1e-6, atol=1e-6)


def test_speed_option_errors_and_auto_batch(cli, tmp_path, monkeypatch, write_config):
    from iia_cli import api
    from iia_cli.config.experiment import load_config

    cfg = write_config({"model": {"kind": "gaussian"}}, "g.yaml")
    r = cli(["sample", "--config", cfg, "--dtype", "float16", "--out", tmp_path / "x.npz"])
    assert r.exit_code == 2 and "--dtype applies to network models" in r.output
    r = cli(["sample", "--config", cfg, "--dtype", "float8", "--out", tmp_path / "x.npz"])
    assert r.exit_code == 2 and "sampler.dtype='float8' is not valid" in r.output
    r = cli(["sample", "--config", cfg, "--batch", "lots", "--out", tmp_path / "x.npz"])
    assert r.exit_code == 2 and "positive integer or auto" in r.output
    # sampler.batch: auto asks the probe once per model (fingerprint) and device; an explicit batch never probes
    probes = []
    monkeypatch.setattr(api, "auto_batch", lambda model, device: probes.append(device.type) or 24)
    memo = api.ModelMemo()
    p = api.prepare(load_config(cfg), memo=memo)
    assert p.batch == 24 and probes == ["cpu"]
    assert api.prepare(load_config(cfg), model=p.model, fingerprint=p.fingerprint, memo=memo).batch == 24
    assert api.prepare(load_config(cfg), memo=memo).batch == 24 and len(probes) == 1  # a new object of one model
    other = write_config({"model": {"kind": "gaussian", "std": 0.25}}, "other.yaml")
    assert api.prepare(load_config(other), memo=memo).batch == 24 and len(probes) == 2  # another model: probed
    write_config({"model": {"kind": "gaussian"}, "sampler": {"batch": 5}}, "g.yaml")
    assert api.prepare(load_config(cfg), memo=memo).batch == 5 and len(probes) == 2
