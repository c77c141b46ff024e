"""adaLN modulated LayerNorm, the eager reference the models and the fused kernel share.

`modulate_norm_ref(x, shift, scale)`: LayerNorm without affine, then x * (1 + scale) + shift
per sample. The fused Triton version with the same contract is irepa.kernels.fused_adaln
(kernels/adaln.py); it lives below the models so that both can import it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def modulate_norm_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [B, T, D]; shift, scale [B, D]."""
    xn = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return xn * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
