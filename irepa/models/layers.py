"""Layers shared by SiT and JiT: embeddings, fixed 2-D sin-cos positions, modulation."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from irepa.adaln import modulate_norm_ref


def get_modulate_norm(fused: bool):
    """The adaLN function blocks call: the fused kernel on request, else the reference."""
    if fused:
        from irepa.kernels import fused_adaln  # imported lazily: triton is optional at import time
        return fused_adaln
    return modulate_norm_ref


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (MAE / DiT convention)."""
    if dim % 4:
        raise ValueError(f"sin-cos pos-embed needs dim divisible by 4, got {dim}")
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    # DiT puts the w coordinate first
    def axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([axis(dim // 2, gh), axis(dim // 2, gw)], axis=1).astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Scalar t -> sinusoidal features (256) -> MLP -> [B, D]."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        dt = torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 for float64 checks (finite differences)
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dt, device=t.device) / half)
        args = t.to(dt)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def _real_cpu(t: torch.Tensor) -> bool:
    """A CPU tensor with values that may be read (not fake / traced, as the memory planner's
    fake-tensor forward and torch.compile use)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


class LabelEmbedder(nn.Module):
    """Class labels -> [B, D]; index `num_classes` is the null class used for CFG.

    Label dropout is decided by the caller (`drop_mask`), so the trainer's seeded
    generator controls it and resume stays exact. `null_class` is None for a model
    trained without label dropout (it has no null row, so no classifier-free guidance).
    Labels on the CPU are range-checked (an error naming the label and the model's
    classes instead of nn.Embedding's "index out of range in self"); on an accelerator
    that check would cost a host sync per call, so it is skipped there.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.embedding_table.num_embeddings > self.num_classes else None

    def forward(self, y: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is not None:
            if self.dropout_prob <= 0:
                raise ValueError("label dropout requested but the model has no null class (dropout_prob=0)")
            y = torch.where(drop_mask, torch.full_like(y, self.num_classes), y)
        if _real_cpu(y) and y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.embedding_table.num_embeddings:
                bad = lo if lo < 0 else hi
                null = (f"{self.num_classes} is the null class" if self.null_class is not None else
                        "no null class: trained without label dropout, so no classifier-free guidance")
                raise ValueError(f"class label {bad} is out of range: the model has classes 0..{self.num_classes - 1} "
                                 f"({null})")
        return self.embedding_table(y)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@torch.no_grad()
def init_adaln_zero_(model: nn.Module) -> None:
    """DiT initialization shared by SiT and JiT: Xavier-uniform linears with zero bias,
    N(0, 0.02) label and timestep embeddings, and zeroed adaLN modulations and final layer
    (adaLN-Zero: every block starts as the identity and the output starts at 0).
    Patch embeddings and family-specific parameters are initialized by the model."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    final = model.final_layer
    for layer in [blk.adaLN_modulation[-1] for blk in model.blocks] + [final.adaLN_modulation[-1], final.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class PatchGridModel(nn.Module):
    """What SiT and JiT share around their blocks: a label embedder `y_embedder` and a
    square grid of `grid` x `grid` patches of `patch_size` pixels and `out_channels` channels."""

    y_embedder: LabelEmbedder
    patch_size: int
    out_channels: int
    grid: int

    @property
    def null_class(self) -> int | None:
        """The label index that means "no class" (CFG's unconditional branch); None when the
        model was built without label dropout and so has no such row."""
        return self.y_embedder.null_class

    def unpatchify(self, x_BTP: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] tokens -> [B, C, H, W] image."""
        B, p, c, g = x_BTP.shape[0], self.patch_size, self.out_channels, self.grid
        x = x_BTP.reshape(B, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, g * p, g * p)
