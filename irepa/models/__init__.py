"""Model registry: `build(name, **kw)` for SiT (latent) and JiT (pixel) transformers."""
from __future__ import annotations

from .sit import SIT_SIZES, SiT

# default alignment depth per family size: 4 for B, 8 for L/XL (iREPA paper; End2End-Diffusion/iREPA
# README.md@99ad4ac runs B with depth 4, ldm/train.py defaults to 8)
_SIT_ALIGN_DEPTH = {"SiT-S/2": 4, "SiT-B/2": 4, "SiT-L/2": 8, "SiT-XL/2": 8, "SiT-T/2": 2, "SiT-Tiny/2": 1}


FUSED_FAMILIES = ("SiT",)
"""model families whose blocks have a fused kernel (`fused_kernels`); JiT's RMSNorm + modulation has none"""


def takes_fused_kernels(name: str) -> bool:
    """Whether model `name` is built with the `fused_kernels` keyword (the others refuse it)."""
    return name.split("-", 1)[0] in FUSED_FAMILIES


def names() -> list[str]:
    out = list(SIT_SIZES)
    try:
        from .jit import JIT_SIZES
        out += list(JIT_SIZES)
    except ImportError:
        pass
    return out


def build(name: str, **kw):
    """Build a model by name, e.g. build("SiT-XL/2", input_size=32, num_classes=1000).

    Keyword arguments go to the model constructor (input_size, in_channels, num_classes,
    class_dropout_prob, align_depth, attn_backend, fused_kernels, ...).
    """
    if name in SIT_SIZES:
        s = SIT_SIZES[name]
        kw.setdefault("align_depth", _SIT_ALIGN_DEPTH[name])
        return SiT(patch_size=int(name.split("/")[1]), dim=s.dim, depth=s.depth, heads=s.heads, **kw)
    if name.startswith("JiT"):
        from .jit import build_jit
        return build_jit(name, **kw)
    raise ValueError(f"unknown model {name!r}; known: {names()}")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
