"""Parity with the published implementations (issue 13): k-diffusion's samplers and diffusers' schedulers
run on the same nonlinear denoiser and the same sigmas as our solvers, to 1e-10 in float64.

The denoiser is a small isotropic Gaussian mixture with its exact posterior mean (so D is nonlinear in x
and every solver's weighting matters). diffusers runs on a discrete-time model through our diffusers
adapter (``DiscreteUNetDenoiser``) around a stand-in UNet that returns the mixture's exact epsilon.
UniPC on EDM sigmas is checked against an independent implementation written here in the reference
code's own loop structure (model call at the predicted point, corrector first, then predictor).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from iia_cli.config.experiment import GridConfig
from iia_cli.core.grids import make_grid, make_karras_grid
from iia_cli.core.methods import make_method
from iia_cli.core.sampling import BoundDenoiser, run_steps

NFES = (5, 6, 10)
TOL = dict(rtol=0, atol=1e-10)


class Mixture:
    """p(x0) = sum_k pi_k N(mu_k, tau^2 I) on [1, 4, 4]; D(x; sigma) = E[x0 | x0 + sigma n = x], float64."""

    shape = (1, 4, 4)
    dtype = torch.float64
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, k: int = 3, tau: float = 0.3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(k, 16, generator=g, dtype=torch.float64) * 2 - 1
        self.log_pi = torch.log(torch.tensor([0.5, 0.3, 0.2][:k], dtype=torch.float64))
        self.tau2 = tau**2

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        x = x.to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2
        flat = x.reshape(x.shape[0], 1, -1)  # [B, 1, d]
        var = self.tau2 + s2  # [B, 1, 1]
        logits = self.log_pi - ((flat - self.mu) ** 2).sum(-1) / (2 * var[:, :, 0])  # [B, K]
        w = torch.softmax(logits, dim=1).unsqueeze(-1)  # [B, K, 1]
        means = self.mu + (self.tau2 / var) * (flat - self.mu)  # [B, K, d]
        return (w * means).sum(1).reshape(x.shape)


MODEL = Mixture()


def _ours(name: str, sigmas: torch.Tensor, x: torch.Tensor, convention: str = "iia") -> tuple[torch.Tensor, int]:
    den = BoundDenoiser(MODEL)
    return run_steps(make_method(name, convention=convention), den, x, sigmas), den.calls


def _noise(n: int = 6) -> torch.Tensor:
    return torch.randn(n, *MODEL.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _karras(n: int, zero: bool = True) -> torch.Tensor:
    s = make_karras_grid(n, 0.002, 80.0)
    return torch.cat([s, s.new_zeros(1)]) if zero else s


# ------------------------------------------------------------------------------------------------
# k-diffusion (MIT): only k_diffusion.sampling is imported; its package __init__ pulls heavy modules.
# ------------------------------------------------------------------------------------------------


def _k_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion torchdiffeq torchsde trampoline)")
    return _load_k_sampling(spec.submodule_search_locations[0])


@functools.cache
def _load_k_sampling(folder: str):
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [folder]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    try:
        path = Path(folder) / "sampling.py"
        mod_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def _k_run(fn_name: str, sigmas: torch.Tensor, x: torch.Tensor, **kw) -> tuple[torch.Tensor, int]:
    ks = _k_sampling()
    calls = []

    def model(x, sigma):
        calls.append(1)
        return MODEL(x, sigma)

    return getattr(ks, fn_name)(model, x * sigmas[0], sigmas, disable=True, **kw), len(calls)


# (our method, k-diffusion sampler, sigmas for an NFE). Heun: (K+1)/2 sigmas + 0 for odd K, K/2 Heun steps
# to sigma_min for even K; DPM-2: 2-call steps, a final Euler step to 0 for odd K.
def _grid_for(name: str, nfe: int) -> torch.Tensor:
    if name in ("edm", "dpm-solver-2"):
        return _karras((nfe + 1) // 2, True) if nfe % 2 else _karras(nfe // 2 + 1, False)
    return _karras(nfe, True)


K_CASES = [("ddim", "sample_euler", {}), ("edm", "sample_heun", {}), ("dpm-solver-2", "sample_dpm_2", {}),
           ("dpm-solver++-2m", "sample_dpmpp_2m", {}),
           ("dpm-solver++-3m", "sample_dpmpp_3m_sde", {"eta": 0.0, "noise_sampler": lambda s, t: 0.0})]


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("name, fn, kw", K_CASES, ids=[c[0] for c in K_CASES])
def test_k_diffusion_parity(name, fn, kw, nfe):
    sigmas = _grid_for(name, nfe)
    x = _noise()
    theirs, their_calls = _k_run(fn, sigmas, x, **kw)
    ours, calls = _ours(name, sigmas, x * sigmas[0])
    assert calls == their_calls == nfe
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("nfe", NFES)
def test_3m_exact_differs_from_public(nfe):
    """The exact-integral weighting (2 phi_3) is a different solver: it must not equal k-diffusion's 3M."""
    sigmas = _karras(nfe)
    x = _noise()
    theirs, _ = _k_run("sample_dpmpp_3m_sde", sigmas, x, eta=0.0, noise_sampler=lambda s, t: 0.0)
    exact, _ = _ours("dpm-solver++-3m-exact", sigmas, x * sigmas[0])
    assert (exact - theirs).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# diffusers schedulers on a discrete-time model through our adapter
