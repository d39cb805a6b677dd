"""The tidy results CSV: one row per (method, NFE, seed range, metric), appended under a file lock.

Appending never rewrites earlier rows, and several processes (SLURM array tasks) may append to one
file at once: each append takes an exclusive lock and writes whole rows in one write.

Every row carries its *identity*: the settings that change its value (model fingerprint, method and
parameters, the exact sigma grid, NFE, seeds, metric, calibration settings and coefficient file, references,
dtypes), as readable JSON in ``identity_fields`` and a short hash of it in ``identity``. A rerun skips a row
only when a row of the same identity is already in the file, and ``report`` shows the latest row per identity.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import datetime as _dt
import io
import json
import math
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iia_cli import __version__
from iia_cli.core.methods import METHODS, shown_params
from iia_cli.io.atomic import write_rescue_copy
from iia_cli.io.paths import csv_lock
from iia_cli.metrics.compare import LEGACY, compare_rows, describe, identical
from iia_cli.metrics.registry import METRICS
from iia_cli.metrics.uncertainty import seeds_to_resolve
from iia_cli.runtime.errors import IIARuntimeError, MissingFileError

COLUMNS = [
    "experiment", "model", "model_sha256", "method", "method_params", "r", "M", "B", "grid", "nfe", "seeds",
    "n_samples", "metric", "value", "ci_low", "ci_high", "ci_method", "ci_warning", "ci_data", "reference",
    "reference_sha256", "coefficient_file", "calibration_seconds",
    "sampling_seconds", "device", "tool_version", "git_revision", "host", "timestamp", "identity", "identity_fields",
]
REQUIRED_FOR_REPORT = ("method", "nfe", "metric", "value")


def row_identity(fields: dict[str, Any]) -> tuple[str, str]:
    """(short hash, readable JSON) of a row's identity fields (see the module docstring)."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], text


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """The git revision of the tool's checkout (with -dirty), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parents[2]  # the checkout: iia_cli/tables/results.py
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_row(**fields: Any) -> dict[str, Any]:
    row = {c: "" for c in COLUMNS}
    row.update(tool_version=__version__, git_revision=git_revision(), host=platform.node(), timestamp=now())
    for k, v in fields.items():
        if k not in row:
            raise KeyError(f"unknown results column {k}")
        row[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
    return row


def check_header(path: str | Path) -> None:
    """Raise unless ``path`` is missing, empty or a results CSV with this tool's columns (checked before any
    work, so that rows are never computed for a file they cannot be appended to)."""
    path = Path(path)
    if path.is_dir():
        raise IIARuntimeError(f"results file {path} is a directory; give a .csv file path with --csv")
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IIARuntimeError(f"results file {path} cannot be read ({exc})") from None
    if header != COLUMNS:
        why = ("it has no identity column (written by an older iia_cli)" if "identity" not in header else
               "it has no interval columns (written by an older iia_cli; iia report still reads it)"
               if "ci_low" not in header else "its columns differ from the ones this tool writes")
        raise IIARuntimeError(f"cannot append to results file {path}: {why}; write to a new file with --csv")


def done_identities(path: str | Path) -> set[str]:
    """Identities of the rows with a value in a results CSV (empty when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return set()
    try:
        with path.open(newline="") as f:
            return {r["identity"] for r in csv.DictReader(f) if r.get("identity") and r.get("value") not in (None, "")}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IIARuntimeError(f"results file {path} cannot be read ({exc})") from None


def append_rows(path: str | Path, rows: Sequence[dict[str, Any]], skip_done: bool = False) -> list[dict[str, Any]]:
    """Append rows (header first if the file is new) under an exclusive lock, in one write.

    With ``skip_done``, rows whose identity is already in the file are dropped under the same lock, so two
    identical runs at once append each result once. Returns the rows written. If the write fails, the rows go
    to a rescue CSV beside it (or under ./iia-rescued) and the error names it."""
    path = Path(path)
    try:
        return _append_rows(path, rows, skip_done)
    except (OSError, IIARuntimeError) as exc:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore").writeheader()
        csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore").writerows(rows)
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        write_rescue_copy(path.with_suffix(".unsaved.csv"), lambda tmp: tmp.write_text(buf.getvalue()), reason,
                          f"{len(rows)} result rows", first=[path.parent])
        raise  # write_rescue_copy raises OutputRescued naming the copy; this line is not reached


def _append_rows(path: Path, rows: Sequence[dict[str, Any]], skip_done: bool) -> list[dict[str, Any]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with csv_lock(path):
        check_header(path)
        new = not path.exists() or path.stat().st_size == 0
        if skip_done and not new:
            done = done_identities(path)
            rows = [r for r in rows if not r.get("identity") or r["identity"] not in done]
        if not rows:
            return []
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        with path.open("a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
    return list(rows)


def read_results(path: str | Path) -> Any:
    """A results CSV as a DataFrame, checked: the columns a table needs, numeric NFE and values."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise MissingFileError("results file", path)
    try:
        df = pd.read_csv(path, dtype={"seeds": str, "method_params": str, "identity": str, "identity_fields": str})
    except pd.errors.EmptyDataError:
        raise IIARuntimeError(f"results file {path} is empty; run iia evaluate first") from None
    except Exception as exc:  # pandas raises many kinds
        msg = " ".join(str(exc).split())[:200]
        raise IIARuntimeError(f"results file {path} cannot be read as CSV ({msg})") from None
    return normalise_results(df, f"results file {path}")


def normalise_results(df: Any, where: str = "results") -> Any:
    """Check and type a results table: the columns a table needs, numeric NFE and values, an identity per
    row (rows of an older iia_cli without one are identified by what their columns record)."""
    import pandas as pd

    missing = [c for c in REQUIRED_FOR_REPORT if c not in df.columns]
    if missing:
        raise IIARuntimeError(f"{where} lacks the column(s) {', '.join(missing)}; "
                              "give a CSV written by iia evaluate")
    for col in ("value", "nfe"):
        num = pd.to_numeric(df[col], errors="coerce")
        bad = df[col][num.isna() & df[col].notna()]
        if len(bad):
            raise IIARuntimeError(f"{where}: column {col} holds a non-numeric value "
                                  f"{str(bad.iloc[0])[:40]!r} (row {int(bad.index[0]) + 2}); expected numbers")
        df[col] = num
    df = df[df["value"].notna() & df["nfe"].notna()].copy()
    df["nfe"] = df["nfe"].astype(int)
    for col in ("ci_low", "ci_high"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else float("nan")
    for col in ("method_params", "timestamp", "seeds", "grid", "identity", "identity_fields", "ci_method", "ci_warning",
                "ci_data"):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].astype(object).fillna("").astype(str)
    df["method"] = df["method"].astype(str)
    df["metric"] = df["metric"].astype(str)
    # rows of an older iia_cli (no identity column): identify them by what their columns record
    legacy = df["identity"] == ""
    if legacy.any():
        cols = [c for c in ("experiment", "model_sha256", "method", "method_params", "grid", "nfe", "seeds",
                            "metric", "M", "B", "reference_sha256", "coefficient_file") if c in df.columns]
        keys = df.loc[legacy, cols].apply(lambda r: "|".join(map(str, r.tolist())), axis=1)
        df.loc[legacy, "identity"] = keys.map(lambda t: "legacy-" + hashlib.sha256(t.encode()).hexdigest()[:9])
    return df


def latest_per_identity(df: Any) -> Any:
    """The latest row of each identity (a rerun with --fresh supersedes the earlier row)."""
    return df.sort_values("timestamp", kind="stable").drop_duplicates(["identity"], keep="last")


def _settings(fields: str) -> dict[str, Any]:
    """Identity fields of a row minus the seeds: the settings two seed ranges of one experiment share."""
    try:
        data = json.loads(fields) if fields else {}
    except json.JSONDecodeError:
        return {}
    return {k: v for k, v in data.items() if k not in ("seeds", "n_samples")} if isinstance(data, dict) else {}


def identity_conflicts(df: Any) -> tuple[Any, list[str]]:
    """Rows to show and notes: when one (method, parameters, NFE, metric) has rows of different settings
    (identities that differ in more than the seeds), say which settings differ and keep the latest ones."""
    df = latest_per_identity(df)
    keep, notes = [], []
    for (method, params, nfe, metric), part in df.groupby(["method", "method_params", "nfe", "metric"], sort=False):
        settings = part["identity_fields"].map(lambda t: json.dumps(_settings(t), sort_keys=True))
        if settings.nunique() <= 1:
            keep.append(part)
            continue
        latest = settings.iloc[-1]  # rows are in timestamp order (latest_per_identity sorts them)
        variants = [json.loads(v) for v in dict.fromkeys(settings)]
        keys = sorted({k for v in variants for k in v})
        differ = [k for k in keys if len({json.dumps(v.get(k), sort_keys=True) for v in variants}) > 1]
        shown = json.loads(latest)
        notes.append(f"{method}{_params_label(params)} nfe={nfe} {metric}: rows of {len(variants)} different settings "
                     f"(differing: {', '.join(differ)}); the table shows the latest: "
                     + ", ".join(f"{k}={_short(shown.get(k))}" for k in differ))
        keep.append(part[settings == latest])
    import pandas as pd

    return (pd.concat(keep) if keep else df.iloc[0:0]), notes


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:36] + "..."


def metric_order(metrics: Any) -> list[str]:
    """The metrics present, registry order first (the integration error, then KID, FD-infinity, FID, CLIP
    score), then unknown ones by name."""
    present = list(dict.fromkeys(str(m) for m in metrics))
    return [m for m in METRICS if m in present] + sorted(m for m in present if m not in METRICS)


def higher_is_better(metric: str) -> bool:
    return METRICS[metric].higher_is_better if metric in METRICS else False


def metric_name(metric: str) -> str:
    return METRICS[metric].label if metric in METRICS else metric


def _fmt(metric: str, value: float) -> str:
    return METRICS[metric].fmt(value) if metric in METRICS else f"{value:#.4g}"


@functools.lru_cache(maxsize=None)
def base_method(method: str) -> str | None:
    """The base solver an IIA method corrects, from the method registry (None for a base solver or an
    unknown name)."""
    spec = METHODS.get(method)
    return spec.base if spec is not None and spec.is_iia else None


_RULES = ("convention", "thresholding", "afs")  # sampler settings an IIA row shares with the base row it compares with


def _base_label(method: str, params: str) -> str:
    """The table label of the base-solver row an IIA row compares with ('' for a base solver): the base
    method under the same NFE/grid convention."""
    base = base_method(method)
    if base is None:
        return ""
    try:
        data = json.loads(params) if params else {}
    except json.JSONDecodeError:
        data = {}
    keep = {k: v for k, v in data.items() if k in _RULES} if isinstance(data, dict) else {}
    return base + _params_label(json.dumps(keep))


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _pair(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> Any:
    """The paired comparison of two cells (lists of rows, one per seed range) on the first seed range they
    share, or the reason there is none."""
    by_seeds = {str(r.get("seeds", "")): r for r in rows_b}
    for r in rows_a:
        other = by_seeds.get(str(r.get("seeds", "")))
        if other is not None:
            return compare_rows(r, other)
    return "no seed range in common"


def summary_table(df: Any, metric: str = "fid") -> Any:
    """methods x NFE of one metric (latest row per identity; where settings differ, the latest settings: see
    :func:`identity_conflicts`), one row per (label, NFE) with: ``value`` the best over seed ranges (min, or max
    for a metric where higher is better) and its interval ``ci_low``/``ci_high``, ``mean`` and ``count`` over seed
    ranges, ``base`` the label of the base solver an IIA row corrects, ``paired`` its paired comparison with that
    base (a :class:`uncertainty.Paired`, or a string saying why there is none), ``ratio`` (NaN when absent) and
    ``mark``: ``*`` for the best at its NFE when resolved against the runner-up, ``~`` for each method tied for
    best (not resolved against the best); a row identical to the best on every replicate shares its mark and is
    passed over as runner-up. None when the metric has no rows."""
    import pandas as pd

    sub = df[df["metric"] == metric]
    if sub.empty:
        return None
    sub, _ = identity_conflicts(sub)
    params = sub["method_params"].fillna("")
    sub = sub.assign(label=sub["method"] + params.map(_params_label),
                     base=[_base_label(m, p) for m, p in zip(sub["method"], params)])
    for col in ("ci_low", "ci_high", "ci_data", "ci_warning", "ci_method"):
        if col not in sub:
            sub[col] = ""
    high = higher_is_better(metric)
    out = []
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for (label, nfe), part in sub.groupby(["label", "nfe"], sort=False):
        recs = part.to_dict("records")
        cells[(label, int(nfe))] = recs
        best = (max if high else min)(recs, key=lambda r: r["value"])
        out.append(dict(label=label, nfe=int(nfe), value=best["value"], ci_low=_num(best["ci_low"]),
                        ci_high=_num(best["ci_high"]), warning=str(best.get("ci_warning") or ""),
                        mean=float(part["value"].mean()), count=len(part), base=recs[0]["base"],
                        method=recs[0]["method"]))
    g = pd.DataFrame(out)
    paired, ratio = [], []
    for r in out:
        if r["base"] and (r["base"], r["nfe"]) in cells:
            p = _pair(cells[(r["label"], r["nfe"])], cells[(r["base"], r["nfe"])])
            base_value = next(x["value"] for x in out if x["label"] == r["base"] and x["nfe"] == r["nfe"])
            paired.append(p)
            ratio.append(p.ratio if not isinstance(p, str) else (r["value"] / base_value if base_value else float("nan")))
        else:
            paired.append(None)
            ratio.append(float("nan"))
    g["paired"] = pd.Series(paired, dtype=object, index=g.index)
    g["ratio"] = ratio
    marks, best_pair = [""] * len(out), [None] * len(out)
    for nfe in dict.fromkeys(g["nfe"]):
        idx = [i for i, r in enumerate(out) if r["nfe"] == nfe]
        order = sorted(idx, key=lambda i: out[i]["value"], reverse=high)
        top = order[0]
        if len(order) == 1:
            marks[top] = "*"
            continue
        vs = {i: _pair(cells[(out[top]["label"], nfe)], cells[(out[i]["label"], nfe)]) for i in order[1:]}
        # A row with the best's very samples (an IIA method whose guard switched it off) shares the best's mark;
        # the runner-up is the best of the others, so that the best is not "tied" with its own copy.
        twins = [i for i in order[1:] if not isinstance(vs[i], str) and identical(vs[i])]
        rest = [i for i in order[1:] if i not in twins]
        runner = vs[rest[0]] if rest else vs[order[1]]  # only copies of the best: tied with them, as before
        best_pair[top] = runner
        resolved = bool(rest) and not isinstance(runner, str) and runner.resolved
        for i in [top, *twins]:
            marks[i] = "*" if resolved else "~"
        if not resolved:
            for i in rest:
                if isinstance(vs[i], str) or not vs[i].resolved:
                    marks[i] = "~"
    g["mark"] = marks
    g["best_vs_runner_up"] = pd.Series(best_pair, dtype=object, index=g.index)
    g["best"] = [m == "*" for m in marks]
    return g


def _cell_text(metric: str, r: Any) -> str:
    text = _fmt(metric, r.value)
    if r.ci_low == r.ci_low and r.ci_high == r.ci_high:
        text += f" [{_fmt(metric, r.ci_low)}, {_fmt(metric, r.ci_high)}]"
    if r.warning:
        text += "!"
    if r.count > 1:
        text += f" (mean {_fmt(metric, r.mean)})"
    text += f" {r.mark}" if r.mark else "  "
    p = r.paired
    if p is not None and not isinstance(p, str):
        text += "\n" + ("= base (same samples)" if identical(p) else describe(p))
    elif isinstance(p, str) and r.ratio == r.ratio:
        text += f"\nx{r.ratio:.2f} (unpaired)"
    return text


def _metric_title(df: Any, metric: str, g: Any) -> str:
    """'integration RMSE to edm@nfe99, 64 seeds, 95 % intervals (lower is better)'."""
    sub = df[df["metric"] == metric]
    parts = [metric_name(metric)]
    if metric == "integration_rmse" and "reference" in sub:
        refs = sorted({str(r) for r in sub["reference"].dropna() if str(r)})
        if len(refs) == 1:
            parts[0] += f" to {refs[0]}"
    if "n_samples" in sub:
        import pandas as pd

        ns = sorted({int(n) for n in pd.to_numeric(sub["n_samples"], errors="coerce") if n == n})
        if len(ns) == 1:
            parts.append(f"{ns[0]} samples")
    if "ci_method" in sub:
        methods = sorted({str(m) for m in sub["ci_method"].dropna() if str(m)})
        if methods:
            parts.append("95 % intervals: " + ", ".join(methods))
    if int(g["count"].max()) > 1:
        parts.append(f"{'max' if higher_is_better(metric) else 'min'} over seed ranges (mean)")
    return ", ".join(parts) + f" ({'higher' if higher_is_better(metric) else 'lower'} is better)"


def _params_label(text: str) -> str:
    if not isinstance(text, str) or not text or text == "{}":
        return ""
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        return ""
    shown = shown_params(params)
    keep = {k: v for k, v in params.items() if k in _RULES or k in shown}
    return "".join(f" {k}={v}" for k, v in keep.items())


def table_notes(g: Any, metric: str) -> list[str]:
    """What a table cannot show in its cells: interval warnings, comparisons that could not be paired, and how
    many seeds would resolve each unresolved IIA-vs-base comparison at the observed effect."""
    notes, legacy = [], False
    for r in g.itertuples():
        where = f"{r.label} nfe={r.nfe} {metric}"
        if r.warning:
            notes.append(f"{where}: {r.warning}")
        p = r.paired
        if p == LEGACY or r.best_vs_runner_up == LEGACY:
            legacy = True
        elif isinstance(p, str):
            notes.append(f"{where}: no paired comparison with {r.base} ({p})")
        elif p is not None and identical(p):
            notes.append(f"{where}: identical to {r.base} on these seeds (its corrections are off: the guard chose "
                         "alpha = 0, or the coefficients are zero)")
        elif p is not None and not p.resolved:
            need = seeds_to_resolve(p.n, p)
            if need is not None:
                notes.append(f"{where}: x{p.ratio:.3f} vs {r.base} not resolved with {p.n} seeds; about {need:,} "
                             "seeds would resolve it at this effect")
        if r.mark == "~" and isinstance(r.best_vs_runner_up, str) and r.best_vs_runner_up != LEGACY:
            notes.append(f"{where}: best value, but not compared with the runner-up ({r.best_vs_runner_up})")
    if legacy:
        notes.insert(0, f"{metric}: some rows have no interval data ({LEGACY}): they are shown without intervals, "
                     "their ratios are unpaired and no comparison with them counts as resolved")
    return notes


def render_table(df: Any, title: str = "") -> Any:
    """Rich tables, one per metric (registry order): rows = methods, columns = NFE. A cell shows the value with
    its 95 % interval (the best over seed ranges, with the mean when there are several), ``!`` when the interval
    carries a warning, and for an IIA row its paired ratio to its base solver on the same seeds with that ratio's
    interval and whether it is resolved; ``*`` (bold) marks the best method at an NFE when it is resolved against
    the runner-up, ``~`` the methods tied for best. Each title says which direction is better; notes below a
    table list warnings and the seeds an unresolved comparison would need."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    tables = []
    for metric in metric_order(df["metric"]):
        g = summary_table(df, metric)
        if g is None:
            continue
        nfes = sorted({int(n) for n in g["nfe"]})
        table = Table()
        table.add_column("method")
        for n in nfes:
            table.add_column(f"NFE {n}", justify="right")
        cells = {(r.label, int(r.nfe)): r for r in g.itertuples()}
        for label in dict.fromkeys(g["label"]):
            row = []
            for n in nfes:
                r = cells.get((label, n))
                if r is None:
                    row.append("-")
                    continue
                text = _cell_text(metric, r)
                row.append(Text(text, style="bold") if r.mark == "*" else Text(text))
            table.add_row(label, *row)
        has_ratio = any(p is not None for p in g["paired"])
        caption = ("[a, b] = 95 % interval; " + ("x = IIA / its base solver on the same seeds, paired 95 % interval, "
                   "resolved when it excludes 1; " if has_ratio else "")
                   + "* = best at this NFE, resolved against the runner-up; ~ = tied for best (not resolved)")
        if metric == "fid":
            caption += ("; FID is biased upward at small N (not noise: the interval covers only the seeds' "
                        "randomness), compare methods by the paired ratios or by KID")
        notes = table_notes(g, metric)
        tables += [Text(_metric_title(df, metric, g), style="bold"), table, Text(caption, style="dim")]
        tables += [Text(f"note: {n}") for n in notes]
    return Group(*([Text(title, style="bold underline")] if title and tables else []), *tables)


def compare_methods(df: Any, a: str, b: str) -> Any:
    """Every paired comparison of method labels ``a`` and ``b`` across NFEs and metrics, as a Rich table."""
    from rich.table import Table

    table = Table(title=f"{a} vs {b}: paired comparisons on the same seeds (ratio = {a} / {b})")
    for col in ("metric", "NFE", a, b, "ratio [95 %]", "verdict", f"P({a} better)", "seeds", "note"):
        table.add_column(col, justify="left" if col in ("metric", "verdict", "note") else "right", no_wrap=True)
    found = 0
    for metric in metric_order(df["metric"]):
        g = summary_table(df, metric)
        if g is None:
            continue
        sub = df[df["metric"] == metric]
        sub, _ = identity_conflicts(sub)
        sub = sub.assign(label=sub["method"] + sub["method_params"].fillna("").map(_params_label))
        for nfe in sorted({int(n) for n in sub["nfe"]}):
            ra = sub[(sub["label"] == a) & (sub["nfe"] == nfe)].to_dict("records")
            rb = sub[(sub["label"] == b) & (sub["nfe"] == nfe)].to_dict("records")
            if not ra or not rb:
                continue
            found += 1
            p = _pair(ra, rb)
            va, vb = _fmt(metric, ra[0]["value"]), _fmt(metric, rb[0]["value"])
            if isinstance(p, str):
                table.add_row(metric_name(metric), str(nfe), va, vb, "-", "not paired", "-", "-", p)
                continue
            better = p.ratio > 1 if higher_is_better(metric) else p.ratio < 1
            verdict = (f"{a if better else b} better" if p.resolved else "not resolved")
            pi = "-" if p.prob_improvement is None else f"{p.prob_improvement:.2f}"
            need = seeds_to_resolve(p.n, p) if not p.resolved else None
            note = p.warning or (f"about {need:,} seeds would resolve it" if need else "")
            table.add_row(metric_name(metric), str(nfe), va, vb, f"x{p.ratio:.3f} [{p.low:.3f}, {p.high:.3f}]",
                          verdict, pi, str(p.n), note)
    return table, found


def figure_title(df: Any) -> str:
    """'<experiment> (<model>)' of a results table (several names joined by commas)."""
    def names(col: str) -> str:
        if col not in df:
            return ""
        return ", ".join(dict.fromkeys(str(v) for v in df[col].dropna() if str(v)))

    exp, model = names("experiment"), names("model")
    return f"{exp} ({model})" if exp and model else exp or model


def results_figure(df: Any, metrics: Sequence[str] | None = None, title: str | None = None) -> Any:
    """A matplotlib figure of value vs NFE, one panel per metric (every metric in ``df`` unless ``metrics``),
    log y-scale where a panel's values span more than a decade, integer NFE ticks, the title naming the
    experiment and model, one legend outside the panels. An IIA method and its base solver share a colour:
    IIA solid, the base dashed."""
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend or figure state
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    wanted = metric_order(df["metric"]) if metrics is None else list(metrics)
    tables = [(m, summary_table(df, m)) for m in wanted]
    missing = [m for m, g in tables if g is None]
    if missing:
        have = ", ".join(metric_order(df["metric"])) or "none"
        raise IIARuntimeError(f"no {', '.join(missing)} rows to plot (metrics in the results: {have})")
    fig = Figure(figsize=(4.6 * len(tables), 3.8))
    axes = fig.subplots(1, len(tables), squeeze=False)
    families: dict[str, int] = {}
    markers = ("o", "s", "^", "D", "v", "P")
    styles: dict[str, dict[str, Any]] = {}
    for _, g in tables:
        for label, method, base in zip(g["label"], g["method"], g["base"]):
            if label in styles:
                continue
            family = base or label
            colour = families.setdefault(family, len(families))
            if base:
                k = sum(1 for s in styles.values() if s["family"] == family and s["ls"] == "-")
                styles[label] = dict(family=family, color=f"C{colour % 10}", ls="-", marker=markers[k % len(markers)])
            else:
                styles[label] = dict(family=family, color=f"C{colour % 10}", ls="--", marker="x")
    handles: dict[str, Any] = {}
    for ax, (metric, g) in zip(axes[0], tables):
        for label in dict.fromkeys(g["label"]):
            part = g[g["label"] == label].sort_values("nfe")
            st = styles[label]
            (line,) = ax.plot(part["nfe"], part["value"], color=st["color"], linestyle=st["ls"], marker=st["marker"],
                              label=label)
            if part["ci_low"].notna().all() and part["ci_high"].notna().all():  # the 95 % interval as a band
                ax.fill_between(part["nfe"], part["ci_low"], part["ci_high"], color=st["color"], alpha=0.12,
                                linewidth=0)
            handles.setdefault(label, line)
        vals = g["value"][g["value"] > 0]
        if len(vals) == len(g) and vals.max() / vals.min() > 10:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
        nfes = sorted({int(n) for n in g["nfe"]})
        if len(nfes) <= 12:
            ax.set_xticks(nfes)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric_name(metric))
        ax.set_title(f"{metric_name(metric)} ({'higher' if higher_is_better(metric) else 'lower'} is better)",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
    head = title if title is not None else figure_title(df)
    fig.suptitle((f"{head}: " if head else "") + "IIA (solid) vs its base solver (dashed), 95 % intervals shaded",
                 fontsize=11)
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    fig.tight_layout()
    return fig


def _minor_log_label(v: float, _: Any = None) -> str:
    """Label the minor ticks 2 and 5 of each decade of a log axis (plain numbers), leave the rest blank."""
    if v <= 0:
        return ""
    mantissa = v / 10 ** math.floor(math.log10(v))
    return f"{v:g}" if min(abs(mantissa - 2), abs(mantissa - 5)) < 1e-6 else ""


def plot_results(df: Any, out: str | Path, metrics: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write :func:`results_figure` to a PNG."""
    fig = results_figure(df, metrics, title)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return Path(out)
