"""Encoder tables (CSV) and the correlation of spatial metrics with gFID across encoders.

A table holds one row per encoder: an `encoder` column, metric columns (METRIC_COLUMNS)
and a gFID column. correlate_rows gives Pearson and Spearman r per metric; plot_correlation
draws metric vs gFID with a least-squares line, one panel per metric (the paper's Figure 4).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from irepa.analysis.spatial import correlation
from irepa.errors import InputError, InputNotFound

METRIC_COLUMNS = ("lds", "lds_paper", "cds", "srss", "rmsc", "probe_acc", "global_share")


# ---------------------------------------------------------------------------------------
# tables

def write_rows(rows: Sequence[dict], path: Path) -> None:
    """Rows as CSV; the columns are the union of the rows' keys, in first-seen order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def read_rows(path: str | Path) -> list[dict]:
    """CSV rows with every value that parses as a number (nan included) turned into a float.

    Column names and values are stripped of surrounding spaces ("encoder, gfid" works); a
    missing file or a table without rows is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"table {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        rows = [{k: _number(v.strip()) for k, v in zip(header, r + [""] * (len(header) - len(r)))}
                for r in reader if any(v.strip() for v in r)]
    if not rows:
        raise InputError(f"table {path} has no rows (header: {header})")
    return rows


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _require(rows: Sequence[dict], columns: Sequence[str], source: str) -> None:
    have = list(rows[0]) if rows else []
    missing = [c for c in columns if c not in have]
    if missing:
        raise InputError(f"{source} has no column {missing[0]!r} (columns: {have})")


def join_column(rows: Sequence[dict], other: Sequence[dict], column: str,
                source: str = "the joined table") -> list[dict]:
    """`rows` with `column` taken from the row of `other` with the same encoder."""
    _require(rows, ["encoder"], "the metrics table")
    _require(other, ["encoder", column], source)
    by_name: dict = {}
    for r in other:
        if r["encoder"] in by_name:
            raise InputError(f"{source} lists encoder {r['encoder']!r} twice")
        by_name[r["encoder"]] = r
    missing = [r["encoder"] for r in rows if r["encoder"] not in by_name]
    if missing:
        raise InputError(f"{source} has no {column} for encoders {missing}")
    return [{**r, column: by_name[r["encoder"]][column]} for r in rows]


# ---------------------------------------------------------------------------------------
# correlation with gFID

def correlate_rows(rows: Sequence[dict], target: str = "gfid",
                   metrics: Sequence[str] | None = None, source: str = "the table") -> list[dict]:
    """Pearson and Spearman r of each metric column against `target`, across rows (encoders).

    metrics None: every column of METRIC_COLUMNS the table has; named metrics must all be
    columns of the table. r is NaN for a metric with fewer than 3 encoders where both it
    and the target are finite (n says how many)."""
    if not rows or target not in rows[0]:
        raise InputError(f"{source} has no {target!r} column (columns: {list(rows[0]) if rows else []})")
    if metrics:
        unknown = [m for m in metrics if m not in rows[0]]
        if unknown:
            raise InputError(f"metrics {unknown} are not columns of {source} (columns: {list(rows[0])})")
    else:
        metrics = [m for m in METRIC_COLUMNS if m in rows[0]]
        if not metrics:
            raise InputError(f"none of the metric columns {list(METRIC_COLUMNS)} is in {source} "
                             f"(columns: {list(rows[0])})")
    y = [_as_float(r[target]) for r in rows]
    return [{"metric": m, **correlation([_as_float(r[m]) for r in rows], y)} for m in metrics]


def _as_float(v) -> float:
    return v if isinstance(v, float) else math.nan


def plot_correlation(rows: Sequence[dict], stats: Sequence[dict], path: Path, target: str = "gfid") -> None:
    """One panel per metric: metric vs target, least-squares line, Pearson/Spearman r in the title."""
    plt = agg_pyplot()
    ncols = min(3, len(stats))
    nrows = math.ceil(len(stats) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(stats):]:
        ax.axis("off")
    y = np.array([_as_float(r[target]) for r in rows])
    for ax, s in zip(axes.flat, stats):
        x = np.array([_as_float(r[s["metric"]]) for r in rows])
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=18)
        for xi, yi, r in zip(x[ok], y[ok], [r for r, o in zip(rows, ok) if o]):
            ax.annotate(str(r.get("encoder", "")), (xi, yi), fontsize=6, alpha=0.7)
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            a, b = np.polyfit(x[ok], y[ok], 1)
            xs = np.linspace(x[ok].min(), x[ok].max(), 2)
            ax.plot(xs, a * xs + b, "r-", lw=1)
        ax.set_title(f"{s['metric']}: r={s['pearson_r']:.2f}, rho={s['spearman_r']:.2f}", fontsize=9)
        ax.set_xlabel(s["metric"])
        ax.set_ylabel(target)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def agg_pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on training machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
