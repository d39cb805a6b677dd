"""LD3-style learned grids (iia_cli.experiments.ld3): gradients through the solver step, the search on the Gaussian
model, its grid file and the CLI."""

import json
from pathlib import Path

import pytest
import torch

from iia_cli import api
from iia_cli.config.experiment import load_config
from iia_cli.core.gridfile import load_grid_file
from iia_cli.core.methods import make_method
from iia_cli.core.sampling import BoundDenoiser, commit, noise_and_conditioning, propose, run_steps
from iia_cli.experiments.ld3 import LearnSettings, grid_of, logits_of, search_learned
from iia_cli.models.gaussian import GaussianModel
from iia_cli.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GAUSS = {"experiment": "ld3-test", "model": {"kind": "gaussian", "shape": [1, 4, 4]},
         "sampler": {"method": "ddim", "nfe": 4, "batch": 8},
         "evaluate": {"methods": ["ddim"], "nfe": [4], "error_samples": 8, "reference_nfe": 99}}
SOLVERS = ["ddim", "edm", "dpm-solver-2", "ipndm", "dpm-solver++-2m", "dpm-solver++-3m", "unipc", "iia-ddim",
           "biia-edm", "iia-dpm-solver++-2m"]


def _some_coefficients(method, sigmas: torch.Tensor) -> list[list[float]] | None:
    """Nonzero coefficients for every quantity an IIA method has on ``sigmas`` (a dry run finds how many)."""
    if not method.is_iia:
        return None
    x, history, coeffs = torch.ones(1, 1, 2, 2, dtype=torch.float64), (), []
    for i in range(len(sigmas) - 1):
        step = propose(method, lambda z, s: 0.5 * z, x, sigmas, i, history)
        coeffs.append([0.1 * (k + 1) for k in range(len(step.quantities or []))])
        x, history = commit(step, history)
    return coeffs


@pytest.mark.parametrize("name", SOLVERS)
def test_gradients_through_advance_match_finite_differences(name):
    """d(final state)/d(sigmas, x) of a few solver steps (one step, and three for the multistep solvers' history)
    on the Gaussian model, by autograd through sampling.run_steps/advance, against central finite differences."""
    model = GaussianModel(shape=(1, 2, 2))
    method = make_method(name)
    x0 = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3.0
    for positive in ([3.0, 1.2], [3.0, 1.7, 0.9, 0.4]):
        coeffs = _some_coefficients(method, torch.tensor(positive + [0.0], dtype=torch.float64))

        def final(sig: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            sigmas = torch.cat([sig, sig.new_zeros(1)])
            return run_steps(method, BoundDenoiser(model), x, sigmas, coeffs)

        sig = torch.tensor(positive, dtype=torch.float64, requires_grad=True)
        x = x0.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(final, (sig, x), eps=1e-6, atol=1e-6, rtol=1e-5)
        # the values are those of the float path sampling takes (which sees plain sigmas)
        plain = run_steps(method, BoundDenoiser(model), x0, torch.cat([sig.detach(), sig.new_zeros(1)]), coeffs)
        torch.testing.assert_close(final(sig, x), plain, rtol=1e-12, atol=1e-12)


def test_grid_parameterisation_is_monotone_with_exact_ends():
    init = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=torch.float64)
    theta = logits_of(init)
    torch.testing.assert_close(grid_of(theta, 80.0, 0.002, False), init, rtol=1e-13, atol=0)
    for seed in range(5):
        theta = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
        g = grid_of(theta, 80.0, 0.002, True)
        assert float(g[0]) == 80.0 and float(g[-2]) == 0.002 and float(g[-1]) == 0.0 and len(g) == 8
        assert bool((g[:-1] > g[1:]).all())


def _exact_error(cfg, sigmas: torch.Tensor, n: int = 128) -> float:
    """RMSE of DDIM's final samples on ``sigmas`` against the exact solution, on evaluation seeds 0..n-1."""
    p = api.prepare(cfg, "ddim", len(sigmas) - 1)
    noise, _ = noise_and_conditioning(p.model, list(range(n)), p.device)
    x0 = noise.to(torch.float64) * float(sigmas[0])
    exact = p.model.exact_solution(x0, float(sigmas[0]), 0.0)
    x = run_steps(p.method, BoundDenoiser(p.model), x0, sigmas)
    return float(((x - exact) ** 2).mean().sqrt())


@pytest.fixture
def gauss(write_config):
    return write_config(GAUSS, "gauss.yaml")


@pytest.mark.parametrize("loss", ["mse", "soft"])
def test_learned_grid_lowers_exact_error_on_gaussian(gauss, loss):
    cfg = load_config(gauss)
    settings = LearnSettings(iterations=40, noises=16, val_noises=16, batch=16, loss=loss, teacher="edm",
                             teacher_steps=20, teacher_substeps=2)
    gf = search_learned(cfg, "ddim", 4, settings, log=lambda s: None)
    karras = api.prepare(cfg, "ddim", 4).sigmas
    assert len(gf.sigmas) == 5 and gf.sigmas[0] == float(karras[0]) and gf.sigmas[-1] == 0.0
    assert gf.search["kind"] == "learned" and gf.search["loss"] == loss
    assert gf.search["val_mse"] < 0.8 * gf.search["val_mse_init"]
    err_k, err_l = _exact_error(cfg, karras), _exact_error(cfg, gf.tensor())
    assert err_l < 0.85 * err_k, (err_l, err_k)


