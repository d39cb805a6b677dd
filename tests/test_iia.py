"""IIA: exact reproduction of base solvers, least squares, calibration quality and the coefficient file."""

import json

import pytest
import torch

from iia_cli import api
from iia_cli.calibration.iia import CalibrationSetup, greedy_pass
from iia_cli.calibration.lstsq import accumulate_normal_equations, solve_least_squares
from iia_cli.config.experiment import load_config
from iia_cli.core.methods import IIA_METHODS, make_method
from iia_cli.core.sampling import BoundDenoiser, make_noise, run_steps
from iia_cli.models.gaussian import GaussianModel
from toy_models import DiagonalGaussian

MODEL = GaussianModel(shape=(1, 4, 4), std=0.5)
NFE = {"iia-edm": 7, "biia-edm": 7, "iia-ddim": 6, "iia-dpm-solver++-2m": 5, "iia-dpm-solver++-3m": 5, "iia-ipndm": 5,
       "iia-dpm-solver++-3m-exact": 5, "iia-unipc": 5}


def _cfg(tmp_path, **sampler):
    cfg = load_config(None, [("model.kind", "gaussian"), ("model.shape", [1, 4, 4]),
                             ("calibration.samples", 40), ("calibration.val_samples", 16),
                             ("calibration.out_dir", str(tmp_path / "coeffs"))]
                      + [(f"sampler.{k}", v) for k, v in sampler.items()])
    return cfg


@pytest.mark.parametrize("name", IIA_METHODS)
def test_sampling_applies_each_steps_coefficients_to_that_steps_quantities(name):
    """run_steps with coefficients at one step j equals an independent rollout: the base solver's steps, at step j
    the base update plus sum_k c_k q_k (quantities from the uncorrected step's state and record), then the base
    solver again from the corrected state. Catches a coefficient applied at the wrong step, quantities taken
    from the wrong state, or a correction that never reaches the sample."""
    from iia_cli.core.solvers.base import push

    iia = make_method(name)
    sig = api.build_grid(load_config(None), iia, MODEL, NFE[name])[0]
    x0 = make_noise(range(5), MODEL.shape, torch.device("cpu"))[0].double() * 80
    den = BoundDenoiser(MODEL)
    lengths, x, hist = [], x0.clone(), ()
    for i in range(len(sig) - 1):  # which steps have quantities, and how many
        res = iia.solver.step(den, x, sig, i, hist)
        q = iia.quantities(x, res.record, hist, sig, i)
        lengths.append(len(q) if q else 0)
        hist, x = push(hist, res.record), res.x_next
    base_final = x
    corrected = [i for i, n in enumerate(lengths) if n]
    assert corrected, "the method corrects at least one step"
    for j in (corrected[0], corrected[-1]):
        coeffs = [[0.0] * n for n in lengths]
        coeffs[j] = [0.02 * (k + 1) * (-1) ** k for k in range(lengths[j])]
        got = run_steps(iia, BoundDenoiser(MODEL), x0.clone(), sig, coeffs=coeffs)
        x, hist = x0.clone(), ()
        for i in range(len(sig) - 1):
            res = iia.solver.step(den, x, sig, i, hist)
            x_next = res.x_next
            if i == j:
                q = iia.quantities(x, res.record, hist, sig, i)
                assert all(float(qk.abs().max()) > 0 for qk in q)
                x_next = x_next + sum(c * qk for c, qk in zip(coeffs[j], q))
            hist, x = push(hist, res.record), x_next
        torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-10)
        assert float((got - base_final).abs().max()) > 1e-6  # the correction reaches the sample


def test_iia_edm_paper_coefficients_give_heun():
    """Eq. (18) with b^u = h/sigma_i, b^v = h/(2 sigma_{i+1}) and others 0 is Heun (Lemma 1)."""
    iia = make_method("iia-edm", r=1)
    sig = api.build_grid(load_config(None), iia, MODEL, 9)[0]
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * 80
    den = BoundDenoiser(MODEL)
    from iia_cli.core.solvers.base import push

    hist = ()
    for i in range(len(sig) - 1):
        res = iia.solver.step(den, x, sig, i, hist)
        q = iia.quantities(x, res.record, hist, sig, i)
        if q:
            s, s1 = float(sig[i]), float(sig[i + 1])
            h = s1 - s
            paper = x + (h / s) * q[0] + (h / (2 * s1)) * q[1] + 0 * q[2] + 0 * q[3]
            torch.testing.assert_close(paper, res.x_next, rtol=1e-12, atol=1e-9)
        hist, x = push(hist, res.record), res.x_next


