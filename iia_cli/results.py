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

from . import __version__
from .atomic import write_rescue_copy
from .errors import IIARuntimeError, MissingFileError
from .paths import csv_lock

COLUMNS = [
    "experiment", "model", "model_sha256", "method", "method_params", "r", "M", "B", "grid", "nfe", "seeds",
    "n_samples", "metric", "value", "reference", "reference_sha256", "coefficient_file", "calibration_seconds",
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
    root = Path(__file__).resolve().parents[1]
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
        why = "it has no identity column (written by an older iia_cli)" if "identity" not in header else \
            "its columns differ from the ones this tool writes"
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
    for col in ("method_params", "timestamp", "seeds", "grid", "identity", "identity_fields"):
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


# Metrics: display name and which direction is better; tables and plots list them in this order (the
# integration error first: it is the metric that every model resolves, FID second).
METRIC_INFO: dict[str, tuple[str, bool]] = {
    "integration_rmse": ("integration RMSE", False),
    "fid": ("FID", False),
    "clip_score": ("CLIP score", True),
}


def metric_order(metrics: Any) -> list[str]:
    """The metrics present, the known ones first in :data:`METRIC_INFO` order, then the rest by name."""
    present = list(dict.fromkeys(str(m) for m in metrics))
    return [m for m in METRIC_INFO if m in present] + sorted(m for m in present if m not in METRIC_INFO)


def higher_is_better(metric: str) -> bool:
    return METRIC_INFO.get(metric, (metric, False))[1]


def metric_name(metric: str) -> str:
    return METRIC_INFO.get(metric, (metric, False))[0]


@functools.lru_cache(maxsize=None)
def base_method(method: str) -> str | None:
    """The base solver an IIA method corrects, from the method registry (None for a base solver or an
    unknown name)."""
    from .methods import METHODS

    spec = METHODS.get(method)
    return spec.base if spec is not None and spec.is_iia else None


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
    keep = {k: v for k, v in data.items() if k == "convention"} if isinstance(data, dict) else {}
    return base + _params_label(json.dumps(keep))


def summary_table(df: Any, metric: str = "fid") -> Any:
    """methods x NFE of one metric (latest row per identity; where settings differ, the latest settings: see
    :func:`identity_conflicts`), one row per (label, NFE) with: ``value`` the best over seed ranges (min, or max
    for a metric where higher is better), ``mean`` and ``count`` over seed ranges, ``base`` the label of the
    base solver an IIA row corrects, ``ratio`` its value over that base's at the same NFE (NaN when absent), and
    ``best`` whether it is the best value at its NFE. None when the metric has no rows."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        return None
    sub, _ = identity_conflicts(sub)
    params = sub["method_params"].fillna("")
    sub = sub.assign(label=sub["method"] + params.map(_params_label),
                     base=[_base_label(m, p) for m, p in zip(sub["method"], params)])
    high = higher_is_better(metric)
    g = sub.groupby(["label", "nfe"], sort=False).agg(
        value=("value", "max" if high else "min"), mean=("value", "mean"), count=("value", "count"),
        base=("base", "first"), method=("method", "first")).reset_index()
    values = {(lab, n): v for lab, n, v in zip(g["label"], g["nfe"], g["value"])}
    g["ratio"] = [v / values[(b, n)] if b and values.get((b, n)) else float("nan")
                  for b, n, v in zip(g["base"], g["nfe"], g["value"])]
    target = g.groupby("nfe")["value"].transform("max" if high else "min")
    g["best"] = g["value"] == target
    return g


def _fmt(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric == "fid" else f"{value:#.4g}"


def _metric_title(df: Any, metric: str, g: Any) -> str:
    """'FID, 200 samples per seed range, best of 2 ranges (mean in brackets): lower is better'."""
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
    keep = {k: v for k, v in params.items() if k in ("r", "convention") or (k == "quantities" and v != 2)}
    return "".join(f" {k}={v}" for k, v in keep.items())


def render_table(df: Any, title: str = "") -> Any:
    """Rich tables, one per metric (integration error first, then FID, then the rest): rows = methods,
    columns = NFE. A cell shows the value (the best over seed ranges, with the mean when there are several),
    ``x0.52`` for an IIA row = its value / its base solver's at that NFE, and ``*`` (bold) for the best
    method at that NFE. Each title says which direction is better."""
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
                text = _fmt(metric, r.value) + (f" (mean {_fmt(metric, r.mean)})" if r.count > 1 else "")
                text += f" x{r.ratio:.2f}" if r.ratio == r.ratio else ""
                text += " *" if r.best else "  "
                row.append(f"[bold]{text}[/bold]" if r.best else text)
            table.add_row(label, *row)
        has_ratio = bool((g["ratio"] == g["ratio"]).any())
        caption = ("x0.52 = IIA / its base solver at this NFE; " if has_ratio else "") + "* = best at this NFE"
        tables += [Text(_metric_title(df, metric, g), style="bold"), table, Text(caption, style="dim")]
    return Group(*([Text(title, style="bold underline")] if title and tables else []), *tables)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    wanted = metric_order(df["metric"]) if metrics is None else list(metrics)
    tables = [(m, summary_table(df, m)) for m in wanted]
    missing = [m for m, g in tables if g is None]
    if missing:
        have = ", ".join(metric_order(df["metric"])) or "none"
        raise IIARuntimeError(f"no {', '.join(missing)} rows to plot (metrics in the results: {have})")
    fig, axes = plt.subplots(1, len(tables), figsize=(4.6 * len(tables), 3.8), squeeze=False)
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
    fig.suptitle((f"{head}: " if head else "") + "IIA (solid) vs its base solver (dashed)", fontsize=11)
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
    import matplotlib.pyplot as plt

    fig = results_figure(df, metrics, title)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)
