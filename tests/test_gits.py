"""GITS grid search (iia_cli.experiments.gits), grid files (iia_cli.core.gridfile) and the integration-error reference
of given grids."""

import csv
import hashlib
import itertools
import math
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iia_cli import api
from iia_cli.config.experiment import load_config
from iia_cli.core.gridfile import GridFile, load_grid_file
from iia_cli.experiments.evaluate import reference_grid
from iia_cli.experiments.gits import SearchSettings, cheapest_path, search_grid
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError

ROOT = Path(__file__).resolve().parents[1]
GAUSS = {"experiment": "gits-test", "model": {"kind": "gaussian", "shape": [1, 4, 4]},
         "sampler": {"method": "ddim", "nfe": 5, "batch": 8},
         "evaluate": {"methods": ["ddim"], "nfe": [5], "error_samples": 8, "reference_nfe": 99}}


def brute_force(cost: np.ndarray, budget: int, calls: np.ndarray) -> float:
    n, best = len(cost), np.inf
    for k in range(n - 1):
        for inner in itertools.combinations(range(1, n - 1), k):
            path = (0, *inner, n - 1)
            steps = list(zip(path, path[1:]))
            if sum(calls[i, j] for i, j in steps) == budget:
                best = min(best, sum(cost[i, j] for i, j in steps))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("two_calls", [False, True])
def test_dp_is_the_cheapest_path(seed, two_calls):
    rng = np.random.default_rng(seed)
    n = 8
    cost = rng.exponential(size=(n, n))
    calls = rng.integers(1, 3, size=(n, n)) if two_calls else np.ones((n, n), dtype=int)
    for budget in range(1, 2 * (n - 1) + 1):
        want = brute_force(cost, budget, calls)
        if not np.isfinite(want):
            with pytest.raises(ConfigError, match="no path"):
                cheapest_path(cost, budget, calls)
            continue
        path, total = cheapest_path(cost, budget, calls)
        assert path[0] == 0 and path[-1] == n - 1 and all(a < b for a, b in zip(path, path[1:]))
        assert sum(calls[a, b] for a, b in zip(path, path[1:])) == budget
        assert total == pytest.approx(sum(cost[a, b] for a, b in zip(path, path[1:])))
        assert total == pytest.approx(want)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("calls", [1, 2])
def test_dp_with_gits_coefficient_is_the_cheapest_weighted_path(seed, calls):
    """coeff (GITS's 1.15): the s-th step of a path costs coeff^s times its entry; equal to brute force over every
    path, and not the unweighted choice where the late steps decide (the weighting matters)."""
    rng = np.random.default_rng(100 + seed)
    n, coeff = 8, 1.6
    cost = rng.exponential(size=(n, n))
    for steps in range(1, n):
        want, arg = math.inf, None
        for inner in itertools.combinations(range(1, n - 1), steps - 1):
            path = (0, *inner, n - 1)
            total = sum(coeff ** s * cost[i, j] for s, (i, j) in enumerate(zip(path, path[1:])))
            if total < want:
                want, arg = total, list(path)
        path, total = cheapest_path(cost, steps * calls, calls, coeff=coeff)
        assert total == pytest.approx(want) and path == arg
    late = np.full((4, 4), 100.0)
    late[0, 1], late[1, 3], late[0, 2], late[2, 3] = 1.0, 3.0, 3.0, 1.5  # 0-1-3: 4 (5.8 weighted); 0-2-3: 4.5 (5.4)
    assert cheapest_path(late, 2 * calls, calls)[0] == [0, 1, 3]
    assert cheapest_path(late, 2 * calls, calls, coeff=coeff)[0] == [0, 2, 3]
    with pytest.raises(ValueError, match="same number of calls"):
        cheapest_path(cost, 3, np.ones((n, n), dtype=int), coeff=1.15)
    with pytest.raises(ConfigError, match="positive"):
        SearchSettings(coeff=0.0)


