"""Built-in analytic models: the Gaussian (closed-form ODE) and the MNIST PPCA mixture (exact denoiser).

Each test checks a property that an independent computation fixes: the denoiser formula, the probability-flow
ODE, a dense (non-Woodbury) posterior mean, limits in sigma, the on-disk cache, and that solving the ODE lands
on the data.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from iia_cli.models import gmm as gmm_module
from iia_cli.models.base import Denoiser
from iia_cli.models.data import load_mnist_5k
from iia_cli.models.gaussian import GaussianModel
from iia_cli.models.gmm import GMMDenoiser

F64 = torch.float64
SIGMAS = (1e-6, 0.002, 0.05, 0.5, 2.0, 80.0, 1e4)


# ------------------------------------------------------------------------------------------------ helpers


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5, with a final 0 appended: float64 [n + 1]."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=F64)])


def heun_sample(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) on the ODE dx/dsigma = (x - D) / sigma."""
    ones = torch.ones(x.shape[0], dtype=F64)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - model(x, sigma * ones)) / sigma
        x_next = x + (sigma_next - sigma) * d  # Euler step.
        if sigma_next > 0:  # Apply 2nd order correction.
            d_next = (x_next - model(x_next, sigma_next * ones)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
    return x


def random_ppca_params(k: int, d: int, q: int, seed: int) -> dict[str, torch.Tensor]:
    """K random PPCA components in R^d: orthonormal U (QR), L > 0 spread over decades, distinct tau2."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(k, d, q, generator=gen, dtype=F64)).Q  # [K, d, q]
    return {
        "means": torch.randn(k, d, generator=gen, dtype=F64),
        "U": u,
        "L": 10 ** (2 * torch.rand(k, q, generator=gen, dtype=F64) - 1),  # in [0.1, 10]
        "tau2": torch.tensor([1e-3, 3e-2, 0.2][:k], dtype=F64),
        "weights": torch.tensor([0.5, 0.3, 0.2][:k], dtype=F64),
    }


def dense_posterior_mean(p: dict[str, torch.Tensor], x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, ...]:
    """Reference posterior mean with explicit covariances: (D [B, d], weights [B, K]); no Woodbury, no low rank."""
    k, d = p["means"].shape
    eye = torch.eye(d, dtype=F64)
    cov = p["U"] @ torch.diag_embed(p["L"]) @ p["U"].transpose(1, 2) + p["tau2"][:, None, None] * eye  # [K, d, d]
    log_w, denoised = [], []
    for j in range(k):
        total = cov[j] + sigma**2 * eye
        mvn = torch.distributions.MultivariateNormal(p["means"][j], covariance_matrix=total)
        log_w.append(math.log(p["weights"][j] / p["weights"].sum()) + mvn.log_prob(x))
        denoised.append(x - sigma**2 * torch.linalg.solve(total, (x - p["means"][j]).T).T)
    w = torch.softmax(torch.stack(log_w, dim=1), dim=1)  # [B, K]
    return (w[..., None] * torch.stack(denoised, dim=1)).sum(1), w


# ------------------------------------------------------------------------------------------------ Gaussian


def test_gaussian_denoiser_matches_formula() -> None:
    model = GaussianModel()
    assert isinstance(model, Denoiser) and model.shape == (1, 8, 8) and model.label_dim == 0
    assert model.mean.std() > 0.1 and model.mean.abs().max() <= 0.5  # a pattern, not a constant
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64) * 3
    sigma = torch.tensor([0.0, 0.002, 0.3, 1.0, 80.0], dtype=F64)
    expected = torch.stack(
        [model.mean + 0.25 / (0.25 + float(s) ** 2) * (x[i] - model.mean) for i, s in enumerate(sigma)]
    )
    torch.testing.assert_close(model(x, sigma), expected, rtol=1e-14, atol=1e-14)
    assert model(x.float(), sigma).dtype == torch.float32


@pytest.mark.parametrize("sigma0", [0.01, 0.7, 5.0, 80.0])
def test_gaussian_exact_solution_solves_the_ode(sigma0: float) -> None:
    model = GaussianModel(shape=(2, 3, 5), std=0.7)
    x0 = torch.randn(4, 2, 3, 5, generator=torch.Generator().manual_seed(2), dtype=F64) * (0.7 + sigma0)
    s0 = torch.full((4,), sigma0, dtype=F64)
    torch.testing.assert_close(model.exact_solution(x0, s0, s0), x0, rtol=1e-14, atol=1e-14)
    for sigma1 in (0.05, 0.5 * sigma0, 2.0):
        # dx/dsigma at sigma1 by central differences, against the ODE right-hand side (x - D(x, sigma)) / sigma.
        h = 1e-5 * sigma1
        s1 = torch.full((4,), sigma1, dtype=F64)
        x1 = model.exact_solution(x0, s0, s1)
        deriv = (model.exact_solution(x0, s0, s1 + h) - model.exact_solution(x0, s0, s1 - h)) / (2 * h)
        torch.testing.assert_close(deriv, (x1 - model(x1, s1)) / sigma1, rtol=1e-7, atol=1e-8)
    # Composition (flow property) and sigma1 = 0 (the data end).
    mid, zero = torch.full((4,), 0.3, dtype=F64), torch.zeros(4, dtype=F64)
    x_end = model.exact_solution(x0, s0, zero)
    torch.testing.assert_close(model.exact_solution(model.exact_solution(x0, s0, mid), mid, zero), x_end)
    torch.testing.assert_close(x_end, model.mean + 0.7 / math.sqrt(0.49 + sigma0**2) * (x0 - model.mean))


def test_gaussian_fingerprint_tracks_parameters() -> None:
    base = GaussianModel().fingerprint()
    assert base == GaussianModel().fingerprint() and len(base) == 64
    assert base != GaussianModel(std=0.4).fingerprint()
    assert base != GaussianModel(mean=0.0).fingerprint()
    assert base != GaussianModel(shape=(1, 4, 16)).fingerprint()


# ------------------------------------------------------------------------------------------------ GMM, small


@pytest.mark.parametrize("sigma", SIGMAS)
def test_gmm_woodbury_matches_dense(sigma: float) -> None:
    p = random_ppca_params(k=3, d=16, q=3, seed=3)
    model = GMMDenoiser(**p, shape=(1, 4, 4))
    gen = torch.Generator().manual_seed(4)
    # Points from the noisy marginal, near each mean, plus far outliers.
    comp = torch.arange(12) % 3
    x0 = p["means"][comp] + torch.randn(12, 16, generator=gen, dtype=F64)
    noisy = x0 + sigma * torch.randn(12, 16, generator=gen, dtype=F64)
    x = torch.cat([noisy, 30 * torch.randn(4, 16, generator=gen, dtype=F64)])
    expected, w_ref = dense_posterior_mean(p, x, sigma)
    sig = torch.full((16,), sigma, dtype=F64)
    got = model(x.reshape(16, 1, 4, 4), sig).reshape(16, 16)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    w = model.posterior_weights(x.reshape(16, 1, 4, 4), sig)
    torch.testing.assert_close(w, w_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w.sum(1), torch.ones(16, dtype=F64), rtol=0, atol=1e-14)


def test_gmm_mixed_sigmas_in_one_batch_match_single_calls() -> None:
    model = GMMDenoiser(**random_ppca_params(k=3, d=16, q=2, seed=5), shape=(1, 4, 4))
    x = torch.randn(len(SIGMAS), 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=F64) * 2
    sigma = torch.tensor(SIGMAS, dtype=F64)
    singles = torch.cat([model(x[i : i + 1], sigma[i : i + 1]) for i in range(len(SIGMAS))])
    torch.testing.assert_close(model(x, sigma), singles, rtol=1e-13, atol=1e-13)


def test_gmm_large_sigma_gives_mixture_mean() -> None:
    p = random_ppca_params(k=3, d=16, q=2, seed=7)
    model = GMMDenoiser(**p, shape=(1, 4, 4))
    sigma = 1e6
    x = sigma * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(8), dtype=F64)
    sig = torch.full((8,), sigma, dtype=F64)
    prior = p["weights"] / p["weights"].sum()
    torch.testing.assert_close(model.posterior_weights(x, sig), prior.expand(8, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(model(x, sig), model.mixture_mean().expand(8, -1, -1, -1), rtol=0, atol=1e-3)
    # At sigma = 0 the posterior mean is the identity.
    torch.testing.assert_close(model(x / sigma, torch.zeros(8, dtype=F64)), x / sigma, rtol=1e-13, atol=1e-13)


def test_gmm_conditional_one_hot_selects_the_component() -> None:
    p = random_ppca_params(k=3, d=16, q=2, seed=9)
    model = GMMDenoiser(**p, shape=(1, 4, 4), conditional=True)
    assert model.label_dim == 3 and GMMDenoiser(**p, shape=(1, 4, 4)).label_dim == 0
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(10), dtype=F64) * 2
    for k in range(3):
        single = GMMDenoiser(**{name: v[k : k + 1] for name, v in p.items()}, shape=(1, 4, 4))
        labels = torch.nn.functional.one_hot(torch.full((6,), k), 3).to(F64)
        for sigma in (0.01, 1.0, 50.0):
            sig = torch.full((6,), sigma, dtype=F64)
            torch.testing.assert_close(model(x, sig, labels), single(x, sig), rtol=1e-12, atol=1e-12)
    # Without labels the conditional model is the unconditional mixture.
    sig = torch.full((6,), 0.5, dtype=F64)
    torch.testing.assert_close(model(x, sig), GMMDenoiser(**p, shape=(1, 4, 4))(x, sig))


def test_gmm_fingerprint_tracks_parameters_and_settings() -> None:
    p = random_ppca_params(k=2, d=16, q=2, seed=11)
    base = GMMDenoiser(**p, shape=(1, 4, 4)).fingerprint()
    assert base == GMMDenoiser(**p, shape=(1, 4, 4)).fingerprint()
    assert base != GMMDenoiser(**p, shape=(1, 4, 4), conditional=True).fingerprint()
    assert base != GMMDenoiser(**{**p, "tau2": p["tau2"] * 2}, shape=(1, 4, 4)).fingerprint()


@pytest.mark.parametrize("n", [3, 40])
def test_ppca_component_fit_matches_eigh(n: int) -> None:
    scales = torch.diag(torch.arange(1.0, 13, dtype=F64))  # distinct variances
    x = torch.randn(n, 12, generator=torch.Generator().manual_seed(12), dtype=F64) @ scales
    mu, u, lam, tau2 = gmm_module.fit_ppca_component(x, rank=5, tau2=0.01, mle_noise=True)
    eig, vec = torch.linalg.eigh(torch.cov(x.T, correction=0))
    eig, vec = eig.flip(0).clamp_min(0), vec.flip(1)
    assert tau2.item() == pytest.approx(max(0.01, eig[5:].mean().item()), rel=1e-10, abs=1e-15)
    torch.testing.assert_close(lam, (eig[:5] - tau2).clamp_min(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=F64), rtol=0, atol=1e-12)
    # Same subspace where the eigenvalues are distinct and positive (projector comparison is sign-free).
    m = min(5, n - 1)
    torch.testing.assert_close(u[:, :m] @ u[:, :m].T, vec[:, :m] @ vec[:, :m].T, rtol=0, atol=1e-8)
    torch.testing.assert_close(mu, x.mean(0))


# ------------------------------------------------------------------------------------------------ GMM on MNIST


@pytest.fixture(scope="session")
def gmm_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("iia_cache")


@pytest.fixture(scope="session")
def mnist_gmm(gmm_cache_dir: Path) -> GMMDenoiser:
    return GMMDenoiser.from_mnist(cache_dir=gmm_cache_dir)


@pytest.mark.slow
def test_gmm_cache_loads_instead_of_refitting(
    mnist_gmm: GMMDenoiser, gmm_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [p.suffix for p in gmm_cache_dir.iterdir()] == [".npz"]  # no temporary file left behind

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("refitted although the fit is cached")

    monkeypatch.setattr(gmm_module, "fit_ppca_mixture", no_fit)
    again = GMMDenoiser.from_mnist(cache_dir=gmm_cache_dir)
    for name in ("means", "U", "L", "tau2", "weights"):
        assert torch.equal(getattr(again, name), getattr(mnist_gmm, name)), name
    assert again.fingerprint() == mnist_gmm.fingerprint()
    with pytest.raises(AssertionError, match="refitted"):  # other settings are another cache entry
        GMMDenoiser.from_mnist(rank=3, cache_dir=gmm_cache_dir)
    monkeypatch.setenv("IIA_CACHE_DIR", str(gmm_cache_dir))
    assert GMMDenoiser.from_mnist().fingerprint() == mnist_gmm.fingerprint()


def test_gmm_mnist_fit_is_a_valid_ppca_mixture(mnist_gmm: GMMDenoiser) -> None:
    m = mnist_gmm
    assert (m.shape, m.components, m.rank, m.label_dim, m.dtype) == ((1, 28, 28), 10, 16, 0, F64)
    eye = torch.eye(m.rank, dtype=F64).expand(10, -1, -1)
    torch.testing.assert_close(m.U.transpose(1, 2) @ m.U, eye, rtol=0, atol=1e-12)
    assert bool((m.L >= 0).all()) and bool((m.L[:, :-1] >= m.L[:, 1:]).all())  # sorted
    torch.testing.assert_close(m.weights, torch.full((10,), 0.1, dtype=F64))  # 500 images per class
    images, _ = load_mnist_5k()
    data_mean = torch.from_numpy(images).to(F64).mean(0) / 127.5 - 1
    torch.testing.assert_close(m.mixture_mean()[0], data_mean, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_gmm_kmeans_components_are_deterministic() -> None:
    images, labels = load_mnist_5k()
    x = torch.from_numpy(images[:1000].reshape(1000, -1)).to(F64) / 127.5 - 1
    fit = [gmm_module.fit_ppca_mixture(x, torch.from_numpy(labels[:1000]), 3, 4, 1e-3) for _ in range(2)]
    for name in ("means", "U", "L", "tau2", "weights"):
        assert torch.equal(fit[0][name], fit[1][name]), name
    assert fit[0]["means"].shape == (3, 784) and abs(fit[0]["weights"].sum().item() - 1) < 1e-14
    assert bool((fit[0]["weights"] > 0.1).all())  # k-means++ seeding gives no degenerate cluster here


@pytest.mark.slow
def test_gmm_long_heun_run_lands_on_the_data(mnist_gmm: GMMDenoiser) -> None:
    x = 80.0 * torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=F64)
    samples = heun_sample(mnist_gmm, x, karras_sigmas(100))[:, 0]  # [64, 28, 28]
    images, _ = load_mnist_5k()
    data = torch.from_numpy(images).to(F64) / 127.5 - 1
    rms_mean_diff = (samples.mean(0) - data.mean(0)).pow(2).mean().sqrt().item()
    assert rms_mean_diff < 0.1
    pixel_std = samples.std(0).mean().item()  # the data's is 0.386; rank 16 keeps about 3/4 of the variance
    assert 0.25 < pixel_std < 0.5
    lo, median, hi = torch.quantile(samples.flatten(), torch.tensor([0.02, 0.5, 0.98], dtype=F64)).tolist()
    assert -1.5 < lo and hi < 1.5 and abs(median + 1) < 0.1  # mostly background at -1; Gaussian tails overshoot
    # Each sample ends near its most likely component's affine subspace: the data manifold of the model.
    w = mnist_gmm.posterior_weights(samples[:, None], torch.full((64,), 0.002, dtype=F64))
    assert bool((w.max(1).values > 0.99).all())