# ------------------------------------------------------------------------------------------------

T = 1000


class MixtureEpsUNet(torch.nn.Module):
    """Stands in for a diffusers UNet2DModel: eps(z, t) of the mixture at integer timestep t, float64."""

    def __init__(self, abar: torch.Tensor) -> None:
        super().__init__()
        self.abar = abar
        self.config = SimpleNamespace(sample_size=4, in_channels=1, num_class_embeds=None,
                                      time_embedding_type="positional")

    def forward(self, z: torch.Tensor, t, class_labels=None):
        t = torch.as_tensor(t).reshape(-1).expand(z.shape[0])
        assert torch.equal(t, t.round()), "diffusers timesteps are integers"
        abar = self.abar[t.long()].reshape(-1, 1, 1, 1)
        sigma = ((1 - abar) / abar).sqrt()
        x = z / abar.sqrt()
        eps = (x - MODEL(x, sigma.reshape(-1))) / sigma
        return SimpleNamespace(sample=eps)


def _abar() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


def _adapter():
    from iia_cli.models.diffusers_unet import DiscreteUNetDenoiser, PredictionType, TimestepLookup

    abar = _abar()
    return DiscreteUNetDenoiser(MixtureEpsUNet(abar), abar, prediction_type=PredictionType.EPSILON,
                                dtype=torch.float64, timestep_lookup=TimestepLookup.NEAREST,
                                source_sha256="0" * 64, device=torch.device("cpu"))


def _float64_scheduler(scheduler) -> torch.Tensor:
    """diffusers keeps sigmas in float32; give it the float64 schedule (same timesteps) for a 1e-10 check.
    Returns our EDM sigmas: the scheduler's, as float64."""
    abar = _abar()
    scheduler.alphas_cumprod = abar
    ts = scheduler.timesteps.long()
    sig = ((1 - abar[ts]) / abar[ts]).sqrt()
    last = float(scheduler.sigmas[-1])
    tail = torch.zeros(1, dtype=torch.float64) if last == 0 else ((1 - abar[:1]) / abar[:1]).sqrt()
    if hasattr(scheduler, "sigmas"):
        scheduler.sigmas = torch.cat([sig, tail])
    return torch.cat([sig, tail])


