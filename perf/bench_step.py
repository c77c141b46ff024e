"""Training-step throughput of SiT / JiT with iREPA, per optimization, against a reference-style baseline.

    python -m perf.bench_step                         # GPU: SiT-B/2, SiT-XL/2, JiT-B/16, batch 256, bf16
    python -m perf.bench_step --models SiT-XL/2 --configs compile+fused+flash,baseline
    python -m perf.bench_step --quick --device cpu    # tiny models: proves the script runs end to end

One step = the trainer's own step, built by the trainer's own assembly (irepa.train.assemble.
build_run) and called as the trainer calls it: the recipe's draws for the whole batch, autocast
forward of the trained tree (model + projectors, both losses) per micro-batch, backward, grad
clipping, AdamW, EMA. Only the data differs: random tensors of the right shapes, no loader.
Configurations:
  eager                iREPA (conv projector, spatial norm), stored features, SDPA, bf16
  compile              + torch.compile per block (fullgraph), as train.compile=True
  compile+fusedloss    + the fused Triton alignment loss; adaLN left to Inductor (CUDA only; the
                       roofline, perf/roofline, predicts it above compile+fused: the adaLN op
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
Correctness gate (perf/gate.py): every row carries the loss and gradient norm of step 0 (fixed
seed: same weights and draws in every configuration; the zero-initialised gates get small seeded
noise first, `ungate`, so the blocks' arithmetic shows in that step) and its `gate` verdict against the eager
step's (in this run, or --gate_ref's CSV); `--gate_only` runs just that step (the reference).
`--profile CSV`: one profiled step per configuration after the timed ones, its time per op class
beside the roofline's prediction (perf/attribution.py; --predictions: the roofline CSV).
Every row also carries warmup_s (the warm-up steps' wall time: compilation, the figure the GPU
call sizes its time limits from), peak reserved memory, clocks / power / throttle reasons after
the timed steps and the SDPA backend torch picks for the model's attention shape.
MFU counts the same useful FLOPs for every configuration: the diffusion model and its
projector, forward + backward (irepa.train.flops); the baseline's online encoder is
overhead. Timing: per-step wall time with a device sync per step after warm-up (which
includes compilation); median and 20/80 % quantiles. Each run appends CSV rows (device,
commit, date, command) and rewrites the bench_step tables in perf/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from irepa import models, recipes
from irepa.config import build_config
from irepa.models.attention import available_backends
from irepa.train.assemble import build_run
from irepa.train.build import DataBundle
from irepa.train.flops import peak_tflops
from perf import gate
from perf.common import ROOT, commit, device_name, quantile, read_csv, rewrite_block, write_rows
from perf.common.device_state import row_state
from perf.common.provenance import utc_now

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
          "command", "loss0", "grad_norm0", "gate", "warmup_s", "peak_reserved_gib", "sm_clock_mhz", "mem_clock_mhz",
          "power_w", "temp_c", "throttle", "sdpa_backend", "call"]


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
    ungate(run.model.params, device)

    def step(i: int, probe: bool = False) -> dict:
        """The trainer's step; probe: also each parameter's gradient norm as the optimizer sees it."""
        if not probe:
            return run.step_fn(batch_data, i)
        norms = {}
        names = {id(p): n.replace("_orig_mod.", "") for n, p in run.model.module.named_parameters()}

        def grab(optimizer, args, kwargs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        norms[names.get(id(p), str(len(norms)))] = float(p.grad.float().norm())
        handle = run.model.optimizer.register_step_pre_hook(grab)
        try:
            out = run.step_fn(batch_data, i)
        finally:
            handle.remove()
        return {**out, "grad_norms": norms}
    return step, run.flops_per_image, run.micro_batch


def ungate(params, device, seed: int = 0, std: float = 0.02) -> None:
    """Fill the zero-initialised parameters (adaLN-zero gates and modulation, the final layer) with
    small seeded noise, alike in every configuration. adaLN-zero starts every block as the identity,
    which would hide the blocks' own arithmetic (attention, adaLN, MLP) from step 0's loss and leave
    the correctness gate blind to a wrong kernel there; values do not change a step's speed."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in params:  # the same tree (every configuration but the baseline) has the same zeros in the same order
            if not p.any():
                p.copy_((torch.randn(p.shape, generator=g) * std).to(device=p.device, dtype=p.dtype))


