"""IIA step indexing: a nonzero coefficient vector c at step j changes exactly the update of step j, by
sum_k c_k q_k, with the quantities q_k computed here by hand from the paper's definitions (Zhang, Niwa, Kleijn,
ICLR 2024: eq. (18) and Algorithm 2 for (B)IIA-EDM, eq. (6) for IIA-DDIM, eq. (23) for the DPM-Solver++ family
and UniPC, Appendix G for IIA-iPNDM) and the denoiser calls the base solver made. Zero coefficients cannot see
an off-by-one in the step or history indices; these tests can.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from iia_cli.core.grids import make_karras_grid
from iia_cli.core.methods import IIA_METHODS, make_method
from iia_cli.core.sampling import BoundDenoiser, run_steps
from iia_cli.models.gaussian import GaussianModel

MODEL = GaussianModel(shape=(1, 4, 4), std=0.5)
SIGMAS = torch.cat([make_karras_grid(8, 0.002, 80.0), torch.zeros(1, dtype=torch.float64)])  # 8 steps, last to 0
X0 = torch.randn(3, *MODEL.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 80.0
COEFFS = [0.3, -0.2, 0.15, -0.05]  # distinct values: a swap of two quantities changes the result
AB_WEIGHTS = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}

Call = tuple[torch.Tensor, float, torch.Tensor]  # (x, sigma, D(x; sigma))


class SpyDenoiser(BoundDenoiser):
    """Records every denoiser call the solver makes."""

    def __init__(self) -> None:
        super().__init__(MODEL)
        self.log: list[Call] = []

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = super().__call__(x, sigma)
        self.log.append((x.clone(), float(sigma), out.clone()))
        return out


def _run(name: str, stop: int, coeffs: list[list[float]] | None) -> tuple[torch.Tensor, list[Call]]:
    spy = SpyDenoiser()
    x = run_steps(make_method(name), spy, X0.clone(), SIGMAS, coeffs, stop=stop)
    return x, spy.log


class Trajectory:
    """The base solver's states and, per step, the denoiser calls it made (found by stopping after each step)."""

    def __init__(self, name: str, j: int) -> None:
        runs = [_run(name, k, None) for k in range(j + 2)]
        self.states = [x for x, _ in runs]  # x_0 .. x_{j+1}
        log = runs[-1][1]
        bounds = [len(calls) for _, calls in runs]
        self.calls = [log[bounds[k] : bounds[k + 1]] for k in range(j + 1)]  # calls of steps 0 .. j

    def first(self, k: int) -> Call:
        """The call at (x_k, sigma_k) that a single-call or Heun step makes first."""
        x, s, d = self.calls[k][0]
        torch.testing.assert_close(x, self.states[k], rtol=0, atol=0)
        assert s == float(SIGMAS[k])
        return x, s, d


def _edm_u_v(t: Trajectory, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lemma 1: u_k = x_k - D(x_k; s_k), v_k = D(x_k; s_k) - D(x~; s_{k+1}), x~ the Euler predictor."""
    (x, _, d), (x_pred, s_pred, d_pred) = t.first(k), t.calls[k][1]
    assert s_pred == float(SIGMAS[k + 1])
    return x - d, d - d_pred


def _q_iia_edm(t: Trajectory, j: int) -> list[torch.Tensor]:  # r = 1: u_j, v_j, u_{j-1}, v_{j-1}
    return [*_edm_u_v(t, j), *_edm_u_v(t, j - 1)]


def _q_biia_edm(t: Trajectory, j: int) -> list[torch.Tensor]:  # r = 0: h_j S_j, the averaged Heun slope
    (x, s, d), (x_pred, s_next, d_pred) = t.first(j), t.calls[j][1]
    return [(s_next - s) * ((x - d) / s + (x_pred - d_pred) / s_next) / 2]


def _q_iia_ddim(t: Trajectory, j: int) -> list[torch.Tensor]:  # D_j - D_{j-1}, eps_j - eps_{j-1}
    (x1, s1, d1), (x0, s0, d0) = t.first(j), t.first(j - 1)
    return [d1 - d0, (x1 - d1) / s1 - (x0 - d0) / s0]


def _q_dpm(t: Trajectory, j: int) -> list[torch.Tensor]:  # x_j, D_j
    x, _, d = t.first(j)
    return [x, d]


def _q_iia_ipndm(t: Trajectory, j: int) -> list[torch.Tensor]:
    """Differences of the Adams-Bashforth-combined eps and of D~ = x - sigma eps~ (Appendix G)."""

    def combined(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        eps = [(x - d) / s for x, s, d in (t.first(m) for m in range(k, -1, -1))]  # eps_k, eps_{k-1}, ...
        w = AB_WEIGHTS[min(4, k + 1)]
        eps_comb = sum(wi * e for wi, e in zip(w, eps))
        return t.states[k] - float(SIGMAS[k]) * eps_comb, eps_comb

    (d1, e1), (d0, e0) = combined(j), combined(j - 1)
    return [d1 - d0, e1 - e0]


def _q_iia_unipc(t: Trajectory, j: int) -> list[torch.Tensor]:
    """The (corrected) state x_j the step advances and D at sigma_j, evaluated by step j - 1 at its predicted
    point: step j itself calls the denoiser only at sigma_{j+1}."""
    _, s, d = t.calls[j - 1][-1]
    assert s == float(SIGMAS[j]) and all(c[1] == float(SIGMAS[j + 1]) for c in t.calls[j])
    return [t.states[j], d]


MANUAL: dict[str, Callable[[Trajectory, int], list[torch.Tensor]]] = {
    "iia-edm": _q_iia_edm,
    "biia-edm": _q_biia_edm,
    "iia-ddim": _q_iia_ddim,
    "iia-dpm-solver++-2m": _q_dpm,
    "iia-dpm-solver++-3m": _q_dpm,
    "iia-dpm-solver++-3m-exact": _q_dpm,
    "iia-ipndm": _q_iia_ipndm,
    "iia-unipc": _q_iia_unipc,
}


def test_every_iia_method_has_a_manual_computation() -> None:
    assert set(MANUAL) == set(IIA_METHODS)


@pytest.mark.parametrize("j", [1, 3, 6])  # early (short history), middle, and the last corrected step
@pytest.mark.parametrize("name", IIA_METHODS)
def test_nonzero_coefficients_change_exactly_their_step(name: str, j: int) -> None:
    t = Trajectory(name, j)
    q = MANUAL[name](t, j)
    c = COEFFS[: len(q)]
    coeffs = [[0.0] * len(q) for _ in range(len(SIGMAS) - 1)]
    coeffs[j] = c
    x_j, _ = _run(name, j, coeffs)
    torch.testing.assert_close(x_j, t.states[j], rtol=0, atol=0)  # steps before j are untouched
    x_next, _ = _run(name, j + 1, coeffs)
    expected = t.states[j + 1] + sum(ck * qk for ck, qk in zip(c, q))
    assert float((x_next - t.states[j + 1]).abs().max()) > 1e-3  # the correction is visible
    torch.testing.assert_close(x_next, expected, rtol=1e-10, atol=1e-10)
