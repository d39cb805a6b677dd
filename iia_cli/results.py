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
        df[col] = df[col].fillna("").astype(str)
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


def summary_table(df: Any, metric: str = "fid") -> Any:
    """methods x NFE table of 'min / mean' over seed ranges for one metric (latest row per identity; where
    settings differ, the latest settings: see :func:`identity_conflicts`)."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        return None
    sub, _ = identity_conflicts(sub)
    sub = sub.assign(label=sub["method"] + sub["method_params"].fillna("").map(_params_label))
    g = sub.groupby(["label", "nfe"], sort=False)["value"].agg(["min", "mean", "count"]).reset_index()
    return g


def _params_label(text: str) -> str:
    if not isinstance(text, str) or not text or text == "{}":
        return ""
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        return ""
    keep = {k: v for k, v in params.items() if k == "r" or (k == "quantities" and v != 2)}
    return "".join(f" {k}={v}" for k, v in keep.items())


def render_table(df: Any, title: str = "") -> Any:
    """A rich Table: rows = methods, columns = NFE; cells 'FID min (mean)' and the integration RMSE."""
    from rich.table import Table

    fid = summary_table(df, "fid")
    rmse = summary_table(df, "integration_rmse")
    base = fid if fid is not None else rmse
    table = Table(title=title or None)
    table.add_column("method")
    if base is None:
        return table
    nfes = sorted({int(n) for n in base["nfe"]})
    labels = list(dict.fromkeys(base["label"]))
    for n in nfes:
        table.add_column(f"NFE {n}", justify="right")

    def cell(label: str, n: int) -> str:
        parts = []
        if fid is not None:
            hit = fid[(fid["label"] == label) & (fid["nfe"] == n)]
            if len(hit):
                r = hit.iloc[0]
                parts.append(f"FID {r['min']:.2f}" + (f" (mean {r['mean']:.2f})" if r["count"] > 1 else ""))
        if rmse is not None:
            hit = rmse[(rmse["label"] == label) & (rmse["nfe"] == n)]
            if len(hit):
                parts.append(f"err {hit.iloc[0]['min']:.4f}")
        return " / ".join(parts) or "-"

    for label in labels:
        table.add_row(label, *[cell(label, n) for n in nfes])
    return table


def plot_results(df: Any, out: str | Path, metric: str = "fid") -> Path:
    """FID-vs-NFE curves, one line per method (min over seed ranges)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = summary_table(df, metric)
    if g is None:
        raise IIARuntimeError(f"no {metric} rows to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, part in g.groupby("label", sort=False):
        part = part.sort_values("nfe")
        ax.plot(part["nfe"], part["min"], marker="o", label=label)
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric)
    if metric == "fid" and (g["min"] > 0).all() and g["min"].max() / max(g["min"].min(), 1e-9) > 5:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)