def measure(step, device, warmup: int, steps: int) -> tuple[list[float], dict]:
    """-> (timed steps' seconds, first: step 0's loss and grad norm (host floats) and the warm-up's
    seconds). Step 0 runs first in every configuration: the gate compares it."""
    t0 = time.perf_counter()
    out0 = step(0, probe=True)
    first = {"loss0": float(out0["loss"]), "grad_norm0": float(out0["grad_norm"]), "grad_norms": out0["grad_norms"]}
    for i in range(1, warmup):
        step(i)
    _sync(device)
    first["warmup_s"] = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(max(warmup, 1) + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, first


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _row(common, args, name, config, micro, times, first, fpi, peak, base, ref, ref_norms, device, spec) -> dict:
    med = quantile(times, 0.5) if times else float("nan")
    img_s = args.batch / med if times else float("nan")
    tflops = img_s * fpi / 1e12
    label = config if config in ("eager", "baseline") or args.compile_mode == "default" else \
        f"{config}[{args.compile_mode}]"
    heads_dim = _attention_shape(name, spec, micro)
    row = dict(common, model=name, config=label, batch=args.batch, micro_batch=micro,
               precision="fp16" if config == "baseline" and device.type == "cuda" else "bf16",
               step_ms_median=f"{1e3 * med:.2f}" if times else "",
               step_ms_p20=f"{1e3 * quantile(times, 0.2):.2f}" if times else "",
               step_ms_p80=f"{1e3 * quantile(times, 0.8):.2f}" if times else "",
               img_per_s=f"{img_s:.1f}" if times else "", tflops=f"{tflops:.4g}" if times else "",
               mfu=f"{tflops / peak:.3f}" if peak and times else "",
               peak_mem_gb=f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "",
               speedup_vs_baseline=f"{img_s / base:.2f}" if base and times else "",
               loss0=f"{first['loss0']:.6g}", grad_norm0=f"{first['grad_norm0']:.6g}",
               warmup_s=f"{first['warmup_s']:.1f}", **row_state(device, heads_dim))
    row["gate"] = gate.gate_row({**row, "config": config}, ref, first["grad_norms"], ref_norms)
    return row


def _attention_shape(name: str, spec, micro: int) -> tuple[int, int, int, int]:
    """[micro-batch, heads, tokens, head dim] of the model's attention: what SDPA's backend choice sees."""
    with torch.device("meta"):
        m = models.build(name, **spec[0])
    heads = next(getattr(mod, a) for mod in m.modules() for a in ("heads", "num_heads")
                 if isinstance(getattr(mod, a, None), int))
    return micro, heads, m.num_tokens, m.dim // heads


def run(args) -> tuple[list[dict], list[str]]:
    device = torch.device(args.device)
    table = QUICK if args.quick else FULL
    names = args.models.split(",") if args.models else list(table)
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    peak = peak_tflops(device)
    common = dict(date=utc_now(), commit=commit(), device=device_name(device), torch=torch.__version__,
                  command="python -m perf.bench_step " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                  call=os.environ.get("IREPA_CALL_ID", ""))
    refs = read_csv(Path(args.gate_ref)) if args.gate_ref else []
    rows, failed = [], []

    def emit(row):  # every row is on disk as soon as it is measured: a later OOM or kill keeps it
        rows.append(row)
        write_rows(Path(args.csv), [row], FIELDS, quiet=True)
        if not args.no_update:
            update_results(Path(args.results), Path(args.csv))

    for name in names:
        if name not in table:
            raise SystemExit(f"unknown model {name!r} for this mode; choose from {list(table)}")
        if name not in models.names():
            print(f"[bench_step] skip {name}: not in irepa.models (not written yet?)", flush=True)
            continue
        # a baseline measured earlier in the same GPU call (its own process) gives later rows their speed-up
        base = next((float(r["img_per_s"]) for r in reversed(refs) if r.get("model") == name and r.get("img_per_s")
                     and r.get("config") == "baseline" and common["call"] and r.get("call") == common["call"]), None)
        ref = gate.reference(refs, name, args.batch)
        ref_norms = gate.load_fingerprint(args.gate_grads or gate.fingerprint_path(args.gate_ref), name, args.batch) \
            if ref else None
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
                times, first = measure(step, device, args.warmup, 0 if args.gate_only else args.steps)
            except Exception as e:  # OOM, a backend that does not compile here, ...: the other cases still run
                print(f"[bench_step] FAILED {name} {config}: {_failure(e)}", flush=True)
                failed.append(f"{name} {config}: {_failure(e)}")
                step = None
                continue
            classes = None
            if args.profile and not args.gate_only:
                try:  # the row below is measured already: a profiler that breaks costs only its own table
                    classes = profile(step, args, device, name, config, common)
                except Exception as e:
                    print(f"[bench_step] profile of {name} {config} failed: {_failure(e)}", flush=True)
            step = None
            row = _row(common, args, name, config, micro, times, first, fpi, peak, base, ref, ref_norms, device,
                       table[name])
            if row["gate"] == "ref":
                ref, ref_norms = row, first["grad_norms"]
                gate.save_fingerprint(args.gate_grads or gate.fingerprint_path(args.csv), name, args.batch, ref_norms)
            if config == "baseline" and times:
                base = float(row["img_per_s"])
            print(f"[bench_step] {name:10s} {row['config']:20s} {row['step_ms_median'] or '-':>9s} ms  "
                  f"{row['img_per_s'] or '-':>8s} img/s  MFU {row['mfu'] or 'n/a'}  micro-batch {micro}  "
                  f"loss0 {row['loss0']} grad0 {row['grad_norm0']} gate {row['gate']}"
                  + (f"  profiled: {classes}" if classes else ""), flush=True)
            emit(row)
    return rows, failed


def profile(step, args, device, name, config, common) -> str:
    """One profiled step after the timed ones: ms per op class beside the roofline's prediction."""
    from perf.attribution import attribution_rows, profile_step
    from perf.op_classes import CLASSES
    from perf.suite_report import device_model

    measured = profile_step(step, 10_000, device)
    dm = device_model(common["device"]) or ""
    preds = [r for r in read_csv(Path(args.predictions)) if r.get("model") == name and r.get("config") == config]
    pred = next((r for r in reversed(preds) if r.get("device_model") == dm), preds[-1] if preds else None)
    write_rows(Path(args.profile), attribution_rows(common, name, config, measured, pred, CLASSES), quiet=True)
    return ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(measured.items(), key=lambda kv: -kv[1])[:3])


