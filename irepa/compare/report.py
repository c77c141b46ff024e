"""The report of a comparison: CSV, markdown table, convergence plot, TensorBoard scalars.

- results.csv: one row per (recipe, seed, step): metric name, value, class accuracy, samples.
  It holds only what the runs compute (no timings), so a resumed comparison writes the
  same file as an uninterrupted one.
- summary.md: the metric used and its real-data floor, then per recipe and eval step the
  mean and the sample standard deviation over seeds, the class accuracy at the last step,
  the steps each recipe needs to reach the first recipe's final mean, and run times.
- convergence.png: metric and class accuracy against steps, one line (mean over seeds) per
  recipe and a band from the lowest to the highest seed.
- tb/<recipe>/seed-<s> and tb/<recipe>/mean: eval/<metric> and eval/class_acc scalars.
- eval_noise.csv (with --eval_noise): the last checkpoints scored with other evaluation noise
  batches; summary.md then compares this sampling spread of the metric with the seed spread.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .evaluate import METRIC_LABELS
from .layout import SETUP, eval_path, run_name, write_atomic
from .spec import CompareSpec

CSV_FIELDS = ("recipe", "seed", "step", "metric", "value", "class_acc", "num_samples")


def load_results(out: Path, spec: CompareSpec) -> list[dict]:
    """The evaluations present, in spec order (recipes, then seeds, then steps)."""
    rows = []
    for r in spec.recipes:
        for s in spec.seeds:
            for step in spec.eval_steps:
                p = eval_path(out, r, s, step)
                if p.is_file():
                    rows.append(json.loads(p.read_text()))
    return rows


def load_noise(out: Path, spec: CompareSpec) -> list[dict]:
    """Scores of the last checkpoints under other evaluation seeds (--eval_noise), in spec order."""
    rows = []
    for r, s in spec.runs():
        folder = Path(out) / "evals" / run_name(r, s)
        found = [json.loads(p.read_text()) for p in folder.glob(f"step-{spec.steps:07d}-eval-seed-*.json")]
        rows += sorted(found, key=lambda d: d["eval_seed"])
    return rows


def noise_summary(rows: list[dict], noise: list[dict], spec: CompareSpec) -> list[str]:
    """Markdown lines on the metric's sampling noise at the last step (--eval_noise).

    Every run is scored with the same noise batches, so a batch shifts all runs alike: besides
    the sd of one checkpoint's score over batches (next to the sd over training seeds), the
    difference of each recipe's seed-mean to the first recipe's, batch by batch, says whether
    the ranking survives a change of batch."""
    score = {(r["recipe"], r["seed"], spec.eval_seed): r["value"] for r in rows if r["step"] == spec.steps}
    score.update({(r["recipe"], r["seed"], r["eval_seed"]): r["value"] for r in noise})
    batches = sorted({k[2] for k in score})
    if len(batches) < 2:
        return []
    names = [r.name for r in spec.recipes]

    def per_seed(name):
        return [s for s in spec.seeds if all((name, s, e) in score for e in batches)]

    sd_batch = {n: np.mean([np.std([score[n, s, e] for e in batches], ddof=1) for s in per_seed(n)])
                for n in names if per_seed(n)}
    sd_seed = {n: np.std([score[n, s, spec.eval_seed] for s in per_seed(n)], ddof=1) if len(per_seed(n)) > 1
               else float("nan") for n in sd_batch}
    out = ["", f"Metric noise at step {spec.steps}, {len(batches)} evaluation noise batches (eval seeds "
               f"{batches[0]}..{batches[-1]}, each shared by all runs):", "",
           "| recipe | sd over batches (one checkpoint) | sd over seeds | mean - " + names[0] + " per batch |",
           "|---|---|---|---|"]
    base = {e: np.mean([score[names[0], s, e] for s in per_seed(names[0])]) for e in batches}
    for n in sd_batch:
        diffs = [np.mean([score[n, s, e] for s in per_seed(n)]) - base[e] for e in batches]
        d = ", ".join(f"{v:+.2f}" for v in diffs)
        out.append(f"| {n} | {sd_batch[n]:.2f} | {sd_seed[n]:.2f} | {d} (mean {np.mean(diffs):+.2f}, "
                   f"sd {np.std(diffs, ddof=1):.2f}) |")
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in rows:
        w.writerow([r["recipe"], r["seed"], r["step"], r["metric"], f"{r['value']:.6f}", f"{r['class_acc']:.6f}",
                    r["num_samples"]])
    write_atomic(path, buf.getvalue().encode())


def curves(rows: list[dict], spec: CompareSpec, key: str) -> dict[str, dict[int, np.ndarray]]:
    """recipe -> step -> values over the seeds present."""
    out: dict[str, dict[int, list]] = {r.name: {} for r in spec.recipes}
    for row in rows:
        out[row["recipe"]].setdefault(row["step"], []).append(row[key])
    return {r: {s: np.asarray(v, float) for s, v in d.items()} for r, d in out.items()}


def _mean_sd(v: np.ndarray, digits: int) -> str:
    if len(v) == 0:
        return "-"
    sd = f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else ""
    return f"{v.mean():.{digits}f}{sd}"


def steps_to_reach(means: dict[int, float], target: float) -> float | None:
    """First step (linear interpolation between eval steps) where a falling curve is <= target."""
    pts = sorted(means.items())
    if not pts:
        return None
    if pts[0][1] <= target:
        return float(pts[0][0])
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if v1 <= target:
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def _timings(rows: list[dict]) -> str:
    by_run: dict[tuple, dict] = {}
    for r in rows:
        t = by_run.setdefault((r["recipe"], r["seed"]), {"train": 0.0, "eval": 0.0, "train_cpu": 0.0, "eval_cpu": 0.0})
        t["train"] += r.get("train_seconds", 0.0)
        t["eval"] += r.get("eval_seconds", 0.0)
        t["train_cpu"] += r.get("train_cpu_seconds", 0.0)
        t["eval_cpu"] += r.get("eval_cpu_seconds", 0.0)
    if not by_run:
        return ""
    mean = {k: np.mean([t[k] for t in by_run.values()]) for k in ("train", "eval", "train_cpu", "eval_cpu")}
    threads = sorted({r.get("torch_threads") for r in rows})
    ranks = sorted({r.get("rank") for r in rows})
    return (f"Time per run (mean of {len(by_run)}; wall / process CPU, as measured in the invocation that finished "
            f"each segment): training {mean['train']:.0f} s / {mean['train_cpu']:.0f} s, evaluation "
            f"{mean['eval']:.0f} s / {mean['eval_cpu']:.0f} s; torch threads {threads}, ranks {ranks}.")


def speedup_table(vals: dict[str, dict[int, np.ndarray]], spec: CompareSpec) -> list[str]:
    """Markdown rows: for the first recipe's mean at each eval step after the first (the target),
    the step at which each recipe's mean reaches it (linear between eval steps) and the speed-up
    (target step / that step)."""
    base = spec.recipes[0].name
    means = {r: {k: float(v.mean()) for k, v in d.items() if len(v)} for r, d in vals.items()}
    targets = [s for s in spec.eval_steps[1:] if s in means[base]]
    if not targets:
        return []
    lines = ["", f"Steps to reach {base}'s mean at each eval step (linear between eval steps; speed-up = "
                 f"that step / steps needed):", "",
             f"| {base}'s mean at | " + " | ".join(r.name for r in spec.recipes) + " |",
             "|---|" + "---|" * len(spec.recipes)]
    for t in targets:
        cells = []
        for r in spec.recipes:
            s = steps_to_reach(means[r.name], means[base][t])
            cells.append(f"> {max(means[r.name])}" if s is None else f"{s:.0f} ({t / s:.2f}x)")
        lines.append(f"| step {t}: {means[base][t]:.2f} | " + " | ".join(cells) + " |")
    return lines


def _samplers(spec: CompareSpec, setup: dict) -> str:
    """'heun, 10 steps' when every recipe samples alike, else each recipe's sampler."""
    known = setup.get("samplers") or {}
    used = {r.name: tuple(known.get(r.name) or (r.sample_method or spec.sample_method,
                                                 r.sample_steps or spec.sample_steps)) for r in spec.recipes}
    if len(set(used.values())) == 1:
        method, steps = next(iter(used.values()))
        return f"{method}, {steps} steps"
    return "; ".join(f"{name}: {m}, {n} steps" for name, (m, n) in used.items())


