"""Block-size sweep of the Triton kernels at the GPU suite's shapes: a follow-up for GPU time left.

    python -m perf.tune_kernels                          # GPU: alignment E 768 and 1024, adaLN D 1152, bf16
    python -m perf.tune_kernels --device cpu --quick     # flow check (Triton interpreter, tiny shapes)

The kernels pick their tiles with heuristics not yet measured on a GPU
(irepa.kernels.alignment._token_blocks: BLOCK_T, BLOCK_E, warps of the token kernels;
irepa.kernels.adaln._blocks: ROWS, warps, the whole row in one BLOCK_D). Each variant replaces
that function for the run (nothing in kernels/ changes), is checked against the eager reference
on fresh random inputs (value and gradient within bf16 tolerance, every output element written),
then timed fwd+bwd with perf/harness.py's `bench` (CUDA-graph replays, median). One CSV row per variant, written as it
is measured, with the heuristic's own choice marked; the fastest correct variant is printed.
If it beats the heuristic by more than the timing spread, change the heuristic (and say so in
perf/RESULTS.md with the figures).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent

ALIGN_TILES = [(16, 256), (8, 256), (32, 256), (4, 256), (32, 128), (16, 128), (64, 64)]
ADALN_ROWS = [1, 2, 4, 8]
WARPS = [4, 8]
ADALN_WARPS = [4, 8, 16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_and_time(fn, ref, inputs, grad_inputs, device: str, quick: bool, K) -> tuple[float, float, float]:
    """(value rel. error, gradient rel. error, median ms of fwd+bwd) against `ref` in float64, the
    check with NaN-poisoned outputs, the timing without. grad_inputs: the inputs (in their order in
    `inputs`) whose gradients are compared."""
    from perf.harness import bench

    with contextlib.ExitStack() as stack:
        for patch in _poisoned(K):
            stack.enter_context(patch)
        err_v, err_g, g = _check(fn, ref, inputs, grad_inputs)
    ms = bench(lambda: fn(*inputs).backward(g), device, grad_to_none=grad_inputs, quick=quick)[0]
    return err_v, err_g, ms


def _check(fn, ref, inputs, grad_inputs):
    out = fn(*inputs)
    g = torch.randn_like(out) if out.dim() else None
    for t in grad_inputs:
        t.grad = None
    out.backward(g)
    got = [t.grad.clone() for t in grad_inputs]
    wants = [t.detach().double().requires_grad_(any(t is u for u in grad_inputs)) for t in inputs]
    want = ref(*wants)
    want_grads = torch.autograd.grad(want, [w for w in wants if w.requires_grad], None if g is None else g.double())
    err_v = _rel(out.detach(), want.detach())
    err_g = max(_rel(a, b) for a, b in zip(got, want_grads))
    if torch.isnan(out).any() or any(torch.isnan(t).any() for t in got):  # an element no program wrote
        err_v = err_g = float("nan")
    return err_v, err_g, g


def _poisoned(K):
    """The kernels' output allocations filled with NaN (as the kernel tests do): an unwritten element shows."""
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    patches = [mock.patch.object(K, "_empty", empty)]
    if hasattr(K, "_empty_like"):
        patches.append(mock.patch.object(K, "_empty_like", lambda t: torch.full_like(
            t, float("nan"), memory_format=torch.preserve_format)))
    return patches


def sweep_alignment(shapes, device, quick, csv_path, info):
    from perf.harness import finish
    from irepa.align import alignment_loss
    from irepa.kernels import alignment as K
    from irepa.kernels import fused_alignment_loss

    rows = []
    for B, T, E in shapes:
        heuristic = K._token_blocks(T, E)
        variants = sorted({(bt, be, w) for bt, be in ALIGN_TILES for w in WARPS if be <= max(16, E) and bt <= T}
                          | {heuristic})
        for bt, be, w in variants:
            z = torch.randn(B, T, E, device=device, dtype=torch.bfloat16).requires_grad_()
            y = torch.randn(B, T, E, device=device, dtype=torch.bfloat16)
            with mock.patch.object(K, "_token_blocks", lambda T_, E_, v=(bt, be, w): v):
                try:
                    ev, eg, ms = check_and_time(lambda z_, y_: fused_alignment_loss(z_, y_, 0.6),
                                                lambda z_, y_: alignment_loss(z_, y_, 0.6), [z, y], [z], device, quick, K)
                    err = ""
                except Exception as e:  # a tile Triton cannot compile for this device: recorded, the sweep goes on
                    ev = eg = ms = float("nan")
                    err = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            ok = ev < 1e-2 and eg < 2e-2
            row = {**info, "kernel": "alignment", "B": B, "T": T, "C": E, "block_t": bt, "block_c": be, "warps": w,
                   "heuristic": (bt, be, w) == heuristic, "rel_err_value": f"{ev:.2e}", "rel_err_grad": f"{eg:.2e}",
                   "correct": ok, "ms_fwd_bwd": f"{ms:.4f}", "error": err}
            rows.append(row)
            finish([row], csv_path)
            print(f"alignment B={B} T={T} E={E} tile {bt}x{be} warps {w}{' (heuristic)' if row['heuristic'] else ''}: "
                  f"{ms:.4f} ms, errors {ev:.1e} / {eg:.1e}{'' if ok else '  WRONG'} {err}", flush=True)
    return rows