def render_tables(csv_path: Path) -> str:
    """Newest row per (device, model, config, batch): GPU table, then the newest CPU smoke run."""
    latest = {}
    for r in read_csv(csv_path):
        if not r.get("step_ms_median"):
            continue  # a --gate_only reference: no speed
        latest[(r["device"], r["model"], r["config"], r["batch"])] = {**r, "micro_batch": r.get("micro_batch") or r["batch"],
                                                                      "gate": r.get("gate") or ""}
    cols = ["device", "model", "config", "batch", "micro_batch", "precision", "step_ms_median", "img_per_s", "tflops", "mfu",
            "speedup_vs_baseline", "peak_mem_gb", "gate", "commit", "date", "command"]
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
    rewrite_block(md_path, "bench_step", render_tables(csv_path), "Training step (perf/bench_step.py)")


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
    p.add_argument("--gate_ref", default="", help="a bench_step CSV holding the eager reference (gate 'ref') rows")
    p.add_argument("--gate_grads", default="", help="the reference's per-parameter gradient norms (JSON; default "
                                                    "beside the CSV: <csv>.grads.json)")
    p.add_argument("--gate_only", action="store_true", help="only step 0 (loss, grad norm): the gate's reference")
    p.add_argument("--profile", default="", help="CSV for one profiled step's time per op class (perf/attribution.py)")
    p.add_argument("--predictions", default=str(ROOT / "perf/results/roofline.csv"),
                   help="roofline CSV whose per-class times go beside --profile's")
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
