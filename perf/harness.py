"""The kernel-benchmark harness shared by perf/bench_alignment.py, perf/bench_adaln.py and
perf/tune_kernels.py.

Command line (`parse_common`), inputs (`make_input`: contiguous, or the conv projector's real
[B, C, T] buffer viewed as [B, T, C]), timing (`bench`: on a GPU the launches are captured in a
CUDA graph and replayed (triton.testing.do_bench_cudagraph), so a ~0.1 ms op that goes through
Python custom-op dispatch is timed on the GPU, not the CPU; plain do_bench where capture fails,
the row's `timer` says which; a wall-clock loop on CPU; median and 20/80 % quantiles;
`time_modes`: fwd / bwd / full), the device-to-device copy bandwidth that GB/s figures are
compared against, bytes autograd saves for the backward (on fake tensors), peak memory, an
sm_90 compile check of the Triton kernels without a GPU, and CSV rows with device, commit,
date and the device's state (`timing_rows`, `finish`: appended as each provider finishes, so a
run cut off by a time limit keeps what it measured); `parse_shapes` reads --shapes.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from perf.common import quantiles, write_rows
from perf.common.device_state import gpu_state

HERE = Path(__file__).resolve().parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_common(description: str, default_csv: Path) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (flow check)")
    p.add_argument("--saved-only", action="store_true", help="only count saved-for-backward bytes")
    p.add_argument("--compile-check", action="store_true",
                   help="compile the kernels for sm_90 here (no GPU needed), print their global load/store kinds as JSON")
    p.add_argument("--providers", default="fused,eager,compile")
    p.add_argument("--shapes", default="", help="BxTxC list, e.g. 256x256x768,256x256x1024 (default: the script's)")
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "transposed", "both"],
                   help="transposed: the first input is a [B, C, T] buffer viewed as [B, T, C] (the conv "
                        "projector's output); both: each shape in the two layouts")
    p.add_argument("--csv", type=Path, default=default_csv)
    args = p.parse_args()
    if args.device == "cpu" and not args.compile_check:  # the fused op runs on CPU only interpreted
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return args


def make_input(shape, device: str, dtype, layout: str) -> torch.Tensor:
    B, T, C = shape
    if layout == "transposed":
        return torch.randn(B, C, T, device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(B, T, C, device=device, dtype=dtype)


TIMER = {"name": "wall"}  # what the last GPU timing used: "cudagraph", or "do_bench" where capture failed


def bench(fn, device: str, grad_to_none=None, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: CUDA-graph replays on a GPU, a plain wall-clock loop on CPU."""
    if device.startswith("cuda"):
        import triton.testing
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100, grad_to_none=grad_to_none,
                                                   quantiles=[0.5, 0.2, 0.8])
            TIMER["name"] = "cudagraph"
        except Exception as e:  # capture refused (a sync inside fn, ...): events around each launch instead
            print(f"  CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing with do_bench")
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8],
                                         warmup=5 if quick else 25, rep=20 if quick else 200)
            TIMER["name"] = "do_bench"
        return tuple(ms)
    fn()
    times = []
    for _ in range(3 if quick else 20):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    TIMER["name"] = "wall"
    return quantiles(times)


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Device-to-device copy GB/s (read + write) of a large buffer: the roofline here."""
    n = (1 << 20) if quick or not device.startswith("cuda") else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, quick=quick)[0]
    return 2 * n / ms / 1e6


def saved_bytes(fn, *args) -> int:
    """Bytes autograd keeps for backward (each storage once); works on fake tensors."""
    from torch.multiprocessing.reductions import StorageWeakRef

    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[StorageWeakRef(s).cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def peak_memory(fn, device: str) -> tuple[float, float]:
    """(extra MiB allocated at the peak of fn() over what was allocated before it, MiB the caching
    allocator reserved at that peak), GPU only."""
    if not device.startswith("cuda"):
        return float("nan"), float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20


def layouts(arg: str) -> list[str]:
    return ["contiguous", "transposed"] if arg == "both" else [arg]


def compile_check(specs: dict) -> None:
    """Compile each kernel for an H100 (sm_90) without a GPU and print its global memory
    instruction kinds (ld.global.v4.b32 = 16-byte vector loads) as JSON. specs: name ->
    (kernel, signature {arg: type or "" for constexpr}, constexprs, num_warps). Every pointer
    and integer gets the JIT's 16-byte divisibility hint, as for aligned shapes. Needs a
    process where TRITON_INTERPRET is unset (triton's own helpers are interpreted otherwise)."""
    import json
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {}
    for name, (fn, sig, consts, warps) in specs.items():
        sig = {k: "constexpr" if k in consts else v for k, v in sig.items()}
        attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v[0] == "*" or v in ("i32", "i64")}
        kernel = triton.compile(ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        out[name] = sorted(set(re.findall(r"(?:ld|st)\.global[.a-z0-9]*", kernel.asm["ptx"])))
    print(json.dumps(out))


def parse_shapes(text: str, default: list) -> list[tuple[int, int, int]]:
    if not text:
        return default
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes {text!r}: expected a comma list of BxTxC with positive sizes, e.g. 256x256x768")
    return shapes


def time_modes(make_out, inputs: list[torch.Tensor], device: str, quick: bool, grad_out=None) -> dict:
    """fwd / bwd / full timings of make_out() (a scalar loss, or a tensor with grad_out)."""
    out = {"fwd": bench(make_out, device, quick=quick)}
    result = make_out()
    out["bwd"] = bench(lambda: result.backward(grad_out, retain_graph=True), device, grad_to_none=inputs, quick=quick)
    out["full"] = bench(lambda: make_out().backward(grad_out), device, grad_to_none=inputs, quick=quick)
    return out


def timing_rows(base: dict, provider: str, timings: dict, min_bytes: dict, kernel_bytes: dict | None,
                copy_gbps: float, mem: tuple[float, float], saved, device: str = "cpu") -> list[dict]:
    """CSV rows (and a printed line) per mode; kernel_bytes only for the fused provider; mem is
    peak_memory's (allocated, reserved) MiB."""
    rows = []
    mem, reserved = mem
    state = gpu_state(device)
    for mode, (med, p20, p80) in timings.items():
        gbps = min_bytes[mode] / med / 1e6
        kfrac = round(kernel_bytes[mode] / med / 1e6 / copy_gbps, 3) if kernel_bytes else ""
        rows.append({**base, "provider": provider, "mode": mode, "ms_median": round(med, 4),
                     "ms_p20": round(p20, 4), "ms_p80": round(p80, 4), "gbps": round(gbps, 1),
                     "frac_copy": round(gbps / copy_gbps, 3), "kernel_frac_copy": kfrac,
                     "peak_mem_mib": round(mem, 1), "saved_bytes": saved if saved is not None else "",
                     "peak_reserved_mib": round(reserved, 1), "timer": TIMER["name"], **state})
        print(f"  {provider:8s} {mode:5s} {med:9.4f} ms [{p20:.4f}, {p80:.4f}]  {gbps:8.1f} GB/s "
              f"({gbps / copy_gbps:.0%} of copy)  peak {mem:.1f} MiB")
    return rows


def print_speedups(results: dict) -> None:
    if "fused" in results:
        for other in (p for p in results if p != "fused"):
            print(f"  fused speed-up vs {other}: " + ", ".join(
                f"{m} {results[other][m][0] / results['fused'][m][0]:.2f}x" for m in ("fwd", "bwd", "full")))


def finish(rows: list[dict], path: Path) -> None:
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        write_rows(path, [{k: r.get(k, "") for k in keys} for r in rows])