def _grid_file(fp: str = "ab" * 32, **kw) -> GridFile:
    sigmas = [80.0, 1 / 3, 0.1 + 0.2, float(np.nextafter(0.01, 1)), 0.002000000000000003, 0.0]
    data = dict(sigmas=sigmas, nfe=5, method="ddim", solver="ddim", convention="iia", model_kind="gaussian",
                model_sha256=fp, search={"kind": "gits", "seconds": 1.5})
    return GridFile(**{**data, **kw})


def test_grid_file_round_trips_exactly(tmp_path):
    gf = _grid_file()
    path = gf.save(tmp_path / "g.json")
    back = load_grid_file(path)
    assert back.sigmas == gf.sigmas and torch.equal(back.tensor(), torch.tensor(gf.sigmas, dtype=torch.float64))
    assert back.sha256 == gf.content_sha256() and back.created
    # the search's wall time and the creation time are not content: the same search hashes the same
    assert _grid_file(search={"kind": "gits", "seconds": 9.0}).content_sha256() == back.sha256
    data = json.loads(path.read_text())
    data["sigmas"][1] = float(np.nextafter(1 / 3, 1))  # one ulp off 1/3: an edited file
    path.write_text(json.dumps(data))
    with pytest.raises(IIARuntimeError, match="changed after it was written"):
        load_grid_file(path)
    path.write_text("{garbled")
    with pytest.raises(IIARuntimeError, match="not readable JSON"):
        load_grid_file(path)
    with pytest.raises(MissingFileError, match="grid file"):
        load_grid_file(tmp_path / "none.json")


@pytest.fixture
def gauss(tmp_path, write_config):
    return write_config(GAUSS, "gauss.yaml")


def _fingerprint(cfg) -> str:
    return api.prepare(cfg, "ddim", 5).fingerprint


def test_grid_file_of_another_run_is_refused(gauss, tmp_path):
    cfg = load_config(gauss)
    gf = _grid_file(fp=_fingerprint(cfg))
    path = gf.save(tmp_path / "g.json")
    use = [("grid.kind", "file"), ("grid.path", str(path))]
    assert torch.equal(api.prepare(load_config(gauss, use), "ddim", 5).sigmas, gf.tensor())
    assert torch.equal(api.prepare(load_config(gauss, use), "iia-ddim", 5).sigmas, gf.tensor())  # its IIA method
    cases = [(("ddim", 6, []), "NFE 5 in the file, 6 in the run"),
             (("edm", 5, []), "solver ddim in the file .* edm in the run"),
             (("ddim", 5, [("sampler.convention", "diff-sampler")]), "convention iia in the file, diff-sampler"),
             (("ddim", 5, [("model.std", 0.7)]), r"model fingerprint .*\(another model\)")]
    for (method, nfe, extra), message in cases:
        with pytest.raises(ConfigError, match=message):
            api.prepare(load_config(gauss, use + extra), method, nfe)


def test_reference_of_given_grids_is_fine(gauss):
    cfg = load_config(gauss)
    assert reference_grid(cfg, api.prepare(cfg).sigmas) is None  # generated grids: unchanged
    coarse = [80.0, 5.0, 1.0, 0.2, 0.002, 0.0]
    listed = load_config(gauss, [("grid.kind", "list"), ("grid.sigmas", coarse)])
    g = reference_grid(listed, torch.tensor(coarse, dtype=torch.float64))
    assert (g.kind, g.rho, g.sigma_min, g.sigma_max) == ("karras", 7.0, 0.002, 80.0)
    ref = api.prepare(listed, "edm", 99, grid=g)
    assert ref.nfe == 99 and len(ref.sigmas) == 51 and float(ref.sigmas[0]) == 80.0
    # end to end: the row's reference is that Karras solve, not the coarse list
    from iia_cli.experiments.evaluate import evaluate

    res = evaluate(listed, methods=["ddim"], fid=False, csv=gauss.parent / "list.csv")
    fields = json.loads(res.rows[0]["identity_fields"])
    want = hashlib.sha256(ref.sigmas.numpy().tobytes()).hexdigest()
    assert fields["reference"]["nfe"] == 99 and fields["reference"]["sigmas_sha256"] == want


