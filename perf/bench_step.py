"""Training-step throughput of SiT / JiT with iREPA, per optimization, against a reference-style baseline.

    python perf/bench_step.py                         # GPU: SiT-B/2, SiT-XL/2, JiT-B/16, batch 256, bf16
    python perf/bench_step.py --models SiT-XL/2 --configs compile+fused+flash,baseline
    python perf/bench_step.py --quick --device cpu    # tiny models: proves the script runs end to end

One step = the trainer's own step, built by the trainer's own assembly (irepa.train.assemble.
build_run) and called as the trainer calls it: the recipe's draws for the whole batch, autocast
forward of the trained tree (model + projectors, both losses) per micro-batch, backward, grad
clipping, AdamW, EMA. Only the data differs: random tensors of the right shapes, no loader.
Configurations:
  eager                iREPA (conv projector, spatial norm), stored features, SDPA, bf16
  compile              + torch.compile per block (fullgraph), as train.compile=True
  compile+fusedloss    + the fused Triton alignment loss; adaLN left to Inductor (CUDA only; the
                       roofline, perf/roofline.py, predicts it above compile+fused: the adaLN op
                       is opaque to Inductor, so the residual add and gate around it cannot fuse)
  compile+fused        + fused Triton adaLN and alignment loss (CUDA only; the trainer's CUDA default)
  compile+fused+flash  + flash-attn (when installed)
  baseline             reference-style REPA step: whole-model torch.compile (default mode;
                       build_run's compile_scope "model"), SDPA, fp16 autocast + dynamic loss scaling
                       (bf16 on CPU), MLP projector, a ViT-B-sized encoder (random init, stand-in) run
                       online on the images of every micro-batch (the trainer's online-encoder path:
                       bf16 autocast on CUDA, not compiled)
Micro-batches: a batch whose activations do not fit the device (SiT-XL/2 at 256 saves ~96 GiB
in eager bf16) accumulates gradients over equal micro-batches, as the trainer does
(train.micro_batch_size); `--micro_batch auto` (default) takes the trainer's planner
(irepa.train.memory) for every configuration, the baseline included.
MFU counts the same useful FLOPs for every configuration: the diffusion model and its
projector, forward + backward (irepa.train.flops); the baseline's online encoder is
overhead. Timing: per-step wall time with a device sync per step after warm-up (which
includes compilation); median and 20/80 % quantiles. Each run appends CSV rows (device,
commit, date, command) and rewrites the bench_step tables in perf/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import irepa.kernels  # noqa: F401  installed, or linked by perf/gpu_suite.sh
except ImportError:  # a bare checkout: irepa/ from here (its kernels/ and data/ need the install)
    sys.path.insert(0, str(ROOT))

from irepa import models, recipes  # noqa: E402
from irepa.config import build_config  # noqa: E402
from irepa.models.attention import available_backends  # noqa: E402
from irepa.train.assemble import build_run  # noqa: E402
from irepa.train.build import DataBundle  # noqa: E402
from irepa.train.flops import peak_tflops  # noqa: E402

CONFIGS = ("eager", "compile", "compile+fusedloss", "compile+fused", "compile+fused+flash", "baseline")
# name -> (model kwargs, recipe, iREPA spatial-norm gamma, encoder image side, encoder patch, encoder dim/depth/heads)
FULL = {
    "SiT-B/2": (dict(input_size=32, in_channels=4, num_classes=1000), "sit", 0.6, 224, 14, (768, 12, 12)),
    "SiT-XL/2": (dict(input_size=32, in_channels=4, num_classes=1000), "sit", 0.6, 224, 14, (768, 12, 12)),
    "JiT-B/16": (dict(input_size=256, in_channels=3, num_classes=1000), "jit", 0.8, 224, 14, (768, 12, 12)),
}
QUICK = {
    "SiT-Tiny/2": (dict(input_size=8, in_channels=4, num_classes=10), "sit", 0.6, 32, 8, (64, 2, 2)),
    "JiT-Tiny/4": (dict(input_size=16, in_channels=3, num_classes=10), "jit", 0.8, 32, 8, (64, 2, 2)),
}
FIELDS = ["date", "commit", "device", "torch", "model", "config", "batch", "micro_batch", "precision", "step_ms_median",
          "step_ms_p20", "step_ms_p80", "img_per_s", "tflops", "mfu", "peak_mem_gb", "speedup_vs_baseline",
          "command"]


class StandInViT(nn.Module):
    """A ViT-B/14-sized encoder (random init) standing in for DINOv2-B in the baseline: pre-norm
    blocks, SDPA attention, patch tokens out (no CLS), images resized to its input side."""

    def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.img, self.heads = img, heads
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            n1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim), n2=nn.LayerNorm(dim),
            fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim))) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images):
        x = F.interpolate(images, size=(self.img, self.img), mode="bicubic", align_corners=False)
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        B, T, D = x.shape
        for b in self.blocks:
            q, k, v = b.qkv(b.n1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            x = x + b.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))
            x = x + b.fc2(F.gelu(b.fc1(b.n2(x))))
        return self.norm(x)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def skip_reason(config: str, device: torch.device) -> str | None:
    if "fused" in config and device.type != "cuda":
        return "fused Triton kernels need CUDA"
    if "flash" in config and "flash" not in available_backends():
        return "flash-attn not installed (or no CUDA)"
    return None


def case_config(name, spec, config, batch, micro_batch="auto", budget_gib=None, compile_mode="default",
                overrides: dict | None = None, amp_dtype: torch.dtype | None = None, device=torch.device("cpu")):
    """The Config of one case: the trainer's run of `config` (see the module docstring) on random data."""
    model_kw, recipe_name, gamma, _, _, (enc_dim, _, _) = spec
    baseline = config == "baseline"
    fused = "fused" in config  # the alignment loss kernel; adaLN too unless only the loss is asked for
    # fp16 GEMMs on CPU are emulated (seconds per step): the CPU smoke run uses bf16 throughout
    if amp_dtype is None:
        amp_dtype = torch.float16 if baseline and device.type == "cuda" else torch.bfloat16
    if micro_batch != "auto" and (int(micro_batch) <= 0 or batch % int(micro_batch)):
        raise SystemExit(f"--micro_batch {micro_batch} must be a positive divisor of --batch {batch}")
    tree = {"model": {"name": name, "attn_backend": "flash" if "flash" in config else "sdpa",
                      "fused_kernels": fused and "fusedloss" not in config, **model_kw},
            "align": {"encoders": ["dinov2-vit-b"], "projector": "mlp" if baseline else "conv",
                      "gamma": None if baseline else gamma, "weight": 0.5 if baseline else 1.0, "fused_loss": fused,
                      "hidden_dim": 2048 if enc_dim >= 512 else 4 * enc_dim},  # REPA's MLP width; less for --quick
            "train": {"recipe": recipe_name, "compile": config != "eager", "batch_size": batch, "parallel": "none",
                      "compile_mode": "default" if baseline else compile_mode, "ema_decays": [0.9999],
                      "precision": {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[amp_dtype],
                      "micro_batch_size": 0 if micro_batch == "auto" else int(micro_batch),
                      "memory_budget_gib": budget_gib}}
    for section, values in (overrides or {}).items():
        tree[section] = {**tree.get(section, {}), **values}
    return build_config(tree, sections=recipes.sections())


def build_case(name, spec, config, batch, device, micro_batch="auto", budget_gib=None, plan_only=False,
               compile_mode="default", overrides: dict | None = None, amp_dtype: torch.dtype | None = None):
    """-> (step(i) -> loss, useful FLOPs per image, micro-batch): the run irepa.train.assemble.build_run
    makes of the case's config, trained on random tensors of the right shapes. overrides: more config
    (e.g. a recipe's own section, perf/bench_meanflow.py); amp_dtype: replaces the bf16 / fp16 default
    (torch.float32 runs without autocast)."""
    model_kw, _, _, enc_img, enc_patch, (enc_dim, enc_depth, enc_heads) = spec
    baseline = config == "baseline"
    torch._dynamo.reset()  # cases share code objects: no recompiles with dynamic shapes across them
    cfg = case_config(name, spec, config, batch, micro_batch, budget_gib, compile_mode, overrides, amp_dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    C, S = model_kw["in_channels"], model_kw["input_size"]
    tokens = (S // int(name.rsplit("/", 1)[1])) ** 2
    batch_data = {"x": torch.randn(batch, C, S, S, device=device, generator=g),
                  "y": torch.randint(0, model_kw["num_classes"], (batch,), device=device, generator=g)}
    if baseline:  # the trainer's online-encoder path, with a stand-in for DINOv2-B
        encoder = StandInViT(enc_img, enc_patch, enc_dim, enc_depth, enc_heads).to(device).eval().requires_grad_(False)
        data = DataBundle(loader=None, encoder_dims=[enc_dim], manifest={}, online_encoders=[encoder])
        batch_data["images"] = torch.rand(batch, 3, enc_img, enc_img, device=device, generator=g)
    else:
        data = DataBundle(loader=None, encoder_dims=[enc_dim], manifest={})
        batch_data["feats"] = [torch.randn(batch, tokens, enc_dim, device=device, generator=g).to(torch.bfloat16)]
    run = build_run(cfg, device=device, data=data, log=lambda m: print(f"[bench_step]   {m}", flush=True),
                    compile_scope="model" if baseline else "blocks")
    if plan_only:
        return None, run.flops_per_image, run.micro_batch
    return (lambda i: run.step_fn(batch_data, i)["loss"]), run.flops_per_image, run.micro_batch


def measure(step, device, warmup: int, steps: int) -> list[float]:
    for i in range(warmup):
        step(i)
    _sync(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(warmup + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _commit() -> str:
    """The checkout's commit (-dirty with uncommitted changes to tracked files); $IREPA_COMMIT
    where the GPU suite set it (a copy of the tree without .git, as on the device machine)."""
    if os.environ.get("IREPA_COMMIT"):
        return os.environ["IREPA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run(args) -> list[dict]:
    device = torch.device(args.device)
    table = QUICK if args.quick else FULL
    names = args.models.split(",") if args.models else list(table)
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    peak = peak_tflops(device)
    common = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  commit=_commit(), device=device_name(device), torch=torch.__version__,
                  command="python " + " ".join(shlex.quote(a) for a in sys.argv))
    rows, failed = [], []

    def emit(row):  # every row is on disk as soon as it is measured: a later OOM or kill keeps it
        rows.append(row)
        append_csv(Path(args.csv), [row])
        if not args.no_update:
            update_results(Path(args.results), Path(args.csv))

    for name in names:
        if name not in table:
            raise SystemExit(f"unknown model {name!r} for this mode; choose from {list(table)}")
        if name not in models.names():
            print(f"[bench_step] skip {name}: not in irepa.models (not written yet?)", flush=True)
            continue
        base = None
        # the baseline first, so every later row carries its speed-up when it is written; with
        # --keep_order the given order (most important first when a time limit may cut the run)
        for config in configs if args.keep_order else sorted(configs, key=lambda c: c != "baseline"):
            reason = skip_reason(config, device)
            if reason:
                print(f"[bench_step] skip {name} {config}: {reason}", flush=True)
                continue
            gc.collect()  # compiled blocks of the last case sit in reference cycles until collected
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                step, fpi, micro = build_case(name, table[name], config, args.batch, device, args.micro_batch,
                                              args.memory_budget_gib, args.plan_only, args.compile_mode)
                if args.plan_only:
                    print(f"[bench_step] {name} {config}: micro-batch {micro} of {args.batch}", flush=True)
                    continue
                times = measure(step, device, args.warmup, args.steps)
            except Exception as e:  # OOM, a backend that does not compile here, ...: the other cases still run
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                print(f"[bench_step] FAILED {name} {config}: {msg}", flush=True)
                failed.append(f"{name} {config}: {msg}")
                continue
            finally:
                step = None
            med = _quantile(times, 0.5)
            img_s = args.batch / med
            tflops = img_s * fpi / 1e12
            if config == "baseline":
                base = img_s
            label = config if config in ("eager", "baseline") or args.compile_mode == "default" else \
                f"{config}[{args.compile_mode}]"
            row = dict(common, model=name, config=label, batch=args.batch, micro_batch=micro,
                       precision="fp16" if config == "baseline" and device.type == "cuda" else "bf16",
                       step_ms_median=f"{1e3 * med:.2f}", step_ms_p20=f"{1e3 * _quantile(times, 0.2):.2f}",
                       step_ms_p80=f"{1e3 * _quantile(times, 0.8):.2f}", img_per_s=f"{img_s:.1f}",
                       tflops=f"{tflops:.4g}", mfu=f"{tflops / peak:.3f}" if peak else "",
                       peak_mem_gb=f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
                       if device.type == "cuda" else "",
                       speedup_vs_baseline=f"{img_s / base:.2f}" if base else "")
            print(f"[bench_step] {name:10s} {label:20s} {row['step_ms_median']:>9s} ms  {row['img_per_s']:>8s} img/s"
                  f"  {row['tflops']:>8s} TFLOP/s  MFU {row['mfu'] or 'n/a'}  micro-batch {micro}", flush=True)
            emit(row)
    return rows, failed


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows; a file written with an older column set is rewritten once with the current
    columns (old rows keep their values, new columns stay empty), through a temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames == FIELDS:
                old = None
            else:
                unknown = set(reader.fieldnames or []) - set(FIELDS)
                if unknown:
                    raise SystemExit(f"{path}: unknown columns {sorted(unknown)}; not touching it")
                old = list(reader)
    if old is None:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerows(rows)
        return
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        w.writeheader()
        w.writerows(old + rows)
    os.replace(tmp, path)


BEGIN, END = "<!-- bench_step:begin -->", "<!-- bench_step:end -->"


def render_tables(csv_path: Path) -> str:
    """Newest row per (device, model, config, batch): GPU table, then the newest CPU smoke run."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    latest = {}
    for r in rows:
        latest[(r["device"], r["model"], r["config"], r["batch"])] = {**r, "micro_batch": r.get("micro_batch") or r["batch"]}
    cols = ["device", "model", "config", "batch", "micro_batch", "precision", "step_ms_median", "img_per_s", "tflops", "mfu",
            "speedup_vs_baseline", "peak_mem_gb", "commit", "date", "command"]
    gpu = [r for r in latest.values() if not r["device"].startswith("cpu")]
    cpu = [r for r in latest.values() if r["device"].startswith("cpu")]

    def table(rs):
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(f"`{r[c]}`" if c == "command" else r[c] for c in cols) + " |" for r in rs]
        return "\n".join(lines)
    out = ["### GPU", "", table(gpu) if gpu else "_No GPU run recorded yet: every GPU figure is open._", "",
           "### CPU smoke runs (`--quick --device cpu`: tiny models; proves the script, not a performance figure)",
           "", table(cpu) if cpu else "_none_"]
    return "\n".join(out)


def update_results(md_path: Path, csv_path: Path) -> None:
    text = md_path.read_text() if md_path.is_file() else ""
    block = f"{BEGIN}\n{render_tables(csv_path)}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Training step (perf/bench_step.py)\n\n" + block + "\n"
    md_path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny models, small batch, few steps")
    p.add_argument("--models", default="", help="comma list (default: all of the mode)")
    p.add_argument("--configs", default="", help=f"comma list of {CONFIGS}")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    p.add_argument("--micro_batch", default="auto",
                   help="samples per forward/backward: auto (the trainer's memory planner) or a divisor of --batch")
    p.add_argument("--memory_budget_gib", type=float, default=None,
                   help="memory the planner may use (default: 90%% of the GPU; no limit on CPU)")
    p.add_argument("--compile_mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of our compiled configurations (the baseline keeps default)")
    p.add_argument("--keep_order", action="store_true",
                   help="run --configs in the given order (default: the baseline first, so later rows carry "
                        "their speed-up)")
    p.add_argument("--plan_only", action="store_true",
                   help="only print each case's memory plan (no timing, nothing written); with --device cpu "
                        "and --memory_budget_gib it tells what fits a GPU without one")
    p.add_argument("--csv", default=str(ROOT / "perf/results/bench_step.csv"))
    p.add_argument("--results", default=str(ROOT / "perf/RESULTS.md"))
    p.add_argument("--no_update", action="store_true", help="do not touch RESULTS.md")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 256)
    args.steps = args.steps or (3 if args.quick else 20)
    args.warmup = args.warmup or (2 if args.quick else 5)
    bad = [c for c in (args.configs.split(",") if args.configs else []) if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown config(s) {bad}; choose from {CONFIGS}")
    rows, failed = run(args)
    if not args.plan_only:
        print(f"[bench_step] {len(rows)} rows -> {args.csv}" + ("" if args.no_update or not rows else f", {args.results}"))
    if failed:
        raise SystemExit("[bench_step] failed cases:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