def write_markdown(path: Path, rows: list[dict], spec: CompareSpec, setup: dict, noise: list[dict] = ()) -> str:
    metric = setup.get("metric", rows[0]["metric"] if rows else "?")
    vals, accs = curves(rows, spec, "value"), curves(rows, spec, "class_acc")
    last = spec.eval_steps[-1]
    lines = [f"Metric: {setup.get('description', METRIC_LABELS.get(metric, metric))}.",
             f"Real-data floor ({setup.get('floor_num_samples', spec.num_samples)} real images not in the reference): "
             f"{setup.get('floor', float('nan')):.2f}. Lower is better.",
             f"{len(spec.seeds)} seeds {spec.seeds}; mean ± sample standard deviation over seeds; "
             f"{spec.num_samples} class-balanced samples per evaluation ({_samplers(spec, setup)}, "
             f"no guidance, EMA weights).", "",
             "| recipe | " + " | ".join(f"step {s}" for s in spec.eval_steps) + f" | class acc @ {last} (%) |",
             "|---|" + "---|" * (len(spec.eval_steps) + 1)]
    for r in spec.recipes:
        cells = [_mean_sd(vals[r.name].get(s, np.array([])), 2) for s in spec.eval_steps]
        acc = accs[r.name].get(last, np.array([]))
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {_mean_sd(100 * acc, 1)} |")
    lines += speedup_table(vals, spec)
    lines += noise_summary(rows, list(noise), spec)
    t = _timings(rows)
    if t:
        lines += ["", t]
    text = "\n".join(lines) + "\n"
    write_atomic(path, text.encode())
    return text


