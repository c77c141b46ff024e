"""Fused Triton kernels (installed as irepa.kernels).

`fused_alignment_loss(z, y, gamma)`: spatial norm + cosine alignment loss (irepa.align).
`fused_adaln(x, shift, scale, eps)`: LayerNorm without affine + per-sample modulation.
Both are torch.library custom ops (they survive torch.compile(fullgraph=True)); CPU
tensors use the eager references unless TRITON_INTERPRET=1. Without triton installed the
import still works and both names are the eager references.

Imported under any other name (the top-level `kernels` that transformers probes for the
Hugging Face kernels library finds this folder when the repo root is on sys.path), the
package defines nothing: registering the custom ops a second time from a second copy of
the modules would silently replace the implementations irepa.kernels serves.
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
    __all__ = []
