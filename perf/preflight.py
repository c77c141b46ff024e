"""Preflight of the GPU call (<= 30 s): is this machine what the long parts assume?

    python -m perf.preflight OUT [--device cpu]

Writes OUT/preflight.json (perf/suite_report.py turns it into a row of perf/results/preflight.csv), prints one line per check, and exits 1
naming every check that failed, so the call stops before its long parts. It records:
  versions   Python, torch, Triton, CUDA (torch's build), the driver; beside the versions the
             tests ran on (TESTED), so a skew is visible before anything else runs
  gpu        name, multiprocessors, memory, SM / memory clocks (now and maximum), power limit
  gemm       bf16 matmul rate at SiT-XL/2's real shapes (batch 256 x 256 tokens, width 1152:
             qkv, attention out, MLP in and out), fresh random operands, CUDA events
  sdpa       scaled_dot_product_attention forward + backward at [256, 16, 256, 72] bf16 and the
             backend torch picks for it
  copy       device-to-device copy bandwidth of a 1 GiB buffer (bytes read + written)
The measured GEMM rate and copy bandwidth are what the roofline then predicts with
(`python -m perf.roofline --measured OUT/preflight.json`). On CPU (the practice run) the same
checks run at tiny shapes and the figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from perf.common import commit
from perf.common.device_state import gpu_state, sdpa_backend
from perf.common.provenance import utc_now

TESTED = {"python": "3.11", "torch": "2.13", "triton": "3.9"}  # where the CPU test suite last ran
MIN_TORCH = (2, 5)  # setup.py's floor
SDPA_SHAPE = (256, 16, 256, 72)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "",
           "tested_on": TESTED}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = ""
    out["driver"] = _smi("driver_version")
    return out


def _smi(field: str) -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--id=0", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0].strip() if r.returncode == 0 and r.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "memory_gib": None}
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "max_sm_clock_mhz": _smi("clocks.max.sm"),
            "max_mem_clock_mhz": _smi("clocks.max.mem"), "power_limit_w": _smi("power.limit"), **gpu_state(device)}


def _timed_ms(fn, device: torch.device, reps: int) -> float:
    """Median ms of fn() over reps, after one warm-up: CUDA events on a GPU, a wall clock on CPU."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def sit_gemm_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(M, K, N) of SiT-XL/2's block GEMMs at batch 256 (M = 256 images x 256 tokens)."""
    M, D = (256, 64) if quick else (256 * 256, 1152)
    return [(M, D, 3 * D), (M, D, D), (M, D, 4 * D), (M, 4 * D, D)]


def gemm_rate(device: torch.device, quick: bool) -> dict:
    """bf16 TFLOP/s over SiT's GEMMs (total FLOPs / total median time), and each shape's."""
    flops = ms = 0.0
    each = {}
    for M, K, N in sit_gemm_shapes(quick):
        a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        b = torch.randn(K, N, device=device, dtype=torch.bfloat16)
        t = _timed_ms(lambda: a @ b, device, 10)
        each[f"{M}x{K}x{N}"] = float(f"{2 * M * K * N / t / 1e9:.4g}")
        flops, ms = flops + 2 * M * K * N, ms + t
    return {"gemm_tflops": flops / ms / 1e9, "gemm_tflops_by_shape": each}


def sdpa_rate(device: torch.device, quick: bool) -> dict:
    B, H, T, D = (2, 2, 16, 8) if quick else SDPA_SHAPE
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)

    def fwd_bwd():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(g)
    ms = _timed_ms(fwd_bwd, device, 5)
    flops = 4 * B * H * T * T * D * (1 + 2.5)  # forward 2 matmuls, backward 5 (QK^T recomputed)
    return {"sdpa_ms": ms, "sdpa_tflops": flops / ms / 1e9, "sdpa_backend": sdpa_backend((B, H, T, D), device=device),
            "sdpa_shape": [B, H, T, D]}


def copy_rate(device: torch.device, quick: bool) -> dict:
    n = (1 << 20) if quick else (1 << 30)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _timed_ms(lambda: dst.copy_(src), device, 10)
    return {"copy_tbs": 2 * n / ms / 1e9}


def checks(pre: dict) -> list[str]:
    """What would make the long parts wrong or wasted, as failures."""
    bad = []
    major_minor = tuple(int(x) for x in pre["versions"]["torch"].split("+")[0].split(".")[:2])
    if major_minor < MIN_TORCH:
        bad.append(f"torch {pre['versions']['torch']} is older than {'.'.join(map(str, MIN_TORCH))}")
    if pre["device"] == "cuda" and not pre["versions"].get("triton"):
        bad.append("triton is not importable: the fused kernels cannot run")
    for key in ("gemm_tflops", "sdpa_tflops", "copy_tbs"):
        v = pre["measured"].get(key)
        if v is None or not math.isfinite(v) or v <= 0:
            bad.append(f"{key} not measured ({v})")
    return bad + pre.get("errors", [])


def run(device: torch.device, quick: bool) -> dict:
    pre = {"date": utc_now(), "commit": commit(), "device": device.type, "versions": versions(),
           "gpu": gpu_info(device), "measured": {}, "errors": []}
    for name, fn in (("gemm", gemm_rate), ("sdpa", sdpa_rate), ("copy", copy_rate)):
        t0 = time.perf_counter()
        try:
            pre["measured"].update(fn(device, quick))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # a broken CUDA context or library: named, and the call stops
            pre["errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        pre["measured"][f"{name}_s"] = round(time.perf_counter() - t0, 2)
    pre["failures"] = checks(pre)
    return pre


def report(pre: dict) -> str:
    v, g, m = pre["versions"], pre["gpu"], pre["measured"]
    lines = [f"versions: python {v['python']}, torch {v['torch']}, triton {v['triton'] or '-'}, cuda {v['cuda'] or '-'}, "
             f"driver {v['driver'] or '-'} (tests ran on python {TESTED['python']}, torch {TESTED['torch']}, "
             f"triton {TESTED['triton']})",
             f"gpu: {g['name']}" + (f", {g.get('sms')} SMs, {g['memory_gib']} GiB, SM clock {g.get('sm_clock_mhz')}"
                                    f"/{g.get('max_sm_clock_mhz')} MHz, power limit {g.get('power_limit_w')} W, "
                                    f"throttle {g.get('throttle')}" if pre["device"] == "cuda" else "")]
    if "gemm_tflops" in m:
        lines.append(f"gemm (SiT-XL/2 shapes, bf16): {m['gemm_tflops']:.4g} TFLOP/s {m['gemm_tflops_by_shape']}")
    if "sdpa_ms" in m:
        lines.append(f"sdpa fwd+bwd {m['sdpa_shape']}: {m['sdpa_ms']:.3f} ms, {m['sdpa_tflops']:.4g} TFLOP/s, "
                     f"backend {m['sdpa_backend']}")
    if "copy_tbs" in m:
        lines.append(f"copy: {m['copy_tbs']:.4g} TB/s (read + write)")
    lines.append("preflight: " + ("FAILED: " + "; ".join(pre["failures"]) if pre["failures"] else "ok"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"preflight: FAILED: --device cuda but torch {torch.__version__} sees no CUDA device")
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    pre = run(device, quick=device.type != "cuda")
    (a.out / "preflight.json").write_text(json.dumps(pre, indent=1) + "\n")
    print(report(pre), flush=True)
    return 1 if pre["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