def _diffusers_loop(scheduler, model, sigmas: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    abar0 = 1 / (1 + sigmas[0] ** 2)
    z = x * sigmas[0] * abar0.sqrt()
    calls = 0
    for t in scheduler.timesteps:
        eps = model.unet(z, t).sample
        calls += 1
        z = scheduler.step(eps, t, z).prev_sample
    last = float(sigmas[-1])
    return z * math.sqrt(1 + last**2), calls  # back to EDM's x (z / sqrt(abar))


def _assert_same_as_diffusers(scheduler, method, sigmas, nfe, model, x):
    """Our method on ``sigmas`` equals diffusers' scheduler loop from the same noise, with the same calls."""
    theirs, their_calls = _diffusers_loop(scheduler, model, sigmas, x)
    den = BoundDenoiser(model)
    ours = run_steps(method, den, x * sigmas[0], sigmas)
    assert den.calls == their_calls == nfe
    torch.testing.assert_close(ours, theirs, **TOL)


def _diffusers():
    return pytest.importorskip("diffusers")


class _Float64Torch:
    """``torch`` with ``float32`` meaning float64, for DPMSolverMultistepScheduler.step's cast of the sample
    to float32 (meant as an upcast from half precision): with it the comparison can be at 1e-10 in float64;
    without it the two agree to float32 rounding (about 6e-8)."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("order, final, convention", [(2, "zero", "iia"), (2, "sigma_min", "diff-sampler"),
                                                      (3, "sigma_min", "diff-sampler"), (3, "zero", "diff-sampler")])
def test_diffusers_dpmsolver_multistep_parity(order, final, convention, nfe, monkeypatch):
    """DPMSolverMultistepScheduler (dpmsolver++, data prediction). Below 15 steps it lowers the order at
    the last steps and warms up with the 2M update: our diff-sampler convention's rules (on the same
    sigmas, ending in 0 or at sigma_min). Order 2 ending in 0 is also our default 2M."""
    diffusers = _diffusers()
    from diffusers.schedulers import scheduling_dpmsolver_multistep as module

    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                                      beta_schedule="linear", solver_order=order,
                                                      algorithm_type="dpmsolver++", final_sigmas_type=final,
                                                      lower_order_final=True)
    scheduler.set_timesteps(nfe)
    sigmas = _float64_scheduler(scheduler)
    model, x = _adapter(), _noise()
    monkeypatch.setattr(module, "torch", _Float64Torch())
    method = make_method(f"dpm-solver++-{order}m", convention=convention)
    _assert_same_as_diffusers(scheduler, method, sigmas, nfe, model, x)


@pytest.mark.parametrize("nfe", NFES)
def test_diffusers_ddim_parity(nfe):
    diffusers = _diffusers()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                        clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(nfe)
    scheduler.alphas_cumprod = _abar()
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    ts = scheduler.timesteps.long()
    abar = _abar()
    sigmas = torch.cat([((1 - abar[ts]) / abar[ts]).sqrt(), torch.zeros(1, dtype=torch.float64)])
    model, x = _adapter(), _noise()
    _assert_same_as_diffusers(scheduler, make_method("ddim"), sigmas, nfe, model, x)


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_diffusers_unipc_parity(final, nfe):
    diffusers = _diffusers()
    scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                                  beta_schedule="linear", solver_order=3, solver_type="bh2",
                                                  predict_x0=True, lower_order_final=True, final_sigmas_type=final)
    scheduler.set_timesteps(nfe)
    sigmas = _float64_scheduler(scheduler)
    model, x = _adapter(), _noise()
    _assert_same_as_diffusers(scheduler, make_method("unipc"), sigmas, nfe, model, x)


# ------------------------------------------------------------------------------------------------
# UniPC on EDM sigmas against an independent implementation
# ------------------------------------------------------------------------------------------------


def _reference_unipc(sigmas: torch.Tensor, x: torch.Tensor, order: int = 3) -> torch.Tensor:
    """UniPC-bh2, data prediction, written from the paper's Algorithms 1-2 in the reference code's loop
    form: call the model at the current (predicted) point, correct the previous step with that value
    (UniC), then predict (UniP). Polynomial weights by a direct solve of the order conditions."""
    lam = [-math.log(float(s)) if float(s) > 0 else math.inf for s in sigmas]
    n = len(sigmas) - 1
    ms, prev = [], None  # model values (most recent last); prev = (x_prev, order, step index)

    def weights(h, rks, p):
        hh = -h
        # g_k = h phi_{k+1}(h) k! / B(h), from phi_1 = expm1(hh)/hh: phi_{k+1} = (phi_k - 1/k!)/hh
        phis, phi, fact = [], math.expm1(hh) / hh, 1.0
        for k in range(1, p + 1):
            phi = (phi - 1 / fact) / hh  # phi_{k+1}
            phis.append(phi * hh * fact / math.expm1(hh))
            fact *= k + 1
        R = torch.tensor([[r ** (k - 1) for r in rks] for k in range(1, p + 1)], dtype=torch.float64)
        return R, torch.tensor(phis, dtype=torch.float64)

    def update(x_s, i, p, m_new=None):
        h = lam[i + 1] - lam[i]
        m0 = ms_at[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
        d1 = [(ms_at[i - k] - m0) / r for k, r in zip(range(1, p), rks)]
        sig_ratio = float(sigmas[i + 1] / sigmas[i])
        if math.isinf(h):
            return m0
        base = sig_ratio * x_s - math.expm1(-h) * m0
        if m_new is None:  # predictor over the p - 1 past differences
            if p == 1:
                return base
            R, g = weights(h, rks + [1.0], p)
            a = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], g[:-1]).tolist()
            return base - math.expm1(-h) * sum(ai * di for ai, di in zip(a, d1))
        R, g = weights(h, rks + [1.0], p)
        c = [0.5] if p == 1 else torch.linalg.solve(R, g).tolist()
        terms = d1 + [m_new - m0]
        return base - math.expm1(-h) * sum(ci * ti for ci, ti in zip(c, terms))

    ms_at = {}
    x_cur = x
    for i in range(n):
        ms_at[i] = MODEL(x_cur, sigmas[i].expand(x.shape[0]))
        if prev is not None:
            x_prev, p_prev, j = prev
            x_cur = update(x_prev, j, p_prev, ms_at[i])
        p = min(order, i + 1, n - i)
        prev = (x_cur, p, i)
        x_cur = update(x_cur, i, p)
    return x_cur


@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("zero", [True, False])
def test_unipc_matches_independent_implementation(nfe, zero):
    sigmas = _karras(nfe, True) if zero else _karras(nfe + 1, False)
    x = _noise() * 80.0
    ours, calls = _ours("unipc", sigmas, x)
    ref = _reference_unipc(sigmas, x)
    assert calls == nfe
    torch.testing.assert_close(ours, ref, **TOL)


# ------------------------------------------------------------------------------------------------
# The diff-sampler convention: grids and lower-order rules (checked on the mixture, independent loops)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, nfe, n_sigmas", [("ddim", 5, 6), ("ipndm", 10, 11), ("dpm-solver++-2m", 6, 7),
                                                 ("dpm-solver++-3m", 10, 11), ("unipc", 5, 6), ("edm", 10, 6),
                                                 ("dpm-solver-2", 6, 4)])
def test_diff_sampler_convention_grid(name, nfe, n_sigmas):
    method = make_method(name, convention="diff-sampler")
    sigmas = make_grid(GridConfig(), method.solver.plan(nfe), MODEL)
    assert len(sigmas) == n_sigmas and abs(float(sigmas[-1]) - 0.002) < 1e-15 and float(sigmas[0]) == 80.0
    den = BoundDenoiser(MODEL)
    run_steps(method, den, _noise() * 80.0, sigmas)
    assert den.calls == nfe == method.solver.nfe_of_grid(sigmas)
    assert method.params == {"convention": "diff-sampler"}


def test_diff_sampler_convention_refuses_odd_heun_nfe():
    from iia_cli.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="even NFE.*nearest valid: 8 or 10"):
        make_method("edm", convention="diff-sampler").solver.plan(9)
    with pytest.raises(ConfigError, match="sampler.convention='x'"):
        make_method("edm", convention="x")


@pytest.mark.parametrize("nfe", NFES)
def test_diff_sampler_dpmpp_3m_rules(nfe):
    """diff-sampler's dpm_pp_sampler(max_order=3): order min(3, i + 1, steps left), the 2M update as its
    second order, phi_3 weighting, NFE + 1 Karras points to sigma_min, no final denoise (an independent loop
    here, without its dynamic thresholding)."""
    sig = _karras(nfe + 1, False)
    x = _noise() * 80.0
    lam = -sig.log()
    ms, xs = [], x
    for i in range(nfe):
        ms.append(MODEL(xs, sig[i].expand(x.shape[0])))
        p = min(3, i + 1, nfe - i)
        h = float(lam[i + 1] - lam[i])
        phi1 = math.expm1(-h)
        new = float(sig[i + 1] / sig[i]) * xs - phi1 * ms[-1]
        if p >= 2:
            r0 = float(lam[i] - lam[i - 1]) / h
            d10 = (ms[-1] - ms[-2]) / r0
            if p == 2:
                new = new - 0.5 * phi1 * d10
            else:
                r1 = float(lam[i - 1] - lam[i - 2]) / h
                d11 = (ms[-2] - ms[-3]) / r1
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                new = new + phi2 * (d10 + r0 / (r0 + r1) * (d10 - d11)) - phi3 * (d10 - d11) / (r0 + r1)
        xs = new
    ours, _ = _ours("dpm-solver++-3m", sig, x, convention="diff-sampler")
    torch.testing.assert_close(ours, xs, **TOL)
    default, _ = _ours("dpm-solver++-3m", sig, x)
    assert (default - xs).abs().max() > 1e-6  # the default (k-diffusion) rules differ on this grid


def test_convention_end_to_end_and_in_coefficient_files(cli, tmp_path, write_config):
    """sampler.convention through the CLI: the diff-sampler grid (NFE + 1 sigmas ending at sigma_min), the
    convention recorded in the coefficient file, and that file refused by a run under the default convention."""
    import json

    import numpy as np

    cfg = write_config({"model": {"kind": "gaussian", "shape": [1, 4, 4]},
                        "sampler": {"method": "iia-unipc", "nfe": 6, "batch": 8},
                        "calibration": {"samples": 16, "val_samples": 0, "out_dir": str(tmp_path / "coeffs")}},
                       "c.yaml")
    ds = ["--set", "sampler.convention=diff-sampler"]
    r = cli(["calibrate", "--config", cfg, *ds])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip().splitlines()[-1])
    data = json.loads(path.read_text())
    assert data["convention"] == "diff-sampler" and data["method_params"] == {"convention": "diff-sampler"}
    assert len(data["sigmas"]) == 7 and data["sigmas"][-1] > 0 and data["nfe"] == 6
    assert "-cdiff-sampler" in path.name
    r = cli(["sample", "--config", cfg, *ds, "--seeds", "0-3", "--out", tmp_path / "a.npz"])
    assert r.exit_code == 0, r.output
    assert len(np.load(tmp_path / "a.npz")["sigmas"]) == 7
    r = cli(["sample", "--config", cfg, "--coeffs", path, "--seeds", "0-3", "--out", tmp_path / "b.npz"])
    assert r.exit_code == 2 and "convention diff-sampler != iia" in r.output
    r = cli(["sample", "--config", cfg, "--set", "sampler.convention=k-diffusion", "--seeds", "0", "--out",
             tmp_path / "c.npz"])
    assert r.exit_code == 2 and "sampler.convention='k-diffusion' is not valid; choose one of iia, diff-sampler" \
        in r.output


def test_old_3m_coefficient_files_are_refused():
    """Format-1 files of iia-dpm-solver++-3m were fitted on the exact-integral base, now -exact."""
    from iia_cli.calibration.coefficients import CoefficientSet

    sig = _karras(5)
    cs = CoefficientSet(method="iia-dpm-solver++-3m", method_params={}, model_kind="x", model_sha256="a" * 64,
                        grid_kind="karras", grid_params={}, sigmas=sig.tolist(), nfe=5, substeps=10, samples=1,
                        seeds="0", ridge=1e-8, coefficients=[], residual_base=[], residual_iia=[])
    assert cs.mismatches("iia-dpm-solver++-3m", {}, "a" * 64, "karras", sig, 5) == []
    cs.format_version = 1
    assert "dpm-solver++-3m-exact" in cs.mismatches("iia-dpm-solver++-3m", {}, "a" * 64, "karras", sig, 5)[0]


# ------------------------------------------------------------------------------------------------
# diff-sampler's published setup: dynamic thresholding of D (DPM-Solver++, UniPC) and AFS, against independent
# loops of its dpm_pp_sampler and unipc_sampler (thresholding written here from its definition)
# ------------------------------------------------------------------------------------------------

WIDE = Mixture()
WIDE.mu = WIDE.mu * 3.0  # means up to |3|: D leaves [-1, 1] late in sampling, so the thresholding rescales


def _threshold_ref(d: torch.Tensor) -> torch.Tensor:
    """Per sample: s = max(1, the 0.995 quantile of |D| with linear interpolation between order statistics),
    D clamped to [-s, s] and divided by s; one sample at a time, from sorted values."""
    out = []
    for row in d:
        v = sorted(abs(float(a)) for a in row.flatten())
        pos = 0.995 * (len(v) - 1)
        lo = math.floor(pos)
        q = v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])
        s = max(1.0, q)
        out.append(torch.tensor([min(max(float(a), -s), s) / s for a in row.flatten()],
                                dtype=d.dtype).reshape(row.shape))
    return torch.stack(out)


def _ds_model(model, thresholding: bool, afs: bool):
    """D as diff-sampler's data-prediction samplers see it: AFS's x - sigma x / sqrt(1 + sigma^2) for the first
    call when ``afs``, every value thresholded when ``thresholding``; counts the model calls."""
    state = {"first": afs, "calls": 0}

    def den(x, sigma):
        if state["first"]:
            state["first"] = False
            d = x - float(sigma) * x / math.sqrt(1 + float(sigma) ** 2)
        else:
            state["calls"] += 1
            d = model(x, torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]))
        return _threshold_ref(d) if thresholding else d

    return den, state


def _ds_dpmpp(sig: torch.Tensor, x: torch.Tensor, max_order: int, den) -> torch.Tensor:
    """diff-sampler's dpm_pp_sampler loop (predict_x0, lower_order_final): order i + 1 while i + 1 < max_order,
    then min(max_order, steps left); multistep DPM-Solver++ updates of orders 1 to 3 (phi_3 weighting)."""
    lam = -sig.log()
    n = len(sig) - 1
    ms, xs = [], x
    for i in range(n):
        ms.append(den(xs, sig[i]))
        p = i + 1 if i + 1 < max_order else min(max_order, n - i)
        h = float(lam[i + 1] - lam[i])
        phi1 = math.expm1(-h)
        new = float(sig[i + 1] / sig[i]) * xs - phi1 * ms[-1]
        if p >= 2:
            r0 = float(lam[i] - lam[i - 1]) / h
            d10 = (ms[-1] - ms[-2]) / r0
            if p == 2:
                new = new - 0.5 * phi1 * d10
            else:
                r1 = float(lam[i - 1] - lam[i - 2]) / h
                d11 = (ms[-2] - ms[-3]) / r1
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                new = new + phi2 * (d10 + r0 / (r0 + r1) * (d10 - d11)) - phi3 * (d10 - d11) / (r0 + r1)
        xs = new
    return xs


def _ds_unipc(sig: torch.Tensor, x: torch.Tensor, den, order: int = 3) -> torch.Tensor:
    """diff-sampler's unipc_sampler loop (bh2, predict_x0, lower_order_final): D at sigma_0, then per step the
    predictor, the model at the predicted point (thresholded), the corrector (none at the last step)."""
    lam = [-math.log(float(s)) for s in sig]
    n = len(sig) - 1
    buf = [(lam[0], den(x, sig[0]))]  # (lambda, D), most recent last
    xs = x
    for i in range(n):
        p = i + 1 if i + 1 < order else min(order, n - i)
        h = lam[i + 1] - lam[i]
        l0, m0 = buf[-1]
        rks = [(buf[-(k + 1)][0] - l0) / h for k in range(1, p)]
        d1s = [(buf[-(k + 1)][1] - m0) / r for k, r in zip(range(1, p), rks)]
        hh = -h
        b_h = math.expm1(hh)
        r_all = torch.tensor(rks + [1.0], dtype=torch.float64)
        phi_k, fact, b = math.expm1(hh) / hh - 1, 1, []
        for k in range(1, p + 1):
            b.append(phi_k * fact / b_h)
            fact *= k + 1
            phi_k = phi_k / hh - 1 / fact
        R = torch.stack([r_all ** (k - 1) for k in range(1, p + 1)])
        bt = torch.tensor(b, dtype=torch.float64)
        base = float(sig[i + 1] / sig[i]) * xs - b_h * m0
        if d1s:
            rho_p = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
            x_pred = base - b_h * sum(a * d for a, d in zip(rho_p, d1s))
        else:
            x_pred = base
        if i == n - 1:  # the last step: no corrector, no call
            xs = x_pred
            break
        m_t = den(x_pred, sig[i + 1])
        rho_c = [0.5] if p == 1 else torch.linalg.solve(R, bt).tolist()
        corr = sum((c * d for c, d in zip(rho_c[:-1], d1s)), torch.zeros_like(x)) + rho_c[-1] * (m_t - m0)
        xs = base - b_h * corr
        buf = (buf + [(lam[i + 1], m_t)])[-order:]
    return xs


def _ours_rules(name: str, sig: torch.Tensor, x: torch.Tensor, model=WIDE, **rules) -> tuple[torch.Tensor, int]:
    den = BoundDenoiser(model)
    return run_steps(make_method(name, convention="diff-sampler", **rules), den, x, sig), den.calls


@pytest.mark.parametrize("name, max_order", [("dpm-solver++-2m", 2), ("dpm-solver++-3m", 3), ("unipc", 3)])
@pytest.mark.parametrize("nfe", NFES)
@pytest.mark.parametrize("afs", [False, True])
def test_diff_sampler_thresholding_and_afs_parity(name, max_order, nfe, afs):
    """sampler.thresholding=dynamic (and sampler.afs) under the diff-sampler convention equal diff-sampler's
    published dpm_pp_sampler / unipc_sampler with their dynamic thresholding (and AFS) on the same grid: NFE + 1
    Karras points to sigma_min, NFE + 2 with AFS (the first D is free). The thresholding changes the samples
    here, so a wrapper that skipped it (or thresholded only some D) would fail."""
    method = make_method(name, convention="diff-sampler", thresholding="dynamic", afs=afs)
    sig = make_grid(GridConfig(), method.solver.plan(nfe), WIDE)
    assert len(sig) == nfe + 1 + afs and method.solver.nfe_of_grid(sig) == nfe
    x = _noise() * 80.0
    den, state = _ds_model(WIDE, True, afs)
    ref = _ds_unipc(sig, x, den) if name == "unipc" else _ds_dpmpp(sig, x, max_order, den)
    ours, calls = _ours_rules(name, sig, x, thresholding="dynamic", afs=afs)
    assert calls == state["calls"] == nfe
    torch.testing.assert_close(ours, ref, **TOL)
    plain, _ = _ours_rules(name, sig, x, afs=afs)
    assert (plain - ours).abs().max() > 1e-3  # thresholding changes the samples on this model
    den0, _ = _ds_model(WIDE, False, afs)
    plain_ref = _ds_unipc(sig, x, den0) if name == "unipc" else _ds_dpmpp(sig, x, max_order, den0)
    torch.testing.assert_close(plain, plain_ref, **TOL)  # and without it, the same loops agree


def test_dynamic_threshold_equals_straightforward_implementation():
    """iia_cli's thresholding (torch.quantile, batched) equals the per-sample sorted-value definition, in both
    regimes: samples whose 99.5 % quantile of |D| is below 1 (only clipped at 1) and above 1 (rescaled)."""
    from iia_cli.core.solvers.base import dynamic_threshold

    g = torch.Generator().manual_seed(3)
    d = torch.randn(8, 3, 5, 7, generator=g, dtype=torch.float64)
    d = d * torch.tensor([0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 0.25], dtype=torch.float64).reshape(-1, 1, 1, 1)
    q = torch.quantile(d.abs().flatten(1), 0.995, dim=1)
    assert (q < 1).any() and (q > 1).any()
    out = dynamic_threshold(d)
    torch.testing.assert_close(out, _threshold_ref(d), rtol=0, atol=1e-15)
    assert out.abs().max() <= 1.0
    small = d[:1] * 0.1  # within [-1, 1]: unchanged
    assert torch.equal(dynamic_threshold(small), small)


@pytest.mark.parametrize("convention, nfe, n_sigmas, zero", [("iia", 5, 7, True), ("diff-sampler", 5, 7, False)])
@pytest.mark.parametrize("name", ["ddim", "ipndm", "dpm-solver++-2m", "unipc"])
def test_afs_first_step_makes_no_model_call(name, convention, nfe, n_sigmas, zero):
    """AFS: the first step's D at (x_0, sigma_0) is x_0 - sigma_0 x_0 / sqrt(1 + sigma_0^2), not a model call, so
    NFE K plans the grid of K + 1 calls and makes K calls (diff-sampler's nfe = num_steps - 2)."""
    seen: list[float] = []

    def model(x, sigma, class_labels=None):
        seen.append(float(sigma[0]))
        return MODEL(x, sigma)

    method = make_method(name, convention=convention, afs=True)
    sig = make_grid(GridConfig(), method.solver.plan(nfe), MODEL)
    assert len(sig) == n_sigmas and (float(sig[-1]) == 0) == zero and method.solver.nfe_of_grid(sig) == nfe
    den = BoundDenoiser(_Spy(model))
    x = _noise() * 80.0
    out = run_steps(method, den, x, sig)
    assert den.calls == nfe and 80.0 not in seen and len(seen) == nfe
    # the first step equals the base solver's step with the analytical D in its place
    first = x - 80.0 * x / math.sqrt(1 + 80.0 ** 2)
    plain = make_method(name, convention=convention)
    step0 = plain.solver.step(lambda z, s: first if float(s) == 80.0 else BoundDenoiser(MODEL)(z, s), x, sig, 0, ())
    with_afs = method.solver.step(method.solver.denoiser(BoundDenoiser(MODEL), sig, 0, ()), x, sig, 0, ())
    torch.testing.assert_close(with_afs.x_next, step0.x_next, **TOL)
    assert torch.isfinite(out).all()


class _Spy:
    """A model wrapper that BoundDenoiser can call (shape and dtype of the mixture)."""

    shape, dtype = MODEL.shape, MODEL.dtype

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, x, sigma, class_labels=None):
        return self.fn(x, sigma)


