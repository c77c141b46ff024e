"""Benchmark: fused alignment loss (irepa.kernels) vs eager and torch.compile of the reference.

Per shape and provider (fused / eager / compile) and mode (fwd / bwd / full):
triton.testing.do_bench median and 20/80 % quantiles, analytic GB/s as a fraction of the
device-to-device copy bandwidth measured here, peak memory of a full step, and the bytes
autograd keeps for backward (counted with saved_tensors_hooks on fake tensors: device
independent). One CSV row per measurement with device, commit and date.

  python -m perf.bench_alignment                       # GPU: B=256, T=256, E 768 and 1536, bf16
  python -m perf.bench_alignment --shapes 256x256x768,256x256x1024 --layout both
  python -m perf.bench_alignment --saved-only          # any machine: saved-for-backward bytes
  python -m perf.bench_alignment --device cpu --quick  # flow check on CPU (Triton interpreter)

--layout transposed (or both) times z as the conv projector really makes it: a [B, E, T] buffer
viewed as [B, T, E]. On a GPU every timing replays a CUDA graph (perf/harness.py's `bench`).

GB/s uses the bytes any implementation must move at least, n = B*T*E elements of the
input dtype: fwd reads z and y (2n), bwd reads a saved tensor of z's size and writes dz
(2n), full reads z and y and writes dz (3n). `kernel_frac_copy` uses the bytes the fused
kernels move by design (kernels/alignment.py header): fwd 4n (y for the spatial-norm
statistics, z and y for the tokens, write the gradient direction; the second read of the
token rows is counted as an L2 hit), bwd 2n (read it, write dz), full 6n.
--saved-only also prints what a forward-only (no grad) call of the fused op allocates.
Rows are appended to the CSV as each provider finishes (a run cut off by a time limit keeps
what it measured). torch.compile of the reference is static per shape (dynamic=False).
The measuring harness is perf/harness.py (shared with bench_adaln.py and tune_kernels.py).
"""
from __future__ import annotations

import itertools
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from perf.common import env_info
from perf.harness import (DTYPES, HERE, compile_check, copy_bandwidth, finish, layouts, make_input, parse_common,
                          parse_shapes, peak_memory, print_speedups, saved_bytes, time_modes, timing_rows)

SHAPES = [(256, 256, 768), (256, 256, 1536)]
QUICK_SHAPES = [(2, 16, 64)]


def alignment_specs(K, dt: str) -> dict:
    """The three kernels at B=256, T=256, E=768, z contiguous and as the conv projector's view
    (then the gradient buffers share z's [B, E, T] memory order); the forward with WRITE_GRAD."""
    t = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[dt]
    bt, be, w = K._token_blocks(256, 768)
    blocks = {"BLOCK_T": bt, "BLOCK_E": be}
    fwd_sig = {"z_ptr": f"*{t}", "y_ptr": f"*{t}", "chan_ptr": "*fp32", "cos_ptr": "*fp32", "rz_ptr": "*fp32",
               "w_ptr": f"*{t}", "B": "i32", "T": "i32", "E": "i32", "eps": "fp32",
               **{f"s_{x}{d}": "i64" for x in "zyw" for d in "bte"},
               "HAS_NORM": "", "WRITE_GRAD": "", "BLOCK_T": "", "BLOCK_E": ""}
    bwd_sig = {"grad_ptr": "*fp32", "w_ptr": f"*{t}", "rz_ptr": "*fp32", "dz_ptr": f"*{t}", "T": "i32", "E": "i32",
               "inv_n": "fp32", "s_b": "i64", "s_t": "i64", "s_e": "i64", "BLOCK_T": "", "BLOCK_E": ""}
    specs = {"stats": (K._channel_stats_kernel, {
        "y_ptr": f"*{t}", "chan_ptr": "*fp32", "B": "i32", "T": "i32", "E": "i32", "gamma": "fp32",
        "eps_std": "fp32", "s_yb": "i64", "s_yt": "i64", "s_ye": "i64", "BLOCK_T": "", "BLOCK_E": ""},
        {"s_ye": 1, "BLOCK_T": 32, "BLOCK_E": 128}, 4)}
    for layout, z_unit in [("contiguous", "e"), ("transposed", "t")]:
        fwd_consts = {f"s_z{z_unit}": 1, "s_ye": 1, f"s_w{z_unit}": 1, "HAS_NORM": True, "WRITE_GRAD": True, **blocks}
        specs[f"token_fwd_{layout}"] = (K._token_fwd_kernel, fwd_sig, fwd_consts, w)
        specs[f"token_bwd_{layout}"] = (K._token_bwd_kernel, bwd_sig, {f"s_{z_unit}": 1, **blocks}, w)
    return specs