def test_cli_grid_then_evaluate_and_calibrate(cli, gauss, tmp_path):
    out = tmp_path / "gits.json"
    r = cli(["grid", "--config", gauss, "--method", "ddim", "--nfe", "5", "--search", "gits", "--out", out,
             "--candidates", "12", "--noises", "4", "--teacher-substeps", "2"])
    assert r.exit_code == 0, r.output
    gf = load_grid_file(out)
    assert gf.nfe == 5 and gf.solver == "ddim" and gf.search["kind"] == "gits" and len(gf.sigmas) == 6
    assert gf.search["candidates"]["n"] == 12 and gf.search["noises"] == 4
    use = ["--set", "grid.kind=file", "--set", f"grid.path={out}", "--set", f"calibration.out_dir={tmp_path / 'c'}",
           "--set", "calibration.samples=8", "--set", "calibration.val_samples=4"]
    r = cli(["calibrate", "--config", gauss, "--method", "iia-ddim", "--nfe", "5", *use])
    assert r.exit_code == 0, r.output
    coeff = json.loads(next((tmp_path / "c").glob("*.json")).read_text())
    assert coeff["grid_kind"] == "file" and coeff["grid_params"] == {"sha256": gf.sha256}
    assert coeff["sigmas"] == gf.sigmas
    r = cli(["evaluate", "--config", gauss, "--nfe", "5", "--methods", "ddim,iia-ddim", "--no-fid",
             "--csv", tmp_path / "r.csv", *use])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [row["method"] for row in rows] == ["ddim", "iia-ddim"]
    for row in rows:
        fields = json.loads(row["identity_fields"])
        assert fields["grid"] == "file" and fields["grid.sha256"] == gf.sha256
        assert fields["grid.sigmas_sha256"] == hashlib.sha256(gf.tensor().numpy().tobytes()).hexdigest()
        assert fields["reference"]["nfe"] == 99  # the reference's own fine grid, not the 6 sigmas of the file
    r = cli(["evaluate", "--config", gauss, "--nfe", "6", "--methods", "ddim", "--no-fid", "--csv", tmp_path / "x.csv",
             *use])
    assert r.exit_code == 2 and "NFE 5 in the file, 6 in the run" in r.output
    r = cli(["grid", "--config", gauss, "--nfe", "5", "--search", "dp", "--out", tmp_path / "y.json"])
    assert r.exit_code == 2 and "choose one of gits, learned" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("nfe", [4, 6])
def test_gits_lowers_ddim_error_on_gmm_mnist(nfe):
    cfg = load_config(ROOT / "configs" / "mnist-gmm.yaml", [("sampler.batch", 64)])
    gf = search_grid(cfg, "ddim", nfe, settings=SearchSettings(candidates=40, noises=16, teacher_substeps=3),
                     log=lambda s: None)
    karras = api.prepare(cfg, "ddim", nfe)
    ref = api.prepare(cfg, "edm", 199, model=karras.model, fingerprint=karras.fingerprint)
    seeds = list(range(48))

    def final(p, sigmas):
        from iia_cli.core.sampling import sample_batches

        return torch.cat([x for _, x in sample_batches(p.model, p.method, sigmas, seeds, 64, None, p.device,
                                                       p.state_dtype)])

    x_ref = final(ref, ref.sigmas)
    err_k = float(((final(karras, karras.sigmas) - x_ref) ** 2).mean().sqrt())
    err_g = float(((final(karras, gf.tensor()) - x_ref) ** 2).mean().sqrt())
    assert err_g < 0.85 * err_k, (err_g, err_k)
