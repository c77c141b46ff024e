"""SiT: the DiT architecture trained as a flow-matching velocity model on VAE latents.

adaLN-Zero blocks (LayerNorm without affine, shift/scale/gate from the conditioning
vector), a 2-D sin-cos position embedding (fixed, or with train_pos_embed a trained
parameter that starts from it), zero-initialized modulation and final layer, label
dropout with a null class. forward returns (velocity, h_at_depth) where h_at_depth
[B, T, D] is the hidden state after block `align_depth` (1-indexed) that the alignment
projector reads. Sizes as in the DiT paper (Peebles & Xie 2023) and End2End-Diffusion/iREPA
ldm/models/sit.py@99ad4ac.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import attention, resolve_backend
from .layers import LabelEmbedder, Mlp, PatchGridModel, TimestepEmbedder, get_modulate_norm, init_adaln_zero_, sincos_pos_embed_2d


@dataclass(frozen=True)
class SiTSize:
    depth: int
    dim: int
    heads: int


SIT_SIZES = {
    "SiT-S/2": SiTSize(12, 384, 6),
    "SiT-B/2": SiTSize(12, 768, 12),
    "SiT-L/2": SiTSize(24, 1024, 16),
    "SiT-XL/2": SiTSize(28, 1152, 16),
    # test / demo sizes
    "SiT-T/2": SiTSize(4, 128, 4),
    "SiT-Tiny/2": SiTSize(2, 64, 2),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str = "sdpa"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = attention(qkv[0], qkv[1], qkv[2], self.backend)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class SiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, backend: str = "sdpa", fused: bool = False):
        super().__init__()
        self.attn = Attention(dim, heads, backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.modulate_norm = get_modulate_norm(fused)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g_a.unsqueeze(1) * self.attn(self.modulate_norm(x, sh_a, sc_a))
        return x + g_m.unsqueeze(1) * self.mlp(self.modulate_norm(x, sh_m, sc_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int, fused: bool = False):
        super().__init__()
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.modulate_norm = get_modulate_norm(fused)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.modulate_norm(x, shift, scale))


class SiT(PatchGridModel):
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 dim: int = 1152, depth: int = 28, heads: int = 16, mlp_ratio: float = 4.0,
                 num_classes: int = 1000, class_dropout_prob: float = 0.1, learn_sigma: bool = False,
                 align_depth: int = 8, attn_backend: str = "sdpa", fused_kernels: bool = False,
                 train_pos_embed: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if not 1 <= align_depth <= depth:
            raise ValueError(f"align_depth must be in [1, {depth}], got {align_depth}")
        self.in_channels, self.patch_size, self.input_size = in_channels, patch_size, input_size
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.dim, self.depth, self.num_classes, self.align_depth = dim, depth, num_classes, align_depth
        self.grid = input_size // patch_size
        self.num_tokens = self.grid ** 2
        backend = resolve_backend(attn_backend)
        self.x_embedder = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob)
        if train_pos_embed:  # REPA-E: the release's optimizer, clipping and EMA train it (recipes/repae.py)
            self.pos_embed = nn.Parameter(self.sincos_pos_embed())
        else:
            self.register_buffer("pos_embed", self.sincos_pos_embed(), persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(dim, heads, mlp_ratio, backend, fused_kernels) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels, fused_kernels)
        self.initialize_weights()

    def initialize_weights(self):
        init_adaln_zero_(self)
        w = self.x_embedder.weight.data  # the patch conv is initialized like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)

    def sincos_pos_embed(self) -> torch.Tensor:
        """The fixed 2-D sin-cos table [1, T, D] (where a trained pos_embed starts)."""
        return torch.from_numpy(sincos_pos_embed_2d(self.dim, self.grid))[None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None = None,
                extra_cond: torch.Tensor | None = None, hidden_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W], t [B] in [0, 1] (1 = noise), y [B] labels (num_classes = null).

        extra_cond [B, D]: added to the conditioning vector (t and y embeddings), for recipes
        that condition on more than t (MeanFlow's embedding of t - r).
        Returns (velocity [B, C_out, H, W], hidden [B, T, D] after block align_depth);
        hidden_only stops after block align_depth and returns (None, hidden) (REPA-E's VAE pass).
        """
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"SiT expects inputs [B, {self.in_channels}, {self.input_size}, {self.input_size}], "
                             f"got {tuple(x.shape)}")
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y, drop_mask)
        if extra_cond is not None:
            c = c + extra_cond
        hidden = None
        for i, blk in enumerate(self.blocks):
            h = blk(h, c)
            if i + 1 == self.align_depth:
                hidden = h
                if hidden_only:
                    return None, hidden
        return self.unpatchify(self.final_layer(h, c)), hidden