def _band(ax, d: dict[int, np.ndarray], label: str, scale: dict[int, float] | None = None) -> None:
    steps = sorted(s for s in d if scale is None or s in scale)
    if not steps:
        return
    vals = [d[s] / (scale[s] if scale else 1.0) for s in steps]
    line, = ax.plot(steps, [v.mean() for v in vals], marker="o", ms=3, label=label)
    ax.fill_between(steps, [v.min() for v in vals], [v.max() for v in vals], color=line.get_color(), alpha=0.2, lw=0)


def write_plot(path: Path, rows: list[dict], spec: CompareSpec, setup: dict) -> None:
    """Metric (log scale, with the real-data floor), metric relative to the first recipe's mean
    at the same step, and class accuracy; lines are means over seeds, bands min..max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = setup.get("metric", rows[0]["metric"] if rows else "?")
    vals, accs = curves(rows, spec, "value"), curves(rows, spec, "class_acc")
    base = spec.recipes[0].name
    base_mean = {s: float(v.mean()) for s, v in vals[base].items()}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=90)
    for r in vals:
        n = max((len(v) for v in vals[r].values()), default=0)
        _band(axes[0], vals[r], f"{r} (n={n})")
        _band(axes[1], vals[r], r, base_mean)
        _band(axes[2], accs[r], r)
    if "floor" in setup:
        axes[0].axhline(setup["floor"], color="gray", ls="--", lw=1, label="real data")
    axes[0].set_yscale("log")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    for ax, label in zip(axes, (METRIC_LABELS.get(metric, metric), f"{metric} / {base}'s mean at the step",
                                "class accuracy of samples")):
        ax.set_xlabel("training step")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{len(spec.seeds)} seeds: line = mean, band = min..max; lower metric is better", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_tensorboard(folder: Path, rows: list[dict], spec: CompareSpec) -> None:
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)  # rebuilt from the evaluations on every report
    metric = rows[0]["metric"] if rows else "metric"
    for key, tag in (("value", f"eval/{metric}"), ("class_acc", "eval/class_acc")):
        for r, d in curves(rows, spec, key).items():
            w = SummaryWriter(str(folder / r / "mean"))
            for s in sorted(d):
                w.add_scalar(tag, float(d[s].mean()), s)
            w.close()
    per_run: dict[tuple, list[dict]] = {}
    for row in rows:
        per_run.setdefault((row["recipe"], row["seed"]), []).append(row)
    for (recipe, seed), run_rows in per_run.items():
        w = SummaryWriter(str(folder / recipe / f"seed-{seed}"))
        for row in run_rows:
            w.add_scalar(f"eval/{row['metric']}", row["value"], row["step"])
            w.add_scalar("eval/class_acc", row["class_acc"], row["step"])
        w.close()


def write_report(out: str | Path, spec: CompareSpec) -> Path:
    """All four outputs from the evaluations present; -> summary.md."""
    out = Path(out)
    rows = load_results(out, spec)
    setup_path = out / SETUP
    setup = json.loads(setup_path.read_text()) if setup_path.is_file() else {}
    noise = load_noise(out, spec)
    write_csv(out / "results.csv", rows)
    if noise:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(("recipe", "seed", "step", "eval_seed", "metric", "value", "class_acc"))
        for r in noise:
            w.writerow([r["recipe"], r["seed"], r["step"], r["eval_seed"], r["metric"], f"{r['value']:.6f}",
                        f"{r['class_acc']:.6f}"])
        write_atomic(out / "eval_noise.csv", buf.getvalue().encode())
    write_markdown(out / "summary.md", rows, spec, setup, noise)
    if rows:
        write_plot(out / "convergence.png", rows, spec, setup)
        write_tensorboard(out / "tb", rows, spec)
    return out / "summary.md"
