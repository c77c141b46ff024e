"""Representation alignment: projectors, spatial normalization and the cosine loss.

REPA aligns the diffusion hidden state h [B, T, D] after block `depth` to frozen encoder
patch tokens y [B, T, E] through an MLP projector; iREPA replaces the MLP with one 3x3
convolution (kernel size configurable) on the sqrt(T) x sqrt(T) token grid and spatially normalizes the target
(per channel over the token axis, with the mean scaled by gamma), as in the iREPA paper (arXiv
2512.10794) and End2End-Diffusion/iREPA @99ad4ac (ldm/models/sit.py projectors, ldm/utils.py
spatial_zscore, ldm/projection_loss.py).

The functions here are the eager references: all norm and cosine math in fp32, since
fp16 cosine normalization was reported to produce NaNs late in training.
`irepa.kernels.fused_alignment_loss` computes the same thing in one fused pass.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

COSINE_EPS = 1e-12  # F.normalize's clamp on the L2 norm; the fused kernel uses the same


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: at least fp32 (float64 stays float64, for reference checks)."""
    return t if t.dtype == torch.float64 else t.float()


def spatial_norm(y: torch.Tensor, gamma: float = 0.6, eps: float = 1e-6) -> torch.Tensor:
    """iREPA target normalization: (y - gamma * mean_T(y)) / (std_T(y) + eps), fp32.

    y: [B, T, E]; mean and unbiased std are taken per (sample, channel) over the T axis.
    """
    if y.dim() != 3:
        raise ValueError(f"spatial_norm expects [B, T, E] features, got shape {tuple(y.shape)}")
    if y.shape[1] < 2:
        raise ValueError(f"spatial_norm needs at least 2 tokens for an unbiased std, got T={y.shape[1]}")
    y32 = _acc(y)
    mean = y32.mean(dim=1, keepdim=True)
    std = y32.std(dim=1, keepdim=True)
    return (y32 - gamma * mean) / (std + eps)


def alignment_loss(z: torch.Tensor, y: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
    """Negative mean cosine similarity between projected hidden states z and targets y.

    Math in fp32 for 16/32-bit inputs (float64 inputs stay float64); the result is fp32
    (float64 for float64 z).

    z, y: [B, T, E]. gamma None aligns to y as given (REPA); a float applies
    `spatial_norm(y, gamma)` first (iREPA). The target never receives a gradient.
    """
    if z.shape != y.shape:
        raise ValueError(f"alignment_loss: projection {tuple(z.shape)} and target {tuple(y.shape)} differ")
    with torch.no_grad():
        y32 = spatial_norm(y, gamma) if gamma is not None else _acc(y)
        y_n = F.normalize(y32, dim=-1, eps=COSINE_EPS)
    z_n = F.normalize(_acc(z), dim=-1, eps=COSINE_EPS)
    return -(z_n * y_n).sum(dim=-1).mean()


class MLPProjector(nn.Module):
    """REPA projector: Linear(D, H), SiLU, Linear(H, H), SiLU, Linear(H, E), Xavier init."""

    def __init__(self, dim: int, out_dim: int, hidden_dim: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.net(h_BTD)


def token_grid(num_tokens: int, where: str = "tokens") -> int:
    """Side of the square token grid, or a ValueError naming the offending count."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{where}: {num_tokens} tokens do not form a square grid; the conv projector "
            f"needs T = side*side (e.g. 256 = 16x16). Drop CLS/register tokens first."
        )
    return side


def check_kernel_size(kernel_size: int, where: str = "conv projector kernel_size") -> int:
    """The conv projector's kernel side: a positive odd int (the grid keeps its size), else ValueError."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{where} must be a positive odd integer (1, 3, 5, ...), got {kernel_size!r}")
    return kernel_size


class ConvProjector(nn.Module):
    """iREPA projector: one Conv2d(D, E, k x k, padding k // 2) on the row-major token grid.

    k = 3 in the paper and the JiT release; the LDM release's --proj-kwargs-kernel-size
    defaults to 1, so its checkpoints may hold 1x1 heads."""

    def __init__(self, dim: int, out_dim: int, kernel_size: int = 3):
        super().__init__()
        check_kernel_size(kernel_size)
        self.conv = nn.Conv2d(dim, out_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = h_BTD.shape
        side = token_grid(T, "ConvProjector")
        h_BDHW = h_BTD.transpose(1, 2).reshape(B, D, side, side)
        return self.conv(h_BDHW).flatten(2).transpose(1, 2)


def build_projector(kind: str, dim: int, out_dim: int, hidden_dim: int = 2048, kernel_size: int = 3) -> nn.Module:
    """`kind` "mlp" (hidden_dim wide) or "conv" (kernel_size x kernel_size)."""
    if kind == "mlp":
        return MLPProjector(dim, out_dim, hidden_dim)
    if kind == "conv":
        return ConvProjector(dim, out_dim, kernel_size)
    raise ValueError(f"unknown projector {kind!r}; choose 'mlp' (REPA) or 'conv' (iREPA)")


LossFn = Callable[[torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]


class AlignmentHead(nn.Module):
    """One projector per encoder; the alignment loss is the mean over encoders.

    `loss_fn` is the eager `alignment_loss` or the fused Triton op with the same contract.
    """

    def __init__(self, dim: int, encoder_dims: Sequence[int], projector: str = "conv",
                 gamma: float | None = 0.6, hidden_dim: int = 2048, loss_fn: LossFn | None = None,
                 kernel_size: int = 3):
        super().__init__()
        if not encoder_dims:
            raise ValueError("AlignmentHead needs at least one encoder dimension")
        self.projectors = nn.ModuleList(build_projector(projector, dim, e, hidden_dim, kernel_size)
                                        for e in encoder_dims)
        self.gamma = gamma
        self.loss_fn: LossFn = loss_fn or alignment_loss

    def forward(self, h_BTD: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(targets) != len(self.projectors):
            raise ValueError(f"got {len(targets)} encoder targets for {len(self.projectors)} projectors")
        losses = []
        for proj, y in zip(self.projectors, targets):
            z = proj(h_BTD)
            if z.shape != y.shape:
                raise ValueError(
                    f"projected hidden state {tuple(z.shape)} does not match encoder features "
                    f"{tuple(y.shape)}: token count or encoder dim disagree with the model config")
            losses.append(self.loss_fn(z, y, self.gamma))
        return torch.stack(losses).mean()
