"""The roofline's rows in perf/results/roofline.csv and its block of perf/RESULTS.md, and the
printed prediction of one device model."""
from __future__ import annotations

from pathlib import Path

from perf.common import read_csv, rewrite_block, write_rows
from perf.op_classes import CLASSES
from perf.roofline.cost import Cost, alignment_prediction, beyond_flops, cost, format_cost
from perf.roofline.hardware import Device
from perf.roofline.trace import Trace, trace_step

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"

FIELDS = ["date", "commit", "device_model", "model", "config", "batch", "micro_batch", "matmul_tflops",
          "bandwidth_tbs", "pred_ms", "pred_img_per_s", "pred_mfu", "pred_tflops", "kernels", "top_beyond_flops",
          "command"] + [f"{k}_{m}" for k in CLASSES for m in ("tflop", "gb", "ms")]


def row(trace: Trace, c: Cost, dev_key: str, device: Device, command: str, date: str, commit: str) -> dict:
    r = dict(date=date, commit=commit, device_model=dev_key, model=trace.model, config=trace.config,
             batch=trace.batch, micro_batch=trace.micro_batch, matmul_tflops=device.matmul_tflops,
             bandwidth_tbs=device.bandwidth_tbs, pred_ms=f"{1e3 * c.total_s:.2f}", pred_img_per_s=f"{c.img_per_s:.1f}",
             pred_mfu=f"{c.mfu:.3f}", pred_tflops=f"{c.useful_flops / c.total_s / 1e12:.1f}", kernels=c.kernels,
             top_beyond_flops="; ".join(f"{k} {1e3 * v:.1f} ms" for k, v in beyond_flops(c)[:3]), command=command)
    for k in CLASSES:
        r[f"{k}_tflop"] = f"{c.flops[k] / 1e12:.3f}"
        r[f"{k}_gb"] = f"{c.bytes[k] / 1e9:.3f}"
        r[f"{k}_ms"] = f"{1e3 * c.t_pred[k]:.3f}"
    return r


def write_csv(path: Path, rows: list[dict]) -> None:
    write_rows(path, rows, FIELDS, quiet=True)


def load_predictions(path: Path = RESULTS_DIR / "roofline.csv") -> dict:
    """Newest prediction per (device_model, model, config): what the GPU suite puts beside its figures."""
    return {(r["device_model"], r["model"], r["config"]): r for r in read_csv(path)}


def render(path: Path) -> str:
    preds = load_predictions(path)
    steps = [r for r in preds.values() if not r["model"].startswith("alignment-loss")]
    losses = [r for r in preds.values() if r["model"].startswith("alignment-loss")]
    cols = ["device_model", "model", "config", "batch", "micro_batch", "pred_ms", "pred_img_per_s", "pred_mfu",
            "kernels", "top_beyond_flops", "commit", "date", "command"]
    lines = ["**Prediction, not a measurement.** One training step per row (see `perf/roofline` for the model):",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in steps:
        lines.append("| " + " | ".join(f"`{r[c]}`" if c == "command" else str(r[c]) for c in cols) + " |")
    cls_cols = ["device_model", "model", "config"] + [f"{k} ms" for k in CLASSES]
    lines += ["", "Predicted time per op class (ms per step, after fusion where the configuration compiles):", "",
              "| " + " | ".join(cls_cols) + " |", "|" + "---|" * len(cls_cols)]
    for r in steps:
        lines.append("| " + " | ".join([r["device_model"], r["model"], r["config"]] +
                                       [r[f"{k}_ms"] for k in CLASSES]) + " |")
    if losses:
        lines += ["", "Alignment loss alone, fwd + bwd, bf16 (compile = ideal fusion of the eager reference):", "",
                  "| device_model | shape | provider | pred_ms | GB moved | kernels | commit |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['device_model']} | {r['model'].split()[-1]} | {r['config']} | {r['pred_ms']} | "
                  f"{r['alignment loss_gb']} | {r['kernels']} | {r['commit']} |" for r in losses]
    return "\n".join(lines)


def update_results(md: Path, csv_path: Path) -> None:
    rewrite_block(md, "roofline", render(csv_path), "Roofline prediction (python -m perf.roofline)")


def predict_device(a, key: str, dev: Device, command: str, date: str, commit: str) -> list[dict]:
    """Print and return the rows of one device model: each model x configuration, then the loss alone."""
    rows = []
    for name in [m for m in a.models.split(",") if m]:
        costs = {}
        for config in [c for c in a.configs.split(",") if c]:
            tr = trace_step(name, config, a.batch, dev, a.micro_batch, a.quick)
            c = costs[config] = cost(tr, dev)
            print(format_cost(tr, c, dev), flush=True)
            rows.append(row(tr, c, key, dev, command, date, commit))
        ours = {k: v for k, v in costs.items() if k != "baseline"}
        if ours:
            best = max(ours, key=lambda k: ours[k].img_per_s)
            ratio = (f", {costs[best].img_per_s / costs['baseline'].img_per_s:.2f}x the baseline"
                     if "baseline" in costs else "")
            print(f"{name}: predicted best configuration {best}: {costs[best].img_per_s:.0f} img/s, MFU "
                  f"{100 * costs[best].mfu:.1f}%{ratio}")
    for shape in [s for s in a.loss_shapes.split(",") if s]:
        B, T, E = (int(v) for v in shape.lower().split("x"))
        pr = alignment_prediction(B, T, E, dev)
        for provider, v in pr.items():
            rows.append(dict(date=date, commit=commit, device_model=key, model=f"alignment-loss {B}x{T}x{E}",
                             config=provider, batch=B, matmul_tflops=dev.matmul_tflops,
                             bandwidth_tbs=dev.bandwidth_tbs, pred_ms=f"{v['ms']:.4f}", kernels=v["kernels"],
                             command=command, **{"alignment loss_gb": f"{v['bytes'] / 1e9:.3f}",
                                                 "alignment loss_ms": f"{v['ms']:.4f}"}))
        n_min = 3 * B * T * E * 2  # read z, y, write dz (bf16): what any implementation must move
        print(f"alignment loss B={B} T={T} E={E} bf16, fwd+bwd at {dev.bandwidth_tbs} TB/s: " + ", ".join(
            f"{k} {v['ms']:.3f} ms ({v['bytes'] / n_min:.1f}x the minimum bytes, {v['kernels']} kernels)"
            for k, v in pr.items()) + f"; fused vs compile {pr['compile']['ms'] / pr['fused']['ms']:.2f}x, "
              f"vs eager {pr['eager']['ms'] / pr['fused']['ms']:.2f}x")
    return rows
