"""Paired comparisons of two result rows: the ratio of their values with a 95 % interval, from the replicates each
row stores in ``ci_data`` (per-seed squared errors, or leave-one-block-out values).

Two rows are compared *paired* only when they were computed on the same seeds with the same kind of
replicates; otherwise :func:`compare_rows` says why not (rows of an older iia_cli have no replicates and are
never mixed with new ones in a comparison).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import uncertainty
from .uncertainty import Paired


LEGACY = "written by an older iia_cli, without interval data"


def replicates(row: Mapping[str, Any]) -> dict[str, Any] | None:
    text = row.get("ci_data", "")
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("kind") in ("seeds", "jackknife") else None


def compare_rows(a: Mapping[str, Any], b: Mapping[str, Any]) -> Paired | str:
    """The paired comparison of row ``a`` with row ``b`` (ratio a / b), or the reason they cannot be paired."""
    if a.get("metric") != b.get("metric"):
        return f"different metrics ({a.get('metric')} vs {b.get('metric')})"
    ra, rb = replicates(a), replicates(b)
    if ra is None or rb is None:
        return LEGACY
    if str(a.get("seeds", "")) != str(b.get("seeds", "")):
        return f"different seeds ({a.get('seeds')} vs {b.get('seeds')})"
    if ra["kind"] != rb["kind"]:
        return "different kinds of replicates"
    try:
        if ra["kind"] == "seeds":
            return uncertainty.paired_rmse(uncertainty.decode_array(ra["sq"]), uncertainty.decode_array(ra["count"]),
                                           uncertainty.decode_array(rb["sq"]), uncertainty.decode_array(rb["count"]))
        if ra.get("blocks") != rb.get("blocks"):
            return f"different jackknife blocks ({ra.get('blocks')} vs {rb.get('blocks')})"
        return uncertainty.paired_jackknife(float(a["value"]), uncertainty.decode_array(ra["loo"]),
                                            float(b["value"]), uncertainty.decode_array(rb["loo"]),
                                            n=_n_samples(a))
    except (KeyError, ValueError, TypeError) as exc:
        return f"unreadable interval data ({type(exc).__name__})"


def describe(p: Paired) -> str:
    """'x0.76 [0.70, 0.83] resolved'."""
    verdict = "resolved" if p.resolved else "not resolved"
    # two decimals, three where a bound would round to 1.00 and hide which side of 1 it is on
    d = 3 if any(round(v, 2) == 1.0 and v != 1.0 for v in (p.low, p.high)) else 2
    return f"x{p.ratio:.{d}f} [{p.low:.{d}f}, {p.high:.{d}f}] {verdict}"


def _n_samples(row: Mapping[str, Any]) -> int:
    try:
        return int(float(row.get("n_samples") or 0))
    except (TypeError, ValueError):
        return 0


def identical(p: Paired) -> bool:
    """Whether the two rows are the same numbers on every replicate (ratio exactly 1 with a zero-width
    interval): an IIA method whose corrections are off equals its base solver."""
    return p.ratio == 1.0 and p.low == 1.0 and p.high == 1.0
