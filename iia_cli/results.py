"""The tidy results CSV: one row per (method, NFE, seed range, metric), appended under a file lock.

Appending never rewrites earlier rows, and several processes (SLURM array tasks) may append to one
file at once: each append takes an exclusive lock and writes whole rows in one write.
"""

from __future__ import annotations

import csv
import functools
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
    "sampling_seconds", "device", "tool_version", "git_revision", "host", "timestamp",
]


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


def append_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows (header first if the file is new) under an exclusive lock, in one write. If that fails,
    the rows go to a rescue CSV beside it (or under ./iia-rescued) and the error names it."""
    path = Path(path)
    try:
        _append_rows(path, rows)
    except (OSError, IIARuntimeError) as exc:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore").writeheader()
        csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore").writerows(rows)
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        write_rescue_copy(path.with_suffix(".unsaved.csv"), lambda tmp: tmp.write_text(buf.getvalue()), reason,
                          f"{len(rows)} result rows", first=[path.parent])


def _append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with csv_lock(path):
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != COLUMNS:
                raise IIARuntimeError(f"results file {path} has other columns than this tool writes; "
                                      f"write to a new file with --csv")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        with path.open("a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()


def read_results(path: str | Path) -> Any:
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise MissingFileError("results file", path)
    try:
        return pd.read_csv(path, dtype={"seeds": str, "method_params": str})
    except Exception as exc:  # pandas raises many kinds
        raise IIARuntimeError(f"results file {path} cannot be read as CSV ({exc})") from None


def summary_table(df: Any, metric: str = "fid") -> Any:
    """methods x NFE table of 'min / mean' over seed ranges for one metric (last run of each cell)."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        return None
    # keep the latest experiment run per (method, params, nfe, seeds)
    sub = sub.sort_values("timestamp").drop_duplicates(["method", "method_params", "nfe", "seeds", "grid"], keep="last")
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