def test_paper_coefficients_of_zero_corrections_are_heun():
    """Zero corrections in the paper's parameterisation are Lemma 1's b = (h/sigma_i, h/(2 sigma_{i+1}), 0, 0)."""
    from iia_cli.calibration.coefficients import paper_coefficients

    sig = torch.tensor([80.0, 10.0, 1.0, 0.0], dtype=torch.float64)
    b = paper_coefficients("iia-edm", sig, [[], [0.0, 0.0, 0.0, 0.0], []])
    assert b[0] == [] and b[2] == [] and b[1] == pytest.approx([-9 / 10, -9 / 2, 0.0, 0.0])
    assert paper_coefficients("biia-edm", sig, [[0.5], [0.0, 0.1], []]) == [[1.5], [1.0, 0.1], []]
    assert paper_coefficients("iia-ddim", sig, [[], [0.3, 0.2], []]) == []


def test_least_squares_recovers_known_coefficients_and_chunking_is_exact():
    torch.manual_seed(1)
    c_true = torch.tensor([0.7, -1.3, 0.05], dtype=torch.float64)
    q = [torch.randn(60, 3, 5, dtype=torch.float64) for _ in range(3)]
    r = sum(c * qk for c, qk in zip(c_true, q)) + 1e-6 * torch.randn(60, 3, 5, dtype=torch.float64)
    G1, g1 = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    accumulate_normal_equations(q, r, G1, g1)
    G2, g2 = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for k in range(0, 60, 7):
        accumulate_normal_equations([qk[k:k + 7] for qk in q], r[k:k + 7], G2, g2)
    torch.testing.assert_close(G1, G2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    c = solve_least_squares(G1, g1, ridge=1e-12)
    torch.testing.assert_close(c, c_true, rtol=0, atol=1e-5)


def test_greedy_pass_is_independent_of_chunk_size():
    model = DiagonalGaussian()
    m = make_method("iia-ddim")
    sig = api.build_grid(load_config(None), m, model, 6)[0]
    a = greedy_pass(CalibrationSetup(m, model, sig, 4, 30, torch.device("cpu"), torch.float64), list(range(30)))
    b = greedy_pass(CalibrationSetup(m, model, sig, 4, 7, torch.device("cpu"), torch.float64), list(range(30)))
    assert sum(len(c) for c in a.coeffs) == 8  # steps 1..4 corrected, 2 quantities each
    for ca, cb in zip(a.coeffs, b.coeffs):
        torch.testing.assert_close(torch.tensor(ca), torch.tensor(cb), rtol=1e-6, atol=1e-12)
    assert a.residual_iia == pytest.approx(b.residual_iia, rel=1e-6, nan_ok=True)
    # 6 coarse calls + 4 corrected steps x M = 4 fine calls per noise
    assert a.calls == b.calls == 6 + 4 * 4


@pytest.mark.parametrize("name", IIA_METHODS)
def test_calibrated_iia_beats_base_on_gaussian(tmp_path, name):
    """Final-sample error against the closed-form ODE solution on held-out seeds."""
    cfg = _cfg(tmp_path, method=name, nfe=NFE[name])
    cs, path = api.calibrate(cfg, log=lambda m: None)
    p = api.prepare(cfg)
    seeds = list(range(100, 116))
    x = make_noise(seeds, MODEL.shape, torch.device("cpu"))[0].double() * float(p.sigmas[0])
    exact = p.model.exact_solution(x, float(p.sigmas[0]), float(p.sigmas[-1]))
    base = run_steps(p.method, BoundDenoiser(p.model), x, p.sigmas)
    iia = run_steps(p.method, BoundDenoiser(p.model), x, p.sigmas, coeffs=cs.coefficients)
    err_base = float((base - exact).pow(2).mean().sqrt())
    err_iia = float((iia - exact).pow(2).mean().sqrt())
    assert err_iia < 0.5 * err_base, (err_iia, err_base)
    data = json.loads(path.read_text())
    assert data["model_sha256"] == p.fingerprint and data["nfe"] == p.nfe and len(data["sigmas"]) == len(p.sigmas)
    val_b = sum(v for v in data["val_residual_base"] if v is not None)
    val_i = sum(v for v in data["val_residual_iia"] if v is not None)
    assert val_i < val_b