def main() -> None:
    args = parse_common(__doc__.splitlines()[0], HERE / "results" / "bench_alignment.csv")
    from irepa.align import alignment_loss
    from irepa.kernels import alignment as K
    from irepa.kernels import fused_alignment_loss

    dtype, gamma = DTYPES[args.dtype], 0.6
    if args.compile_check:
        return compile_check(alignment_specs(K, args.dtype))
    info = env_info(args.device)
    shapes = parse_shapes(args.shapes, QUICK_SHAPES if args.quick else SHAPES)
    providers = args.providers.split(",")
    fns = {"fused": fused_alignment_loss, "eager": alignment_loss}
    if "compile" in providers:
        fns["compile"] = torch.compile(alignment_loss, fullgraph=True, dynamic=False)
    rows = []
    copy_gbps = float("nan") if args.saved_only else copy_bandwidth(args.device, args.quick)
    print(f"{info['device_name']}: copy {copy_gbps:.0f} GB/s")
    for (B, T, E), layout in itertools.product(shapes, layouts(args.layout)):
        es, n = torch.finfo(dtype).bits // 8, B * T * E
        min_bytes = {"fwd": 2 * n * es, "bwd": 2 * n * es, "full": 3 * n * es}
        fwd_passes = 4 if gamma is not None else 3  # (y for the statistics), z, y, write w
        kernel_bytes = {"fwd": fwd_passes * n * es, "bwd": 2 * n * es, "full": (fwd_passes + 2) * n * es}
        with FakeTensorMode():  # saved bytes need no device and no compute
            zf = make_input((B, T, E), "cpu", dtype, layout).requires_grad_()
            yf = torch.empty(B, T, E, dtype=dtype)
            saved = {"eager": saved_bytes(alignment_loss, zf, yf, gamma),
                     # the op itself: fake CPU tensors would send the public function to eager
                     "fused": saved_bytes(lambda z, y, g: K._alignment_fwd_op(z, y, g, True)[0], zf, yf, gamma)}
            with torch.no_grad():  # eval: the forward must make no gradient
                extra = sum(o.untyped_storage().nbytes() for o in K._alignment_fwd_op(zf, yf, gamma, False)[1:])
        print(f"B={B} T={T} E={E} {args.dtype}: saved for backward: eager {saved['eager'] / 2**20:.1f} MiB, "
              f"fused {saved['fused'] / 2**20:.1f} MiB (ratio {saved['fused'] / saved['eager']:.3f}; "
              f"z, y are {2 * n * es / 2**20:.1f} MiB and not saved); fused forward-only extra outputs {extra} B")
        base = {**info, "bench": "alignment", "B": B, "T": T, "E": E, "dtype": args.dtype, "gamma": gamma,
                "layout": layout,
                "quick": args.quick, "copy_gbps": round(copy_gbps, 1)}
        if args.saved_only:
            rows += [{**base, "provider": p, "mode": "saved", "saved_bytes": saved[p]} for p in saved]
            continue
        z = make_input((B, T, E), args.device, dtype, layout).requires_grad_()
        y = torch.randn(B, T, E, device=args.device, dtype=dtype)
        results = {}
        for p in providers:
            fn = fns[p]
            results[p] = time_modes(lambda: fn(z, y, gamma), [z], args.device, args.quick)
            mem = peak_memory(lambda: fn(z, y, gamma).backward(), args.device)
            z.grad = None
            finish(timing_rows(base, p, results[p], min_bytes, kernel_bytes if p == "fused" else None,
                               copy_gbps, mem, saved.get(p), args.device), args.csv)
        print_speedups(results)
    finish(rows, args.csv)


if __name__ == "__main__":
    sys.exit(main())
