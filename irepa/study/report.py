"""The report of a study: per-target table, correlation table, scatter plots.

- targets.csv: one row per target: its metrics (irepa.study.targets.COLUMNS) and, per method
  and eval step, the mean and sample sd over seeds of the generation metric and the class
  accuracy of the samples (and the number of seeds scored).
- correlation.csv: per method, eval step, quality (the metric "fd" or "class_acc") and target
  metric: n, Pearson r and Spearman rho, each with its bootstrap interval and permutation p
  (irepa.study.stats).
- summary.md: both tables at the last eval step, with the setup.
- scatter.png (and scatter_class_acc.png): generation quality at the last eval step against
  each target metric, one point per target and method (bars: sd over seeds), a least-squares
  line per method, the no-alignment mean as a dashed line.
Everything is computed from the files the study keeps, so a resumed study writes the same
CSVs as an uninterrupted one.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from irepa.compare.layout import SETUP, write_atomic
from irepa.compare.report import load_results

from .spec import BASELINE, StudySpec, run_label
from .stats import correlate
from .targets import COLUMNS, load_rows

QUALITIES = {"fd": ("value", "lower is better"), "class_acc": ("class_acc", "higher is better")}
PLOTTED = ("lds", "cds", "srss", "rmsc", "probe_acc", "global_share")


def quality(out: Path, spec: StudySpec) -> dict[tuple[str, int, str], np.ndarray]:
    """(comparison recipe, step, quality) -> values over the seeds scored so far."""
    cs = spec.compare_spec()
    got: dict[tuple[str, int, str], list] = {}
    for row in load_results(Path(out) / "compare", cs):
        for q, (key, _) in QUALITIES.items():
            got.setdefault((row["recipe"], row["step"], q), []).append(float(row[key]))
    return {k: np.asarray(v) for k, v in got.items()}


def _mean_sd(v: np.ndarray | None) -> tuple[float, float, int]:
    if v is None or len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def target_table(spec: StudySpec, targets: dict[str, dict], q: dict) -> list[dict]:
    rows = []
    for t in spec.targets:
        row = {"target": t, **{c: targets.get(t, {}).get(c, math.nan) for c in COLUMNS}}
        for m in spec.methods:
            for step in spec.eval_steps:
                for name in QUALITIES:
                    mean, sd, n = _mean_sd(q.get((run_label(m, t), step, name)))
                    row.update({f"{m}_{name}_{step}": mean, f"{m}_{name}_{step}_sd": sd, f"{m}_seeds_{step}": n})
        rows.append(row)
    return rows


def correlation_table(spec: StudySpec, table: list[dict]) -> list[dict]:
    out = []
    for m in spec.methods:
        for step in reversed(spec.eval_steps):
            for name in QUALITIES:
                y = [r[f"{m}_{name}_{step}"] for r in table]
                for col in COLUMNS:
                    stats = correlate([r[col] for r in table], y, spec.bootstrap, spec.permutations,
                                      seed=spec.stats_seed)
                    out.append({"method": m, "step": step, "quality": name, "metric": col, **stats})
    return out


def _csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    cols = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_atomic(path, buf.getvalue().encode())


def _fmt(v: float, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pm(mean: float, sd: float, digits: int) -> str:
    """mean ± sd, or the mean alone where there is no sd (one seed)."""
    return _fmt(mean, digits) + ("" if math.isnan(sd) else f" ± {_fmt(sd, digits)}")


def _r_cell(s: dict, method: str) -> str:
    if math.isnan(s.get(method, math.nan)):
        return "-"
    return f"{s[method]:+.2f} [{s[method + '_lo']:+.2f}, {s[method + '_hi']:+.2f}] p={s[method + '_p']:.3f}"


def write_markdown(path: Path, spec: StudySpec, table: list[dict], corr: list[dict], setup: dict, base: dict) -> str:
    step = spec.eval_steps[-1]
    methods = list(spec.methods)
    lines = [f"Metric: {setup.get('description', spec.metric)}; real-data floor "
             f"{setup.get('floor', math.nan):.2f}. Scored at steps {spec.eval_steps} with {spec.num_samples} "
             f"class-balanced samples (no guidance, EMA weights); seeds {spec.seeds}, mean ± sd over seeds. "
             f"Target metrics on the {spec.images} digits images.", ""]
    if base:
        lines += [f"No alignment ({BASELINE}) at step {step}: FD {_pm(*base['fd'], 2)}, "
                  f"class accuracy {_fmt(100 * base['class_acc'][0], 1)}%.", ""]
    head = ["target", "LDS", "CDS", "SRSS", "RMSC", "probe", "global"]
    head += [f"{m} FD @{step}" for m in methods] + [f"{m} acc @{step} (%)" for m in methods]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["target"]] + [_fmt(r[c]) for c in ("lds", "cds", "srss", "rmsc", "probe_acc", "global_share")]
        cells += [_pm(r[f"{m}_fd_{step}"], r[f"{m}_fd_{step}_sd"], 1) for m in methods]
        cells += [f"{_fmt(100 * r[f'{m}_class_acc_{step}'], 1)}" for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Correlation with the generation metric (FD, lower is better) across the {len(table)} targets at "
                  f"step {step}: r [95% bootstrap interval] and the two-sided permutation p. The paper's direction "
                  f"is a negative r for the spatial metrics (more structure, lower FD) and a weak one for the probe.",
              "", "| method | metric | Pearson r | Spearman rho |", "|---|---|---|---|"]
    for s in corr:
        if s["step"] == step and s["quality"] == "fd":
            lines.append(f"| {s['method']} | {s['metric']} | {_r_cell(s, 'pearson')} | {_r_cell(s, 'spearman')} |")
    text = "\n".join(lines) + "\n"
    write_atomic(path, text.encode())
    return text


def _baseline(q: dict, step: int) -> dict:
    out = {}
    for name in QUALITIES:
        mean, sd, n = _mean_sd(q.get((BASELINE, step, name)))
        if n:
            out[name] = (mean, sd)
    return out if len(out) == len(QUALITIES) else {}


def write_plot(path: Path, spec: StudySpec, table: list[dict], corr: list[dict], quality_name: str,
               base: dict) -> None:
    from irepa.analysis import agg_pyplot

    plt = agg_pyplot()
    step = spec.eval_steps[-1]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), dpi=90)
    markers = "osD^v<>"
    for ax, col in zip(axes.flat, PLOTTED):
        x = np.array([r[col] for r in table], float)
        title = [col]
        for i, m in enumerate(spec.methods):
            y = np.array([r[f"{m}_{quality_name}_{step}"] for r in table], float)
            sd = np.nan_to_num(np.array([r[f"{m}_{quality_name}_{step}_sd"] for r in table], float))
            ok = np.isfinite(x) & np.isfinite(y)
            bars = ax.errorbar(x[ok], y[ok], yerr=sd[ok], fmt=markers[i % len(markers)], ms=5, capsize=2, label=m)
            if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
                a, b = np.polyfit(x[ok], y[ok], 1)
                xs = np.linspace(x[ok].min(), x[ok].max(), 2)
                ax.plot(xs, a * xs + b, "-", lw=1, color=bars[0].get_color())
            if i == 0:
                for xi, yi, r in zip(x[ok], y[ok], [r for r, o in zip(table, ok) if o]):
                    ax.annotate(r["target"], (xi, yi), fontsize=6, alpha=0.7, xytext=(3, 3), textcoords="offset points")
            s = next(c for c in corr if c["method"] == m and c["step"] == step and c["quality"] == quality_name
                     and c["metric"] == col)
            title.append(f"{m}: r={_fmt(s['pearson'], 2)} (p={_fmt(s['pearson_p'], 2)}), "
                         f"rho={_fmt(s['spearman'], 2)} (p={_fmt(s['spearman_p'], 2)})")
        if base:
            ax.axhline(base[quality_name][0], color="gray", ls="--", lw=1, label=f"{BASELINE} (no alignment)")
        ax.set_title("\n".join(title), fontsize=7)
        ax.set_xlabel(col)
        ax.set_ylabel(f"{quality_name} @ step {step} ({QUALITIES[quality_name][1]})", fontsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"generation quality vs target metric, one point per target and method; bars: sd over "
                 f"{len(spec.seeds)} seeds", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: str | Path, spec: StudySpec) -> Path:
    """targets.csv, correlation.csv, summary.md and the scatter plots from what OUT holds; -> summary.md."""
    out = Path(out)
    q = quality(out, spec)
    table = target_table(spec, load_rows(out, spec.targets), q)
    corr = correlation_table(spec, table)
    setup_path = out / "compare" / SETUP
    setup = json.loads(setup_path.read_text()) if setup_path.is_file() else {}
    base = _baseline(q, spec.eval_steps[-1])
    _csv(out / "targets.csv", table)
    _csv(out / "correlation.csv", corr)
    write_markdown(out / "summary.md", spec, table, corr, setup, base)
    if any(math.isfinite(r[f"{m}_fd_{spec.eval_steps[-1]}"]) for r in table for m in spec.methods):
        write_plot(out / "scatter.png", spec, table, corr, "fd", base)
        write_plot(out / "scatter_class_acc.png", spec, table, corr, "class_acc", base)
    return out / "summary.md"
