"""UniPC (Zhao et al. 2023): the unified predictor-corrector, variant B(h) = bh2, data prediction.

In EDM's x-space (alpha = 1, lambda = -log sigma), with h = lambda' - lambda_i, r_k = (lambda_{i-k} -
lambda_i) / h, D1_k = (D_{i-k} - D_i) / r_k and B(h) = expm1(-h) (bh2):

* UniP-p (predictor, Algorithm 2 of the paper): ``x' = (s'/s) x - expm1(-h) D_i - B(h) sum_k a_k D1_k``,
  the a_k solving the order conditions ``R a = b`` (Eq. 8, a = 1/2 for p = 2);
* UniC-p (corrector, Algorithm 1): after the model call at the predicted x', the same update from the
  same x_i, now with D1 of the new value D' at r = 1 included (``c = 1/2`` for p = 1). It raises the order
  by one at no extra model call: the call it needs is the one the next step makes anyway.

The order is ``min(3, i + 1, steps left)`` (warm-up and ``lower_order_final``, as the reference code
and diffusers' ``UniPCMultistepScheduler`` do). No corrector after the last step (it would need an extra
call), and a step to sigma = 0 is the plain denoise ``D_i``.

A step here runs from a *corrected* state x_i: predictor to sigma_{i+1}, the model call there, corrector.
The step returns the corrected x_{i+1}; the value of D at sigma_{i+1} (taken at the predicted point, as in
UniPC) travels in the record to the next step, so one call per step, plus one for D at sigma_max in the
first step and none in a step that only denoises or ends the grid. K steps therefore cost K calls.
IIA's correction (iia-unipc, eq. 23's quantities as for DPM-Solver++) acts on this carried state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DenoiseFn, History, Sigma, Solver, StepRecord, StepResult, expm1, log, sigma_pair


@dataclass(frozen=True, slots=True, eq=False)
class UniPCRecord(StepRecord):
    """``lam``: lambda_i; ``warm``: steps taken so far (the warm-up order); ``carried``: the (lambda, D) pairs the
    next step starts from, most recent (D at sigma_{i+1}, from the corrector's model call) first; None when the
    step made no such call (the next step then calls D itself)."""

    lam: Sigma
    warm: int
    carried: tuple[tuple[Sigma, torch.Tensor], ...] | None


def _b_weights(hh: Sigma, order: int) -> list[Sigma]:
    """bh2's b_1 .. b_order at hh = -h: the phi_k(hh) recursion divided by expm1(hh); floats or tensors (the same
    operations either way, :func:`~iia_cli.core.solvers.base.expm1` picks math's or torch's)."""
    b_h = expm1(hh)
    h_phi_k = expm1(hh) / hh - 1
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b


def unipc_weights(h: Sigma, rks: list[Sigma], order: int) -> tuple[list[Sigma], list[Sigma]]:
    """(predictor weights a over the first order-1 differences, corrector weights c over all ``order``),
    bh2, data prediction. ``rks``: r_1 .. r_{order-1} of the past points (the corrector adds r = 1). Floats in,
    floats out; tensors (a grid that carries gradient) in, 0-dim tensors out (:func:`_unipc_weights_tensor`)."""
    if isinstance(h, torch.Tensor) or any(isinstance(r, torch.Tensor) for r in rks):
        return _unipc_weights_tensor(torch.as_tensor(h, dtype=torch.float64), rks, order)
    b = _b_weights(-h, order)
    r_all = torch.tensor(list(rks) + [1.0], dtype=torch.float64)
    R = torch.stack([r_all ** (k - 1) for k in range(1, order + 1)])
    bt = torch.tensor(b, dtype=torch.float64)
    if order == 1:
        pred: list[float] = []
    elif order == 2:
        pred = [0.5]
    else:
        pred = torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
    corr = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
    return pred, corr


def _unipc_weights_tensor(h: torch.Tensor, rks: list[Sigma], order: int) -> tuple[list[Sigma], list[Sigma]]:
    """:func:`unipc_weights` in torch, differentiable in h and the r_k."""
    b = _b_weights(-h, order)
    r_all = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rks] + [torch.ones((), dtype=torch.float64)])
    R = torch.stack([r_all ** (k - 1) for k in range(1, order + 1)])
    bt = torch.stack(b)
    if order == 1:
        pred: list[Sigma] = []
    elif order == 2:
        pred = [0.5]
    else:
        pred = list(torch.linalg.solve(R[:-1, :-1], bt[:-1]).unbind())
    corr: list[Sigma] = [0.5] if order == 1 else list(torch.linalg.solve(R, bt).unbind())
    return pred, corr


class UniPC(Solver):
    name = "unipc"
    order = 3
    time_variable = "lambda"
    record_type = UniPCRecord
    thresholdable = True  # data prediction: diff-sampler thresholds every D, the carried one too

    def __init__(self, order: int = 3, lower_final: bool = True) -> None:
        self.order = order
        self.lower_final = lower_final  # False for IIA's fine reference: full order up to its sub-grid's end

    def reference_solver(self) -> Solver:
        return self.same_rules(UniPC(self.order, lower_final=False))

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor, i: int, history: History) -> StepResult:
        s, s_next = sigma_pair(sigmas, i)
        lam = -log(s)
        prev = history[-1] if history else None
        if isinstance(prev, UniPCRecord) and prev.carried is not None:
            past = list(prev.carried)  # (lambda, D) most recent first; D at sigma_i first
            warm = prev.warm + 1
        else:
            past = [(lam, denoise(x, s))]
            warm = 1
        d_0 = past[0][1]
        eps = (x - d_0) / s
        if s_next == 0:
            return StepResult(d_0, UniPCRecord(s, d_0, eps, lam=lam, warm=warm, carried=None))
        order = min(self.order, warm, len(past), len(sigmas) - 1 - i if self.lower_final else self.order)
        h = log(s / s_next)
        rks = [(lam_k - lam) / h for lam_k, _ in past[1:order]]
        d1s = [(d_k - d_0) / r for r, (_, d_k) in zip(rks, past[1:order])]
        pred, corr = unipc_weights(h, rks, order)
        b_h = expm1(-h)
        base = (s_next / s) * x - expm1(-h) * d_0
        x_pred = base - b_h * sum((a * d for a, d in zip(pred, d1s)), torch.zeros_like(x))
        if i + 2 >= len(sigmas) or float(sigmas[i + 2].detach()) == 0:
            # No corrector before the end of the grid (it would cost a call) nor before the final denoise:
            # that denoise then calls D at this state itself, the same call and the same result as the
            # reference code's D at the predicted point, but it sees IIA's correction of this state.
            return StepResult(x_pred, UniPCRecord(s, d_0, eps, lam=lam, warm=warm, carried=None))
        d_next = denoise(x_pred, s_next)
        corr_res = sum((c * d for c, d in zip(corr[:-1], d1s)), torch.zeros_like(x)) + corr[-1] * (d_next - d_0)
        carried = ((-log(s_next), d_next), *past[: self.order - 1])
        return StepResult(base - b_h * corr_res, UniPCRecord(s, d_0, eps, lam=lam, warm=warm, carried=carried))
