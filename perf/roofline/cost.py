"""Per-class FLOPs, bytes and predicted times of a recorded step (sum over kernels of
max(FLOPs / matmul rate, bytes / bandwidth)), its MFU ceiling, and the alignment loss alone."""
from __future__ import annotations

from dataclasses import dataclass

from perf.op_classes import CLASSES
from perf.roofline.fusion import _fusible, classify, compile_unit, fuse
from perf.roofline.hardware import Device
from perf.roofline.trace import Trace, trace_alignment

SCOPES = {"eager": None, "compile": "blocks", "compile+fusedloss": "blocks", "compile+fused": "blocks",
          "baseline": "net"}


@dataclass
class Cost:
    flops: dict
    bytes: dict
    t_compute: dict  # s, FLOPs at the matmul rate
    t_memory: dict  # s, bytes at the bandwidth
    t_pred: dict  # s, sum over kernels of max(...)
    kernels: int
    total_s: float
    useful_flops: float
    mfu: float
    img_per_s: float


def cost(trace: Trace, device: Device, scope: str | None = "default") -> Cost:
    """Per-class FLOPs, bytes and times of a trace; scope 'default' is the config's own compile scope."""
    if scope == "default":
        scope = SCOPES[trace.config]
    ops = trace.ops
    for op in ops:
        op.cls = classify(op)
        op.unit = compile_unit(op, scope)
    regions = 0
    if scope is None:
        for op in ops:
            op.fused_bytes = op.bytes
    else:
        regions = fuse(ops)
    rate, bw = device.matmul_tflops * 1e12, device.bandwidth_tbs * 1e12
    z = {c: 0.0 for c in CLASSES}
    flops, nbytes, tc, tm, tp = dict(z), dict(z), dict(z), dict(z), dict(z)
    kernels = regions
    for op in ops:
        c = op.cls
        flops[c] += op.flops
        nbytes[c] += op.fused_bytes
        tc[c] += op.flops / rate
        tm[c] += op.fused_bytes / bw
        tp[c] += max(op.flops / rate, op.fused_bytes / bw)
        kernels += 0 if _fusible(op) else 1
    total = sum(tp.values())
    peak = device.peak_tflops * 1e12
    return Cost(flops, nbytes, tc, tm, tp, kernels, total, trace.useful_flops, trace.useful_flops / (total * peak),
                trace.batch / total)


def beyond_flops(c: Cost) -> list[tuple[str, float]]:
    """Classes by predicted time minus their FLOPs at the matmul rate, largest first."""
    return sorted(((k, c.t_pred[k] - c.t_compute[k]) for k in CLASSES), key=lambda kv: -kv[1])


def format_cost(trace: Trace, c: Cost, device: Device) -> str:
    lines = [f"{trace.model} + iREPA, {trace.config}, batch {trace.batch} ({trace.plan}), {device.name}: "
             f"{device.matmul_tflops:.0f} TFLOP/s matmul, {device.bandwidth_tbs} TB/s",
             f"  {'class':18s} {'TFLOP':>9s} {'GB':>9s} {'compute ms':>11s} {'memory ms':>10s} {'pred ms':>9s} "
             f"{'beyond ms':>10s}"]
    for k in CLASSES:
        if c.t_pred[k] == 0 and c.bytes[k] == 0:
            continue
        lines.append(f"  {k:18s} {c.flops[k] / 1e12:9.2f} {c.bytes[k] / 1e9:9.2f} {1e3 * c.t_compute[k]:11.2f} "
                     f"{1e3 * c.t_memory[k]:10.2f} {1e3 * c.t_pred[k]:9.2f} {1e3 * (c.t_pred[k] - c.t_compute[k]):10.2f}")
    lines.append(f"  {'total':18s} {sum(c.flops.values()) / 1e12:9.2f} {sum(c.bytes.values()) / 1e9:9.2f} "
                 f"{1e3 * sum(c.t_compute.values()):11.2f} {1e3 * sum(c.t_memory.values()):10.2f} "
                 f"{1e3 * c.total_s:9.2f} {1e3 * (c.total_s - sum(c.t_compute.values())):10.2f}")
    top = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in beyond_flops(c)[:3])
    lines.append(f"  predicted: {1e3 * c.total_s:.1f} ms/step, {c.img_per_s:.0f} img/s, MFU ceiling "
                 f"{100 * c.mfu:.1f}% (useful {c.useful_flops / 1e12:.1f} TFLOP/step, {c.kernels} kernels); "
                 f"beyond FLOPs: {top}")
    return "\n".join(lines)


def alignment_prediction(B: int, T: int, E: int, device: Device) -> dict:
    """Predicted fwd+bwd ms per provider; compile = ideal fusion of the reference (fwd and bwd graphs)."""
    out = {}
    for provider in ("eager", "compile", "fused"):
        ops = trace_alignment(B, T, E, "fused" if provider == "fused" else "eager")
        for op in ops:
            op.cls = classify(op)
            op.unit = "loss" if provider == "compile" else None
        regions = 0
        if provider == "compile":
            regions = fuse(ops)
        else:
            for op in ops:
                op.fused_bytes = op.bytes
        nbytes = sum(op.fused_bytes for op in ops)
        out[provider] = dict(bytes=nbytes, ms=1e3 * nbytes / (device.bandwidth_tbs * 1e12),
                             kernels=regions + sum(1 for op in ops if not _fusible(op)))
    return out
