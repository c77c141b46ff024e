"""REPA-E's latent normalization: a BatchNorm on the clean latent at the SiT input.

BatchNorm2d(C, eps 1e-4, momentum 0.1, affine off), as REPA-E's SiT applies to the VAE
latent before noising (End2End-Diffusion/REPA-E models/sit.py@3ad8046):
- train mode (the SiT update): batch statistics over (B, H, W), running statistics
  updated with the unbiased variance; with several ranks the statistics are those of
  the global batch (what SyncBatchNorm computes), summed with an autograd-aware
  all-reduce so it also works on CPU / gloo, where nn.SyncBatchNorm refuses to run;
- eval mode (the VAE's alignment pass, sampling, latent-only training): running stats.
No affine parameters: a learnable scale could shrink the latents to cheat the
diffusion loss. Initialised from latent statistics (running_mean = bias, running_var =
(1/scale)^2); a sample x of the model decodes as the latent x / scale + bias with
scale = running_var^-1/2 (REPA-E's `extract_latents_stats`, no eps).
State-dict keys are `bn.running_mean`, `bn.running_var`, `bn.num_batches_tracked`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-4
BN_MOMENTUM = 0.1


class LatentNorm(nn.Module):
    def __init__(self, channels: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM, sync: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=False, track_running_stats=True)
        self.sync = sync
        """global-batch statistics when torch.distributed has several ranks (train mode)"""

    @torch.no_grad()
    def init_from_stats(self, scale: torch.Tensor, bias: torch.Tensor) -> None:
        """running_mean = bias, running_var = (1 / scale)^2 (per channel; any shape with C entries)."""
        scale = torch.as_tensor(scale, dtype=torch.float32).flatten()
        bias = torch.as_tensor(bias, dtype=torch.float32).flatten()
        C = self.bn.num_features
        if scale.numel() != C or bias.numel() != C:
            raise ValueError(f"latent stats have {scale.numel()} / {bias.numel()} channels, the latent has {C}")
        if not torch.all(scale > 0):
            raise ValueError(f"latent scale must be positive per channel, got {scale.tolist()}")
        self.bn.running_mean.copy_(bias)
        self.bn.running_var.copy_(scale.reciprocal().pow(2))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [C] = running_var^-1/2, bias [C] = running_mean)."""
        return self.bn.running_var.rsqrt(), self.bn.running_mean

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> VAE latents: x / scale + bias."""
        scale, bias = self.stats()
        return x / scale.view(1, -1, 1, 1).to(x) + bias.view(1, -1, 1, 1).to(x)

    def _world(self) -> int:
        return dist.get_world_size() if self.sync and dist.is_available() and dist.is_initialized() else 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not self.training or self._world() == 1:
            if self.training:  # as nn.BatchNorm2d does (momentum is set, so the count is bookkeeping only)
                bn.num_batches_tracked.add_(1)
            return F.batch_norm(z, bn.running_mean, bn.running_var, None, None, self.training, bn.momentum, bn.eps)
        return self._synced_train(z)

    def _synced_train(self, z: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        z32 = z.float()
        n_local = z.shape[0] * z.shape[2] * z.shape[3]
        packed = torch.cat([z32.sum((0, 2, 3)), (z32 * z32).sum((0, 2, 3)),
                            torch.full((1,), float(n_local), device=z.device)])
        packed = _SumOverRanks.apply(packed) if z.requires_grad else _all_reduce_nograd(packed)
        C = z.shape[1]
        n = packed[-1]
        mean = packed[:C] / n
        var = (packed[C:2 * C] / n - mean * mean).clamp_min(0)  # biased: what normalizes the batch
        with torch.no_grad():
            m = bn.momentum
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            bn.num_batches_tracked.add_(1)
        out = (z32 - mean.view(1, C, 1, 1)) * torch.rsqrt(var.view(1, C, 1, 1) + bn.eps)
        return out.to(z.dtype)


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks whose backward sums the output gradients over ranks (every rank's
    output depends on every rank's input). Ours rather than torch.distributed.nn's
    all_reduce: that one is deprecated (a FutureWarning on every call) and, on gloo with
    torch 2.13, a 2-rank process that used its backward aborted at interpreter exit in 3 of
    50 runs ("terminate called without an active exception"); 0 of 160 with this one."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _all_reduce_nograd(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t