def test_afs_nfe_accounting_for_two_call_steps():
    """diff-sampler: 2-call steps with AFS make 2 S - 1 calls, so edm under its convention takes odd NFEs."""
    from iia_cli.runtime.errors import ConfigError

    method = make_method("edm", convention="diff-sampler", afs=True)
    sig = make_grid(GridConfig(), method.solver.plan(7), MODEL)
    assert len(sig) == 5 and method.solver.nfe_of_grid(sig) == 7
    den = BoundDenoiser(MODEL)
    run_steps(method, den, _noise() * 80.0, sig)
    assert den.calls == 7
    with pytest.raises(ConfigError, match=r"afs=true cannot make NFE 8 .*nearest valid: 7 or 9"):
        method.solver.plan(8)


def test_thresholding_refused_where_not_defined():
    from iia_cli.runtime.errors import ConfigError

    for name in ("ddim", "edm", "dpm-solver-2", "ipndm", "iia-ddim", "iia-edm"):
        with pytest.raises(ConfigError, match="defined for the data-prediction solvers dpm-solver\\+\\+-2m"):
            make_method(name, thresholding="dynamic")
    with pytest.raises(ConfigError, match="sampler.thresholding='static' is not valid; choose one of none, dynamic"):
        make_method("unipc", thresholding="static")
    m = make_method("iia-unipc", thresholding="dynamic", afs=True)
    assert m.params == {"thresholding": "dynamic", "afs": True}
    assert make_method("iia-unipc").params == {}
    ref = m.solver.reference_solver()  # IIA's fine reference sees the same D
    assert (ref.thresholding, ref.afs) == ("dynamic", True)
