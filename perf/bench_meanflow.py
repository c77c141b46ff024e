"""Cost of a MeanFlow training step relative to a flow-matching step of the same model, side by side.

    python -m perf.bench_meanflow --device cpu                     # digits SiT-T/2 and SiT-B/2 shapes, fp32
    python -m perf.bench_meanflow --models SiT-B/2 --batch 256 --precision bf16 --configs eager,compile  # GPU

Both steps are perf/bench_step.py cases (the trainer's TrainStep with an iREPA conv head on
stored features, AdamW, EMA): the SiT recipe (flow matching) and the MeanFlow recipe with
its variants (`VARIANTS`: JVP split or joint, guidance baked in (B/2: omega 1, kappa 0.5)
or not). The cases are timed in interleaved rounds (one step of each per round, after
warm-up), so a machine whose load changes during the run affects them alike; medians of
wall time and of process CPU time, and the ratio of each to the flow-matching step's.
"compile" compiles every block (both recipes) and MeanFlow's no-grad JVP (meanflow.compile_jvp).
Rows go to perf/results/bench_meanflow.csv (device, commit, date, command) and the
bench_meanflow table of perf/RESULTS.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from perf import bench_step
from perf.common import ROOT, commit, device_name, quantile, read_csv, rewrite_block, write_rows
from perf.common.provenance import utc_now

# model -> (model kwargs, encoder dim): the digits default's shape and the ImageNet latent shape
SHAPES = {"SiT-T/2": (dict(input_size=16, in_channels=1, num_classes=10), 64),
          "SiT-Tiny/2": (dict(input_size=8, in_channels=4, num_classes=10), 32),  # tests
          "SiT-B/2": (dict(input_size=32, in_channels=4, num_classes=1000), 768)}
VARIANTS = {  # name -> (recipe, meanflow options)
    "flow-matching": ("sit", {}),
    "meanflow-split-cfg": ("meanflow", {"jvp": "split", "omega": 1.0, "kappa": 0.5}),
    "meanflow-joint-cfg": ("meanflow", {"jvp": "joint", "omega": 1.0, "kappa": 0.5}),
    "meanflow-split": ("meanflow", {"jvp": "split", "omega": 1.0, "kappa": 0.0}),
}
FIELDS = ["date", "commit", "device", "torch", "model", "config", "variant", "batch", "precision", "threads",
          "step_ms_median",
          "cpu_ms_median", "ratio_wall", "ratio_cpu", "rounds", "command"]
BEGIN, END = "<!-- bench_meanflow:begin -->", "<!-- bench_meanflow:end -->"


def build(model: str, config: str, variant: str, batch: int, device, amp_dtype):
    kw, enc_dim = SHAPES[model]
    recipe, opts = VARIANTS[variant]
    spec = (kw, recipe, 0.6, 0, 0, (enc_dim, 0, 0))
    step, _, _ = bench_step.build_case(model, spec, config, batch, device, micro_batch=str(batch),
                                       overrides={"meanflow": opts} if opts else None, amp_dtype=amp_dtype)
    return step


def measure(steps: dict, device, warmup: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    for step in steps.values():
        for i in range(warmup):
            step(i)
    out = {k: ([], []) for k in steps}
    for r in range(rounds):
        for k, step in steps.items():
            bench_step._sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            step(warmup + r)
            bench_step._sync(device)
            out[k][0].append(time.perf_counter() - w0)
            out[k][1].append(time.process_time() - c0)
    return out


def render(csv_path: Path) -> str:
    latest = {}
    for r in read_csv(csv_path):
        latest[(r["device"], r["model"], r["config"], r["variant"], r["batch"], r["precision"])] = r
    cols = ["device", "model", "config", "variant", "batch", "precision", "threads", "step_ms_median", "cpu_ms_median",
            "ratio_wall", "ratio_cpu", "rounds", "commit", "date", "command"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"`{r[c]}`" if c == "command" else r[c] for c in cols) + " |" for r in latest.values()]
    gpu = any(not r["device"].startswith("cpu") for r in latest.values())
    return "\n".join(lines + ([] if gpu else ["", "GPU: open (no GPU run recorded yet)."]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="SiT-T/2,SiT-B/2")
    p.add_argument("--batch", default="", help="comma list per model (default: 32 for SiT-T/2, 4 for SiT-B/2 on CPU; 256 on GPU)")
    p.add_argument("--configs", default="eager", help="comma list of eager, compile")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default). On a "
                   "shared CPU, 1 avoids the OpenMP barrier stalls of a descheduled second thread")
    p.add_argument("--csv", default=str(ROOT / "perf/results/bench_meanflow.csv"))
    p.add_argument("--results", default=str(ROOT / "perf/RESULTS.md"))
    p.add_argument("--no_update", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")] if args.batch else \
        [256 if device.type == "cuda" else (32 if m == "SiT-T/2" else 4) for m in models]
    variants = args.variants.split(",")
    if "flow-matching" not in variants:
        variants = ["flow-matching", *variants]
    amp = torch.float32 if args.precision == "fp32" else torch.bfloat16
    common = dict(date=utc_now(), commit=commit(), device=device_name(device), torch=torch.__version__,
                  command="python -m perf.bench_meanflow " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    path = Path(args.csv)
    for model, batch in zip(models, batches):
        for config in args.configs.split(","):
            steps = {v: build(model, config, v, batch, device, amp) for v in variants}
            times = measure(steps, device, args.warmup, args.rounds)
            base_w, base_c = (quantile(times["flow-matching"][i], 0.5) for i in (0, 1))
            rows = []
            for v in variants:
                w, c = quantile(times[v][0], 0.5), quantile(times[v][1], 0.5)
                rows.append(dict(common, model=model, config=config, variant=v, batch=batch, precision=args.precision,
                                 threads=torch.get_num_threads(), step_ms_median=f"{1e3 * w:.1f}",
                                 cpu_ms_median=f"{1e3 * c:.1f}", ratio_wall=f"{w / base_w:.2f}",
                                 ratio_cpu=f"{c / base_c:.2f}", rounds=args.rounds))
                print(f"[bench_meanflow] {model} {config} {v:20s} {1e3 * w:9.1f} ms wall ({w / base_w:.2f}x)  "
                      f"{1e3 * c:9.1f} ms cpu ({c / base_c:.2f}x)", flush=True)
            write(rows, path, None if args.no_update else Path(args.results))  # each model on disk when done


def write(rows: list[dict], path: Path, results: Path | None) -> None:
    write_rows(path, rows, FIELDS, quiet=True)
    if results is not None:
        rewrite_block(results, "bench_meanflow", render(path),
                      "MeanFlow step vs flow-matching step (perf/bench_meanflow.py)")


if __name__ == "__main__":
    main()
