"""Benchmark: fused adaLN (irepa.kernels) vs eager and torch.compile of modulate_norm_ref.

Same modes, columns and harness (perf/harness.py) as bench_alignment.py: fwd / bwd / full with
CUDA-graph replays (median and 20/80 % quantiles, GB/s of the bytes the op must move
(fwd: read x, write out; bwd: read dy and x, write dx) against the measured copy
bandwidth, peak memory, saved-for-backward bytes on fake tensors, a CSV row each.

  python -m perf.bench_adaln                       # GPU: B=256, T=256, D 768 (SiT-B) and 1152 (SiT-XL), bf16
  python -m perf.bench_adaln --saved-only          # any machine
  python -m perf.bench_adaln --device cpu --quick  # flow check on CPU (Triton interpreter)
"""
from __future__ import annotations

import itertools
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from perf.common import env_info
from perf.harness import (DTYPES, HERE, compile_check, copy_bandwidth, finish, layouts, make_input, parse_common,
                          peak_memory, print_speedups, saved_bytes, time_modes, timing_rows)

SHAPES = [(256, 256, 768), (256, 256, 1152)]
QUICK_SHAPES = [(2, 16, 64)]


def adaln_specs(K, t: str) -> dict:
    """Both kernels at T=256, D=1152 (SiT-XL), contiguous rows."""
    rows, block_d, warps = K._blocks(256, 1152)
    unit = {"s_xd": 1, "s_cd": 1, "ROWS": rows, "BLOCK_D": block_d}
    return {
        "adaln_fwd": (K._adaln_fwd_kernel, {
            "x_ptr": f"*{t}", "shift_ptr": f"*{t}", "scale_ptr": f"*{t}", "out_ptr": f"*{t}", "mean_ptr": "*fp32",
            "rstd_ptr": "*fp32", "T": "i32", "D": "i32", "eps": "fp32", "s_xb": "i64", "s_xt": "i64", "s_xd": "i64",
            "s_hb": "i64", "s_hd": "i64", "s_cb": "i64", "s_cd": "i64", "ROWS": "", "BLOCK_D": ""},
            {**unit, "s_hd": 1}, warps),
        "adaln_bwd": (K._adaln_bwd_kernel, {
            "dy_ptr": f"*{t}", "x_ptr": f"*{t}", "scale_ptr": f"*{t}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
            "dx_ptr": f"*{t}", "part_ptr": "*fp32", "B": "i32", "T": "i32", "D": "i32", "rows_per_chunk": "i32",
            "s_gb": "i64", "s_gt": "i64", "s_gd": "i64", "s_xb": "i64", "s_xt": "i64", "s_xd": "i64", "s_cb": "i64",
            "s_cd": "i64", "s_db": "i64", "s_dt": "i64", "s_dd": "i64", "ROWS": "", "BLOCK_D": ""},
            {**unit, "s_gd": 1, "s_dd": 1}, warps),
    }


def main() -> None:
    args = parse_common(__doc__.splitlines()[0], HERE / "results" / "bench_adaln.csv")
    from irepa.kernels import adaln as K
    from irepa.kernels import fused_adaln
    from irepa.adaln import modulate_norm_ref

    dtype = DTYPES[args.dtype]
    if args.compile_check:
        return compile_check(adaln_specs(K, args.dtype))
    info = env_info(args.device)
    providers = args.providers.split(",")
    fns = {"fused": fused_adaln, "eager": modulate_norm_ref}
    if "compile" in providers:
        fns["compile"] = torch.compile(modulate_norm_ref, fullgraph=True)
    rows = []
    copy_gbps = float("nan") if args.saved_only else copy_bandwidth(args.device, args.quick)
    print(f"{info['device_name']}: copy {copy_gbps:.0f} GB/s")
    for (B, T, D), layout in itertools.product(QUICK_SHAPES if args.quick else SHAPES, layouts(args.layout)):
        es, n = torch.finfo(dtype).bits // 8, B * T * D
        min_bytes = {"fwd": 2 * n * es, "bwd": 3 * n * es, "full": 5 * n * es}
        with FakeTensorMode():
            xf = torch.empty(B, T, D, dtype=dtype).requires_grad_()
            mod = [torch.empty(B, D, dtype=dtype).requires_grad_() for _ in range(2)]
            saved = {"eager": saved_bytes(modulate_norm_ref, xf, *mod),
                     "fused": saved_bytes(lambda *a: K._adaln_fwd_op(*a, 1e-6)[0], xf, *mod)}
        print(f"B={B} T={T} D={D} {args.dtype}: saved for backward: eager {saved['eager'] / 2**20:.1f} MiB, "
              f"fused {saved['fused'] / 2**20:.1f} MiB (ratio {saved['fused'] / saved['eager']:.3f})")
        base = {**info, "bench": "adaln", "B": B, "T": T, "D": D, "dtype": args.dtype, "layout": layout,
                "quick": args.quick, "copy_gbps": round(copy_gbps, 1)}
        if args.saved_only:
            rows += [{**base, "provider": p, "mode": "saved", "saved_bytes": saved[p]} for p in saved]
            continue
        x = make_input((B, T, D), args.device, dtype, layout).requires_grad_()
        # shift and scale as SiT makes them: chunks of one [B, 6D] modulation
        mod6 = torch.randn(B, 6 * D, device=args.device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(B, T, D, device=args.device, dtype=dtype)
        results = {}
        for p in providers:
            fn = fns[p]

            def run():
                shift, scale = mod6[:, :D], mod6[:, D:2 * D]
                return fn(x, shift, scale)
            results[p] = time_modes(run, [x, mod6], args.device, args.quick, grad_out)
            mem = peak_memory(lambda: run().backward(grad_out), args.device)
            x.grad = mod6.grad = None
            rows += timing_rows(base, p, results[p], min_bytes, min_bytes if p == "fused" else None,
                                copy_gbps, mem, saved.get(p), args.device)
        print_speedups(results)
    finish(rows, args.csv)


if __name__ == "__main__":
    sys.exit(main())
