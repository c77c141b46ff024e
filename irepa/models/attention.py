"""Attention backends with one contract: q, k, v [B, H, T, Dh] -> [B, H, T, Dh].

"sdpa" (PyTorch scaled_dot_product_attention) always works; "flash" uses flash-attn 3
(hopper build) or 2 when installed, "xformers" uses memory_efficient_attention. Both
optional libraries need CUDA and fp16/bf16 inputs; `resolve_backend("auto")` picks the
fastest one that is importable and falls back to SDPA otherwise.

Under forward-mode AD (MeanFlow's JVP) every backend is replaced by `math_attention`:
of PyTorch's SDPA kernels only the math one has a JVP formula, and flash-attn / xformers
have none (irepa.forward_ad). One log line says so the first time it happens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from irepa import forward_ad

try:  # flash-attn 3 (Hopper) ships as flash_attn_interface
    from flash_attn_interface import flash_attn_func as _flash3  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    _flash3 = None
try:
    from flash_attn import flash_attn_func as _flash2  # type: ignore
except Exception:  # pragma: no cover
    _flash2 = None
try:
    from xformers.ops import memory_efficient_attention as _xformers  # type: ignore
except Exception:  # pragma: no cover
    _xformers = None

BACKENDS = ("auto", "sdpa", "flash", "xformers")


def available_backends() -> list[str]:
    out = ["sdpa"]
    if torch.cuda.is_available() and (_flash3 is not None or _flash2 is not None):
        out.insert(0, "flash")
    if torch.cuda.is_available() and _xformers is not None:
        out.append("xformers")
    return out


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        return available_backends()[0]
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not available here (needs CUDA and the "
                         f"package installed); available: {available_backends()}")
    return name


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v written out (softmax in at least fp32): differentiable in both modes."""
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return s.softmax(-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    if forward_ad.active(q, k, v):
        forward_ad.note_fallback("attention uses explicit math softmax attention",
                                 f"backend {backend!r}: flash/efficient/cuDNN SDPA, flash-attn and xformers have no JVP")
        return math_attention(q, k, v)
    if backend == "sdpa" or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v)
    # flash-attn and xformers take [B, T, H, Dh]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "flash":
        if _flash3 is not None:
            o = _flash3(q_, k_, v_)
            o = o[0] if isinstance(o, tuple) else o
        else:
            o = _flash2(q_, k_, v_)
    elif backend == "xformers":
        o = _xformers(q_, k_, v_)
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return o.transpose(1, 2)
