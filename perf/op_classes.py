"""The op classes a training step's time is split into: the roofline predicts each
(perf/roofline), the profiled step measures each (perf/attribution.py)."""
from __future__ import annotations

CLASSES = ("GEMM", "attention", "norms+modulation", "elementwise", "alignment loss", "optimizer+EMA",
           "online encoder")

# (class, name fragments), first match wins: our kernels and norms before the generic rules
RULES = (
    ("alignment loss", ("_token_fwd", "_token_bwd", "_channel_stats", "alignment_loss")),
    ("norms+modulation", ("adaln", "layer_norm", "rms_norm", "layernorm", "rmsnorm")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "conv", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::baddbmm", "aten::linear", "_mm_", "tem_fused", "sm90_")),
    ("optimizer+EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("elementwise", ("triton_poi", "triton_red", "triton_per", "elementwise", "reduce_kernel", "vectorized",
                     "aten::", "cpp_fused", "copy", "fill")),
)


def op_class(name: str, in_update: bool) -> str:
    if in_update:
        return "optimizer+EMA"
    low = name.lower()
    for cls, frags in RULES:
        if any(f in low for f in frags):
            return cls
    return "other"
