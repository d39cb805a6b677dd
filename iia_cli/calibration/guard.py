"""The guard: one shrink factor alpha in [0, 1] of all IIA corrections, chosen by the final samples' error against
the teacher on folds of the calibration noises (alpha = 0 is the base solver, so never worse there)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from iia_cli.core.sampling import Coefficients
from iia_cli.runtime import dist

GUARD_GRID = (0.25, 0.5, 0.75)  # alphas tried between 0 (base) and 1 (the fit), then +-0.125 around the best


def final_rmse(finals: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """RMSE over every pixel of every sample (all processes) between final states and the teacher's."""
    sq = sum(float((a.to(torch.float64) - b.to(torch.float64)).pow(2).sum()) for a, b in zip(finals, references))
    count = sum(a.numel() for a in finals)
    sq, count = dist.all_reduce_floats(sq, float(count))
    return math.sqrt(sq / count)


GUARD_FOLDS = 4


def fold_rmse(finals: list[torch.Tensor], references: list[torch.Tensor], seeds: list[int]) -> list[float]:
    """The RMSE on each of GUARD_FOLDS folds of the noises (seed mod GUARD_FOLDS), over all processes, and
    last the RMSE over all of them."""
    sq = [0.0] * GUARD_FOLDS
    count = [0.0] * GUARD_FOLDS
    per = torch.cat([(a.to(torch.float64) - b.to(torch.float64)).flatten(1).pow(2).sum(1)
                     for a, b in zip(finals, references)]).tolist()
    d = finals[0][0].numel()
    for seed, v in zip(seeds, per):
        sq[seed % GUARD_FOLDS] += v
        count[seed % GUARD_FOLDS] += d
    sums = dist.all_reduce_floats(*sq, *count)
    sq, count = sums[:GUARD_FOLDS], sums[GUARD_FOLDS:]
    return [math.sqrt(a / b) if b else 0.0 for a, b in zip(sq, count)] + [math.sqrt(sum(sq) / sum(count))]


def scale_coefficients(coeffs: Coefficients, alpha: float) -> Coefficients:
    return [[alpha * c for c in step] for step in coeffs]


@dataclass
class GuardResult:
    alpha: float
    errors: dict[float, float]  # alpha -> final RMSE against the teacher on the calibration noises
    passes: int  # extra sampling passes over the calibration noises
    worst_fold: dict[float, float] = field(default_factory=dict)  # alpha -> max over folds of RMSE / base RMSE


def choose_alpha(final_error: Callable[[float], list[float]], base_folds: list[float],
                 fit_folds: list[float]) -> GuardResult:
    """The guard: the shrink factor alpha in [0, 1] of all corrections whose final error, relative to the base
    solver's, is smallest on the worst of the folds of the calibration noises (so an alpha that helps only a
    part of them is not taken). alpha = 0 (the base solver) scores 1 on every fold, so the chosen alpha is
    never worse than the base on any fold. ``final_error(alpha)`` returns :func:`fold_rmse`'s list."""
    folds = {0.0: base_folds, 1.0: fit_folds}
    passes = 0

    def score(a: float) -> tuple[float, float]:
        ratios = [e / b if b else (1.0 if e == 0 else math.inf) for e, b in zip(folds[a][:-1], base_folds[:-1])]
        return (max(ratios), -a)

    for a in GUARD_GRID:
        folds[a] = final_error(a)
        passes += 1
    best = min(folds, key=score)
    for a in (best - 0.125, best + 0.125):
        if 0 < a < 1 and a not in folds:
            folds[a] = final_error(a)
            passes += 1
    best = min(folds, key=score)
    overall = {a: f[-1] for a, f in sorted(folds.items())}
    return GuardResult(best, overall, passes, {a: score(a)[0] for a in sorted(folds)})
