"""JiT ("Just image Transformers", Li & He 2025): x-prediction diffusion directly on pixels.

A plain ViT on large pixel patches (16 px at 256, 32 px at 512) with the modern block:
bottleneck patch embedding (patch -> conv to a narrow bottleneck, no bias -> 1x1 conv to
the width), RMSNorm, qk-norm (RMSNorm per head), 2-D RoPE, SwiGLU MLP (hidden
int(4 d * 2/3)), adaLN-Zero conditioning on t + y, and 32 in-context class tokens
(the class embedding repeated, plus a learned position embedding) prepended before block
index `in_context_start` (0-indexed; blocks k+1..depth, 1-indexed, see them). The final
layer predicts the clean image x. Sizes and dropout per the JiT
release (End2End-Diffusion/iREPA jit/model_jit.py@99ad4ac).
Parameters at 256 px (the fixed sin-cos pos-embed is a buffer, not counted):
B/16 131.12M, L/16 458.88M, H/16 952.51M; the paper lists 131M, 459M, 953M (counting the
release's frozen pos-embed Parameter adds 0.20 / 0.26 / 0.33M). Forward GMACs at 256 px:
25.2 / 87.9 / 181.9 (`forward_flops()` / 2).

forward(x, t, y, drop_mask) -> (x_prediction [B, C, H, W], hidden [B, T, D]), hidden the
output of block `align_depth` (1-indexed) with the in-context tokens removed, so the
alignment projector always sees the (H/p) x (W/p) patch grid. Time is JiT's: t = 1 is
data (the JiT recipe, irepa.recipes.jit, handles the flip to SiT time for its loss and
the samplers). Default alignment depth: 4 for B (the iREPA README's JiT-B runs), 8 for L and H
(the iREPA JiT release's default encoder depth; for H it lies before the in-context
tokens, which start at block 11).

Parameter names follow the JiT release (x_embedder.proj1/proj2, blocks.i.attn.q_norm,
mlp.w12/w3, in_context_posemb, final_layer.norm_final, ...), so its checkpoints map onto
this module key for key (its pos_embed parameter is our buffer).

JiT has no fused RMSNorm + adaLN kernel yet (model.fused_kernels applies to SiT only, see
irepa.models.takes_fused_kernels): it runs the eager ops, which torch.compile per block fuses.
Blocks call the modulation through their `modulate` attribute (as SiT blocks call
`modulate_norm`), where a tool can see it (perf/roofline tags it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, resolve_backend
from .layers import LabelEmbedder, PatchGridModel, TimestepEmbedder, init_adaln_zero_, sincos_pos_embed_2d


@dataclass(frozen=True)
class JiTSize:
    depth: int
    dim: int
    heads: int
    bottleneck: int
    in_context_start: int
    """0-indexed block before which the class tokens are prepended"""
    align_depth: int
    proj_dropout: float = 0.0
    """dropout after attention/MLP projections in the middle half of the blocks (JiT release)"""


_B = dict(depth=12, dim=768, heads=12, bottleneck=128, in_context_start=4, align_depth=4)
_L = dict(depth=24, dim=1024, heads=16, bottleneck=128, in_context_start=8, align_depth=8)
_H = dict(depth=32, dim=1280, heads=16, bottleneck=256, in_context_start=10, align_depth=8, proj_dropout=0.2)
JIT_SIZES = {
    "JiT-B/16": JiTSize(**_B), "JiT-B/32": JiTSize(**_B),
    "JiT-L/16": JiTSize(**_L), "JiT-L/32": JiTSize(**_L),
    "JiT-H/16": JiTSize(**_H), "JiT-H/32": JiTSize(**_H),
    # test / demo sizes: 16-64 px images; align_depth lies after the in-context start so the
    # token removal is exercised
    "JiT-T/16": JiTSize(4, 128, 4, 32, 1, 2),
    "JiT-T/4": JiTSize(4, 128, 4, 32, 1, 2),
    "JiT-Tiny/4": JiTSize(2, 64, 2, 16, 1, 2),
}
IN_CONTEXT_LEN = 32


def _patch_size(name: str) -> int:
    return int(name.rsplit("/", 1)[1])


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in (at least) fp32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dt), (x.shape[-1],), self.weight.to(dt), self.eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rope_2d_angles(head_dim: int, grid: int, num_prefix: int = 0, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles [num_prefix + grid*grid, head_dim] for 2-D RoPE, float64.

    The first half of each head rotates with the token's row, the second half with its
    column (row-major tokens); within a half, channels (2i, 2i+1) form one rotating pair
    with frequency theta^(-2i / (head_dim / 2)) (the EVA-02 / JiT layout). Prefix tokens
    (the in-context class tokens) get angle 0: no rotation, no position.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # [head_dim/4]
    pos = torch.arange(grid, dtype=torch.float64)
    axis = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # [grid, half]
    rows = axis[:, None, :].expand(grid, grid, half)
    cols = axis[None, :, :].expand(grid, grid, half)
    ang = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return torch.cat([ang.new_zeros(num_prefix, head_dim), ang])


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, Dh] rotated by per-token angles (cos, sin [N, Dh]); math in (at least) fp32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * cos + _rotate_pairs(xf) * sin).to(x.dtype)


class BottleneckPatchEmbed(nn.Module):
    """p x p patch -> bottleneck channels (linear, no bias) -> width (1x1 conv with bias)."""

    def __init__(self, patch: int, in_channels: int, bottleneck: int, dim: int):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck, patch, stride=patch, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class JiTAttention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str, proj_dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)
        self.backend = backend

    def forward(self, x_BND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        q, k, v = self.qkv(x_BND).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        o = attention(q, k, v, self.backend)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, D)))


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with [a, b] = w12(x); hidden = int(hidden * 2/3) keeps the FLOPs of a 4x GELU MLP."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        hidden = int(hidden * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(a) * b))


class JiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, backend: str = "sdpa",
                 proj_dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = JiTAttention(dim, heads, backend, proj_dropout)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), proj_dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.modulate = modulate

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g_a.unsqueeze(1) * self.attn(self.modulate(self.norm1(x), sh_a, sc_a), cos, sin)
        return x + g_m.unsqueeze(1) * self.mlp(self.modulate(self.norm2(x), sh_m, sc_m))


class JiTFinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.modulate = modulate

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.modulate(self.norm_final(x), shift, scale))


class JiT(PatchGridModel):
    def __init__(self, input_size: int = 256, patch_size: int = 16, in_channels: int = 3,
                 dim: int = 768, depth: int = 12, heads: int = 12, bottleneck: int = 128,
                 mlp_ratio: float = 4.0, num_classes: int = 1000, class_dropout_prob: float = 0.1,
                 in_context_len: int = IN_CONTEXT_LEN, in_context_start: int = 4, align_depth: int = 4,
                 proj_dropout: float = 0.0, attn_backend: str = "sdpa"):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if not 1 <= align_depth <= depth:
            raise ValueError(f"align_depth must be in [1, {depth}], got {align_depth}")
        if in_context_len < 0 or (in_context_len and not 0 <= in_context_start < depth):
            raise ValueError(f"in-context tokens: need len >= 0 and start in [0, {depth}), "
                             f"got len={in_context_len} start={in_context_start}")
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.input_size, self.bottleneck = patch_size, input_size, bottleneck
        self.dim, self.depth, self.heads, self.num_classes = dim, depth, heads, num_classes
        self.align_depth, self.in_context_len, self.in_context_start = align_depth, in_context_len, in_context_start
        self.grid = input_size // patch_size
        self.num_tokens = self.grid ** 2
        backend = resolve_backend(attn_backend)
        self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob)
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, dim))
        # fixed tables are filled by initialize_weights, so build-on-meta + to_empty + init works
        head_dim = dim // heads
        self.register_buffer("pos_embed", torch.empty(1, self.num_tokens, dim), persistent=False)
        n_all = self.num_tokens + in_context_len
        for name in ("rope_cos", "rope_sin"):
            self.register_buffer(name, torch.empty(self.num_tokens, head_dim), persistent=False)
            self.register_buffer(name + "_ctx", torch.empty(n_all, head_dim), persistent=False)
        mid = range(depth // 4, depth // 4 * 3)  # the release applies dropout to the middle half only
        self.blocks = nn.ModuleList(
            JiTBlock(dim, heads, mlp_ratio, backend, proj_dropout if i in mid else 0.0) for i in range(depth))
        self.final_layer = JiTFinalLayer(dim, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def init_buffers(self):
        """(Re)compute the fixed sin-cos position embedding and the RoPE tables."""
        head_dim = self.dim // self.heads
        pos = torch.from_numpy(sincos_pos_embed_2d(self.dim, self.grid))[None]
        self.pos_embed.copy_(pos.to(self.pos_embed.dtype))
        ang = rope_2d_angles(head_dim, self.grid)
        ang_ctx = rope_2d_angles(head_dim, self.grid, self.in_context_len)
        self.rope_cos.copy_(ang.cos()), self.rope_sin.copy_(ang.sin())
        self.rope_cos_ctx.copy_(ang_ctx.cos()), self.rope_sin_ctx.copy_(ang_ctx.sin())

    @torch.no_grad()
    def initialize_weights(self):
        """DiT init (irepa.models.layers.init_adaln_zero_) plus JiT's parts: RMSNorm scales,
        bottleneck patch convs like linears, the in-context position embedding, fixed tables."""
        init_adaln_zero_(self)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        if self.in_context_len:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        self.init_buffers()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W] noisy image z, t [B] JiT time in [0, 1] (1 = data), y [B] labels.

        Returns (x_prediction [B, C, H, W], hidden [B, T, D] after block align_depth,
        patch tokens only). drop_mask [B] bool replaces labels by the null class.
        """
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"JiT expects inputs [B, {self.in_channels}, {self.input_size}, {self.input_size}], "
                             f"got {tuple(x.shape)}")
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        y_emb = self.y_embedder(y, drop_mask)
        c = self.t_embedder(t) + y_emb
        L, hidden = self.in_context_len, None
        rope = (self.rope_cos, self.rope_sin)
        for i, blk in enumerate(self.blocks):
            if L and i == self.in_context_start:
                tokens = y_emb.unsqueeze(1) + self.in_context_posemb  # [B, L, D], class-conditioned
                h = torch.cat([tokens.to(h.dtype), h], dim=1)
                rope = (self.rope_cos_ctx, self.rope_sin_ctx)
            h = blk(h, c, *rope)
            if i + 1 == self.align_depth:
                hidden = h[:, h.shape[1] - self.num_tokens:]
        h = h[:, h.shape[1] - self.num_tokens:]
        return self.unpatchify(self.final_layer(h, c)), hidden

    def forward_flops(self) -> float:
        """Forward matmul FLOPs per image (2 per multiply-add; norms, softmax, RoPE left out)."""
        D, T, L = self.dim, self.num_tokens, self.in_context_len
        mlp_hidden = self.blocks[0].mlp.w3.in_features
        macs = T * self.in_channels * self.patch_size ** 2 * self.bottleneck + T * self.bottleneck * D
        for i in range(self.depth):
            n = T + (L if L and i >= self.in_context_start else 0)
            macs += n * (4 * D * D + 3 * D * mlp_hidden) + 2 * n * n * D + 6 * D * D
        macs += T * D * self.out_channels * self.patch_size ** 2 + 2 * D * D
        macs += 256 * D + D * D  # timestep MLP
        return 2.0 * macs


def build_jit(name: str, **kw) -> JiT:
    """Build a JiT by registry name; keyword arguments go to `JiT` (None means the size's default)."""
    if name not in JIT_SIZES:
        raise ValueError(f"unknown JiT model {name!r}; known: {list(JIT_SIZES)}")
    s = JIT_SIZES[name]
    defaults = dict(depth=s.depth, dim=s.dim, heads=s.heads, bottleneck=s.bottleneck,
                    in_context_start=s.in_context_start, align_depth=s.align_depth,
                    proj_dropout=s.proj_dropout, patch_size=_patch_size(name))
    kw = {k: v for k, v in kw.items() if v is not None}
    return JiT(**{**defaults, **kw})
