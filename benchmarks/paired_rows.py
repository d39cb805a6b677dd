"""Per-seed squared errors and paired comparisons for the error benchmarks (integration_error.py, iia_targets.py).

Every row keeps its per-seed squared-error sums (CSV column ``sq``, exact base64 float64 from
iia_cli.metrics.uncertainty.encode_array) and the element count of one sample (``elements``), so any comparison the
tables draw can be recomputed from the CSV alone. The estimators are iia_cli.metrics.uncertainty's (``rmse_interval``:
BCa bootstrap over seeds; ``paired_rmse``: ratio of two RMSEs on the same seeds, resampled jointly; ``tail_share``);
this module only applies them to benchmark rows and formats the results. A comparison is *resolved* when its 95 %
interval excludes 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from iia_cli.metrics import uncertainty
from iia_cli.metrics.compare import identical
from iia_cli.metrics.uncertainty import Paired

# Columns each row gains (besides ``rmse``, kept): the RMSE's interval, its heavy-tail check and the per-seed data.
ROW_COLUMNS = ("ci_low", "ci_high", "ci_method", "ci_warning", "tail_share", "elements", "sq")
# Columns of a paired comparison, prefixed by what it compares with (e.g. ``ratio`` = vs the base solver).
PAIRED_FIELDS = ("", "_low", "_high", "_method", "_prob_improvement", "_resolved")


def per_seed_sq(x: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Sum of squared differences per sample (seed), in float64: [n]."""
    d = x.detach().to(torch.float64) - reference.detach().to(torch.float64)
    return d.pow(2).reshape(d.shape[0], -1).sum(dim=1).cpu().numpy()


def row_stats(sq: np.ndarray, elements: int) -> dict[str, Any]:
    """The RMSE of per-seed squared errors ``sq`` (each over ``elements`` numbers) with its 95 % interval."""
    count = np.full(len(sq), float(elements))
    iv = uncertainty.rmse_interval(sq, count)
    return dict(rmse=uncertainty.rmse_value(sq, count), ci_low=iv.low, ci_high=iv.high, ci_method=iv.method,
                ci_warning=iv.warning, tail_share=uncertainty.tail_share(sq), elements=int(elements),
                sq=uncertainty.encode_array(sq))


def arrays(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(per-seed squared errors, per-seed element counts) of a row written with :func:`row_stats`."""
    sq = uncertainty.decode_array(str(row["sq"]))
    return sq, np.full(sq.size, float(row["elements"]))


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> Paired:
    """RMSE_a / RMSE_b on the same seeds with its 95 % interval (iia_cli.metrics.uncertainty.paired_rmse)."""
    if str(a["seeds"]) != str(b["seeds"]):
        raise ValueError(f"paired comparison needs the same seeds: {a['seeds']} vs {b['seeds']}")
    return uncertainty.paired_rmse(*arrays(a), *arrays(b))


def paired_columns(p: Paired, prefix: str = "ratio") -> dict[str, Any]:
    """CSV columns of a paired comparison: ``{prefix}``, ``{prefix}_low``, ``_high``, ``_method``,
    ``_prob_improvement`` (share of seeds where the row's error is lower) and ``_resolved``."""
    values = (p.ratio, p.low, p.high, p.method, p.prob_improvement, p.resolved)
    return {prefix + f: v for f, v in zip(PAIRED_FIELDS, values)}


def ratio_text(p: Paired) -> str:
    """'x0.58 [0.55, 0.61]' (three decimals where a bound would round to 1.00 and hide its side of 1);
    unresolved comparisons end in ' n.r.', a row identical to the other on every seed reads '= base'."""
    if identical(p):
        return "= base"
    d = 3 if any(round(v, 2) == 1.0 and v != 1.0 for v in (p.low, p.high)) else 2
    return f"x{p.ratio:.{d}f} [{p.low:.{d}f}, {p.high:.{d}f}]" + ("" if p.resolved else " n.r.")


def best_marks(rows: list[Mapping[str, Any]]) -> tuple[dict[int, str], Paired | None]:
    """Marks for the rows of one NFE (indices into ``rows``): the lowest RMSE gets ``*`` when its paired comparison
    with the runner-up (the next lowest row that is not the same numbers on every seed) is resolved; otherwise
    it and every row not resolved against it get ``~`` (tied for best). Rows identical to the best share its mark.
    Returns the marks and the best-vs-runner-up comparison (None when there is no distinct runner-up)."""
    order = sorted(range(len(rows)), key=lambda i: float(rows[i]["rmse"]))
    best = order[0]
    same = [i for i in order if str(rows[i]["sq"]) == str(rows[best]["sq"])]
    others = [i for i in order if i not in same]
    if not others:
        return {i: "~" for i in same}, None
    runner = compare(rows[best], rows[others[0]])
    if runner.resolved:
        return {i: "*" for i in same}, runner
    marks = {i: "~" for i in same}
    for i in others:
        if not compare(rows[best], rows[i]).resolved:
            marks[i] = "~"
    return marks, runner


def with_best_column(df: Any) -> Any:
    """``df`` (a DataFrame of rows with ``nfe`` and ``sq``) with a ``best`` column of :func:`best_marks` per NFE, and
    the long per-seed column ``sq`` moved last."""
    df["best"] = ""
    for n in df.nfe.unique():
        at = df[df.nfe == n]
        marks, _ = best_marks(at.to_dict("records"))
        for i, mark in marks.items():
            df.loc[at.index[i], "best"] = mark
    return df[[c for c in df.columns if c != "sq"] + ["sq"]]


def stored(row: Mapping[str, Any], prefix: str = "ratio") -> Paired:
    """The comparison kept in a row's ``{prefix}*`` columns (see :func:`paired_columns`); n from its ``sq``."""
    return Paired(float(row[prefix]), float(row[prefix + "_low"]), float(row[prefix + "_high"]),
                  str(row[prefix + "_method"]), float(row[prefix + "_prob_improvement"]), arrays(row)[0].size)


def unresolved(rows: list[Mapping[str, Any]], label, prefix: str = "ratio") -> list[str]:
    """'label NFE n (x0.980, P(lower) 0.45; about 2,300 seeds would resolve it)' for every row whose stored
    comparison is not resolved (rows equal to the other on every seed are left out: there is nothing to resolve)."""
    out = []
    for r in rows:
        if str(r.get(prefix, "")) == "":
            continue
        p = stored(r, prefix)
        if p.resolved or identical(p):
            continue
        need = uncertainty.seeds_to_resolve(p.n, p)
        out.append(f"{label(r)} NFE {r['nfe']} (x{p.ratio:.3f}, P(lower) {p.prob_improvement:.2f}"
                   + (f"; about {need:,} seeds would resolve it)" if need else ")"))
    return out


def goal_verdict(ratio: float, low: float, high: float, target: float) -> str:
    """'met' (ratio <= target, upper bound < 1), 'met, resolved' (upper bound <= target too), 'missed, resolved'
    (lower bound > target) or 'missed, not resolved' (ratio > target, the interval reaches the target)."""
    if ratio <= target and high < 1:
        return "met, resolved" if high <= target else "met"
    return "missed, resolved" if low > target else "missed, not resolved"


def fmt_goal(ok: bool) -> str:
    return "met" if ok else "NOT met"