@pytest.mark.parametrize("kind", ["time-uniform", "logsnr"])
def test_a_search_starts_from_the_runs_fixed_grid_and_never_validates_worse(gauss, kind):
    """With grid.kind a fixed grid (a solver's best, say), the search starts there: no iteration returns that
    grid (up to exp(log)), and a short search validates no worse than it."""
    cfg = load_config(gauss, [("grid.kind", kind)])
    start = api.prepare(cfg, "ddim", 4).sigmas
    none = search_learned(cfg, "ddim", 4, LearnSettings(iterations=0, noises=4, val_noises=4, batch=4,
                                                        teacher="exact"), log=lambda s: None)
    assert none.search["init"]["kind"] == kind and none.search["best_iteration"] == 0
    torch.testing.assert_close(none.tensor(), start.to(none.tensor().dtype), rtol=1e-12, atol=0)
    some = search_learned(cfg, "ddim", 4, LearnSettings(iterations=10, noises=4, val_noises=4, batch=4,
                                                        teacher="exact"), log=lambda s: None)
    assert some.search["val_mse"] <= some.search["val_mse_init"] == none.search["val_mse_init"]


def test_learned_grid_file_round_trips_and_is_refused_elsewhere(gauss, tmp_path):
    cfg = load_config(gauss)
    gf = search_learned(cfg, "ddim", 4, LearnSettings(iterations=5, noises=4, val_noises=4, batch=4,
                                                      teacher="exact"), log=lambda s: None)
    path = gf.save(tmp_path / "ld3.json")
    back = load_grid_file(path)
    assert back.sigmas == gf.sigmas and back.search["kind"] == "learned"
    assert back.search["denoiser_calls"]["training"] == 5 * 4 * 4  # 5 iterations x 4 noises x NFE 4
    use = [("grid.kind", "file"), ("grid.path", str(path))]
    assert torch.equal(api.prepare(load_config(gauss, use), "iia-ddim", 4).sigmas, back.tensor())
    with pytest.raises(ConfigError, match="NFE 4 in the file, 5 in the run"):
        api.prepare(load_config(gauss, use), "ddim", 5)
    with pytest.raises(ConfigError, match="solver ddim in the file .* ipndm in the run"):
        api.prepare(load_config(gauss, use), "ipndm", 4)


def test_a_model_without_gradient_is_refused(gauss, monkeypatch):
    plain = GaussianModel.__call__

    def no_grad_call(self, *args, **kwargs):
        with torch.no_grad():
            return plain(self, *args, **kwargs)

    monkeypatch.setattr(GaussianModel, "__call__", no_grad_call)
    with pytest.raises(ConfigError, match="not differentiable.*--search gits"):
        search_learned(load_config(gauss), "ddim", 4, LearnSettings(iterations=2, noises=2, val_noises=2,
                                                                    teacher="exact"), log=lambda s: None)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="--loss 'l1'"):
        LearnSettings(loss="l1")
    with pytest.raises(ConfigError, match="--lr"):
        LearnSettings(lr=0.0)
    with pytest.raises(ConfigError, match="--val-noises"):
        LearnSettings(val_noises=0)


def test_cli_grid_learned_then_evaluate(cli, gauss, tmp_path):
    out = tmp_path / "learned.json"
    r = cli(["grid", "--config", gauss, "--method", "ipndm", "--nfe", "5", "--search", "learned", "--out", out,
             "--iterations", "6", "--lr", "0.05", "--noises", "8", "--val-noises", "4", "--batch", "4",
             "--loss", "mse", "--teacher-steps", "10", "--teacher-substeps", "2"])
    assert r.exit_code == 0, r.output
    gf = load_grid_file(out)
    assert (gf.nfe, gf.solver, gf.search["kind"], gf.search["noises"], gf.search["loss"]) == (5, "ipndm", "learned",
                                                                                             8, "mse")
    assert gf.search["optimizer"] == {"kind": "adam", "lr": 0.05, "iterations": 6, "batch": 4}
    r = cli(["evaluate", "--config", gauss, "--nfe", "5", "--methods", "ipndm", "--no-fid", "--csv",
             tmp_path / "r.csv", "--set", "grid.kind=file", "--set", f"grid.path={out}"])
    assert r.exit_code == 0, r.output
    r = cli(["grid", "--config", gauss, "--nfe", "5", "--search", "nope", "--out", tmp_path / "y.json"])
    assert r.exit_code == 2 and "choose one of gits, learned" in r.output
    assert json.loads(out.read_text())["search"]["kind"] == "learned"