def sweep_adaln(shapes, device, quick, csv_path, info):
    import triton

    from perf.harness import finish
    from irepa.kernels import adaln as K
    from irepa.kernels import fused_adaln
    from irepa.models.layers import modulate_norm_ref

    rows = []
    for B, T, D in shapes:
        heuristic = K._blocks(T, D)
        block_d = triton.next_power_of_2(D)
        variants = sorted({(r, block_d, w) for r in ADALN_ROWS for w in ADALN_WARPS if r <= T} | {heuristic})
        for rws, bd, w in variants:
            x = torch.randn(B, T, D, device=device, dtype=torch.bfloat16).requires_grad_()
            mod = torch.randn(B, 2 * D, device=device, dtype=torch.bfloat16).requires_grad_()
            with mock.patch.object(K, "_blocks", lambda T_, D_, v=(rws, bd, w): v):
                try:
                    ev, eg, ms = check_and_time(lambda x_, m_: fused_adaln(x_, m_[:, :D], m_[:, D:]),
                                                lambda x_, m_: modulate_norm_ref(x_, m_[:, :D], m_[:, D:]), [x, mod],
                                                [x, mod], device, quick, K)
                    err = ""
                except Exception as e:
                    ev = eg = ms = float("nan")
                    err = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            ok = ev < 1e-2 and eg < 2e-2
            row = {**info, "kernel": "adaln", "B": B, "T": T, "C": D, "block_t": rws, "block_c": bd, "warps": w,
                   "heuristic": (rws, bd, w) == heuristic, "rel_err_value": f"{ev:.2e}", "rel_err_grad": f"{eg:.2e}",
                   "correct": ok, "ms_fwd_bwd": f"{ms:.4f}", "error": err}
            rows.append(row)
            finish([row], csv_path)
            print(f"adaln B={B} T={T} D={D} rows {rws} warps {w}{' (heuristic)' if row['heuristic'] else ''}: "
                  f"{ms:.4f} ms, errors {ev:.1e} / {eg:.1e}{'' if ok else '  WRONG'} {err}", flush=True)
    return rows


def best_report(rows: list[dict]) -> list[str]:
    out = []
    for key in sorted({(r["kernel"], r["B"], r["T"], r["C"]) for r in rows}):
        rs = [r for r in rows if (r["kernel"], r["B"], r["T"], r["C"]) == key and r["correct"]]
        heur = next((r for r in rs if r["heuristic"]), None)
        if not rs:
            out.append(f"{key}: no correct variant")
            continue
        best = min(rs, key=lambda r: float(r["ms_fwd_bwd"]))
        gain = f", {float(heur['ms_fwd_bwd']) / float(best['ms_fwd_bwd']):.2f}x the heuristic's" if heur else ""
        out.append(f"{key[0]} B={key[1]} T={key[2]} C={key[3]}: best {best['block_t']}x{best['block_c']} "
                   f"warps {best['warps']} {float(best['ms_fwd_bwd']):.4f} ms{gain}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few variants (flow check)")
    p.add_argument("--kernels", default="alignment,adaln")
    p.add_argument("--csv", type=Path, default=HERE / "results" / "tune_kernels.csv")
    a = p.parse_args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before irepa.kernels (and triton) are imported
    from perf.common import env_info

    info = env_info(a.device)
    torch.manual_seed(0)
    rows = []
    if a.quick:
        global ALIGN_TILES, ADALN_ROWS, WARPS, ADALN_WARPS
        ALIGN_TILES, ADALN_ROWS, WARPS, ADALN_WARPS = [(4, 32)], [2], [4], [4]
    kernels = [k for k in a.kernels.split(",") if k]
    if "alignment" in kernels:
        rows += sweep_alignment([(2, 16, 48)] if a.quick else [(256, 256, 768), (256, 256, 1024)], a.device, a.quick,
                                a.csv, info)
    if "adaln" in kernels:
        rows += sweep_adaln([(2, 8, 48)] if a.quick else [(256, 256, 1152)], a.device, a.quick, a.csv, info)
    print("\n".join(best_report(rows)))
    if any(not r["correct"] for r in rows if not r["error"]):
        raise SystemExit("a variant computed a wrong result (see WRONG above)")


if __name__ == "__main__":
    main()
