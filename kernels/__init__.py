"""Fused Triton kernels (installed as irepa.kernels).

`fused_alignment_loss(z, y, gamma)`: spatial norm + cosine alignment loss (irepa.align).
`fused_adaln(x, shift, scale, eps)`: LayerNorm without affine + per-sample modulation.
Both are torch.library custom ops (they survive torch.compile(fullgraph=True)); CPU
tensors use the eager references unless TRITON_INTERPRET=1. Without triton installed the
import still works and both names are the eager references.

Imported as the top-level `kernels` (the checkout's root on sys.path, as under
`python -m pytest` there), this folder steps aside for the package that owns the name,
Hugging Face's `kernels` that transformers and diffusers import, or fails as if it were not
there (irepa/shadowing.py). Nothing here runs under that name: registering the custom ops a
second time from a second copy of the modules would replace the ones irepa.kernels serves.
"""
__all__ = ["fused_alignment_loss", "fused_adaln"]

if __name__ == "irepa.kernels":
    try:
        import triton  # noqa: F401
    except ImportError:  # CPU-only machines: keep the import working, serve the references
        triton = None

    if triton is not None:
        from .adaln import fused_adaln
        from .alignment import fused_alignment_loss
    else:
        from irepa.align import alignment_loss as fused_alignment_loss
        from irepa.adaln import modulate_norm_ref as fused_adaln
else:
    from irepa.shadowing import yield_name

    yield_name(__name__, __file__)
