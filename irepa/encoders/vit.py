"""Our own compact ViTs for encoders no installable library here provides.

- MoCo v3 (ViT-B/16, ViT-L/16): a plain pre-norm ViT with timm's parameter names
  (patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2}, norm), so the released `base_encoder` state dict loads; the ViT-L
  file's misspelt keys are renamed as the iREPA release does (MOCOV3_KEY_FIXES). As the
  release runs it (timm VisionTransformer.forward_features): final LayerNorm applied,
  CLS dropped, position table resampled 14 -> 16 -> token grid with timm's bicubic
  antialiased resample (base.release_pos_embed "timm@16").
  The same timm block (optionally with LayerScale ls1/ls2.gamma) is C-RADIO's block;
  the RADIO patch generator and checkpoint mapping live in radio.py.
- Perception Encoder (PE core / lang / spatial): ViT with a bias-free patch conv,
  optional CLS token, learned absolute position embedding (bilinearly resampled), 2-D
  axial RoPE on every attention layer (x half then y half of each head, interleaved
  rotation pairs, theta 1e4, CLS at position (0, 0)), ln_pre, optional LayerScale and
  ln_post; parameter names follow facebookresearch/perception_models so its .pt files
  load. Configurations as the iREPA release's models/pe_config.py: LayerScale on Lang
  L/G and Spatial G only (not on Spatial B/L). The CLIP attention pool / projection are
  not built: tokens come from the last layer, CLS removed; ln_post (core models only) is
  applied only for the "norm" names, as the release's forward_features(norm=...) does.

timm (which has both) needs torchvision, which cannot be installed next to the CPU
torch used here; these modules stay small and use SDPA attention.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Encoder, load_checked, load_state_dict, release_pos_embed, resample_pos_embed, resolve_weights


# --------------------------------------------------------------------------------------
# MoCo v3: timm-style ViT

class _TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


class _TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 0.1):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class _TimmBlock(nn.Module):
    """timm's pre-norm ViT block; `layer_scale` (an init value) adds timm's ls1 / ls2."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6,
                 layer_scale: float | None = None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), _TimmAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), _TimmMlp(dim, int(dim * mlp_ratio))
        self.ls1 = _LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.ls2 = _LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


# misspelt parameter names in the released MoCo v3 ViT-L checkpoint, renamed as the iREPA
# release's fix_mocov3_state_dict does (ldm/vision_encoder.py)
MOCOV3_KEY_FIXES = {"blocks.13.norm13.": "blocks.13.norm1.", "blocks.13.mlp.fc13.": "blocks.13.mlp.fc1.",
                    "blocks.14.norm14.": "blocks.14.norm2.", "blocks.14.mlp.fc14.": "blocks.14.mlp.fc2."}


def fix_mocov3_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for bad, good in MOCOV3_KEY_FIXES.items():
            if k.startswith(bad):
                k = good + k[len(bad):]
        out[k] = v
    return out


class MoCoV3ViT(Encoder):
    """MoCo v3 ViT: final-norm patch tokens, CLS dropped, pos-embed resampled timm's way."""

    def __init__(self, name: str, dim: int, depth: int, heads: int, patch: int = 16, pretrain_grid: int = 14):
        super().__init__()
        self.name, self.dim, self.patch = name, dim, patch
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + pretrain_grid ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(_TimmBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + release_pos_embed(self.pos_embed, grid, prefix=1, rule="timm@16")
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]


MOCOV3_ARCH = {"vit-b": dict(dim=768, depth=12, heads=12), "vit-l": dict(dim=1024, depth=24, heads=16)}


# --------------------------------------------------------------------------------------
# Perception Encoder

@dataclass(frozen=True)
class PEArch:
    patch: int
    width: int
    layers: int
    heads: int
    mlp: int
    image_size: int
    cls: bool
    ls: bool          # LayerScale on both residual branches
    ln_post: bool


_PE_CORE = {
    "b16": PEArch(16, 768, 12, 12, 3072, 224, True, False, True),
    "l14": PEArch(14, 1024, 24, 16, 4096, 336, True, False, True),
    "g14": PEArch(14, 1536, 50, 16, 8960, 448, False, False, True),
}
PE_ARCH = {
    "core-b16": _PE_CORE["b16"], "core-l14": _PE_CORE["l14"], "core-g14": _PE_CORE["g14"],
    "lang-l14": replace(_PE_CORE["l14"], layers=23, image_size=448, ls=True, ln_post=False),
    "lang-g14": replace(_PE_CORE["g14"], layers=47, image_size=448, ls=True, ln_post=False),
    # the release's pe_config: "No layerscale on the smaller spatial models"
    "spatial-b16": replace(_PE_CORE["b16"], image_size=512, ls=False, ln_post=False),
    "spatial-l14": replace(_PE_CORE["l14"], image_size=448, ls=False, ln_post=False),
    "spatial-g14": replace(_PE_CORE["g14"], image_size=448, ls=True, ln_post=False),
}


def pe_rope_angles(grid: tuple[int, int], head_dim: int, cls: bool, device=None) -> torch.Tensor:
    """[(cls) + gh*gw, head_dim] rotation angles: x half then y half, pairs interleaved."""
    axis_dim = head_dim // 2
    inv = 1.0 / (10000 ** (torch.arange(0, axis_dim, 2, device=device, dtype=torch.float32)[: axis_dim // 2] / axis_dim))
    off = 1 if cls else 0  # the CLS token sits at (0, 0), patches start at 1
    ys = torch.arange(grid[0], device=device, dtype=torch.float32) + off
    xs = torch.arange(grid[1], device=device, dtype=torch.float32) + off
    fy = (ys[:, None] * inv).repeat_interleave(2, -1)[:, None].expand(grid[0], grid[1], -1)
    fx = (xs[:, None] * inv).repeat_interleave(2, -1)[None, :].expand(grid[0], grid[1], -1)
    ang = torch.cat([fx, fy], dim=-1).reshape(grid[0] * grid[1], -1)
    if cls:
        ang = torch.cat([torch.zeros(1, ang.shape[-1], device=device), ang], dim=0)
    return ang


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + _rotate_pairs(x) * sin


class _PEAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


class _PEMlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)


class _PEBlock(nn.Module):
    def __init__(self, a: PEArch):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(a.width, eps=1e-5), _PEAttention(a.width, a.heads)
        self.ln_2, self.mlp = nn.LayerNorm(a.width, eps=1e-5), _PEMlp(a.width, a.mlp)
        self.ls_1 = _LayerScale(a.width) if a.ls else nn.Identity()
        self.ls_2 = _LayerScale(a.width) if a.ls else nn.Identity()

    def forward(self, x, angles):
        x = x + self.ls_1(self.attn(self.ln_1(x), angles))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class _PETransformer(nn.Module):
    def __init__(self, a: PEArch):
        super().__init__()
        self.resblocks = nn.ModuleList(_PEBlock(a) for _ in range(a.layers))


class PEViT(Encoder):
    """Perception Encoder vision tower: last-layer patch tokens [B, T, width]."""

    def __init__(self, name: str, arch: PEArch, mean, std, interpolation: str = "bilinear",
                 final_norm: bool = False):
        super().__init__()
        self.name, self.arch, self.dim, self.patch = name, arch, arch.width, arch.patch
        self.mean, self.std, self.interpolation = mean, std, interpolation
        self.final_norm = bool(final_norm) and arch.ln_post
        w = arch.width
        self.conv1 = nn.Conv2d(3, w, arch.patch, stride=arch.patch, bias=False)
        if arch.cls:
            self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.pretrain_grid = arch.image_size // arch.patch
        self.positional_embedding = nn.Parameter(torch.randn(int(arch.cls) + self.pretrain_grid ** 2, w) * w ** -0.5)
        self.ln_pre = nn.LayerNorm(w, eps=1e-5)
        self.transformer = _PETransformer(arch)
        self.ln_post = nn.LayerNorm(w, eps=1e-5) if arch.ln_post else nn.Identity()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        if self.arch.cls:
            x = torch.cat([self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + resample_pos_embed(self.positional_embedding[None], grid, prefix=int(self.arch.cls), mode="bilinear")
        angles = pe_rope_angles(grid, self.arch.width // self.arch.heads, self.arch.cls, device=x.device)
        x = self.ln_pre(x)
        for blk in self.transformer.resblocks:
            x = blk(x, angles)
        if self.final_norm:
            x = self.ln_post(x)
        return x[:, int(self.arch.cls):]


# --------------------------------------------------------------------------------------

def build_own_vit(spec, tiny: bool = False, weights=None) -> Encoder:
    """MoCo v3 / PE encoder; tiny with `weights` loads a small checkpoint in the released
    key layout (tests). Weights are located before the (possibly huge) model is built."""
    path = None
    if not tiny or weights is not None:
        path = resolve_weights(spec.name, filename=spec.source, weights=weights)
        if path.is_dir():
            path = path / spec.source
        if not path.exists():
            raise FileNotFoundError(f"encoder {spec.name!r}: expected checkpoint file {path}")
    torch.manual_seed(0)
    # real sizes (PE-G is 1.9B parameters) are built on the meta device and take the
    # checkpoint tensors as they are; tiny ones are initialised for real
    with torch.device("meta" if not tiny else "cpu"):
        model = _own_vit_module(spec, tiny)
    if path is not None:
        sd = load_state_dict(path, prefixes=("module.", "base_encoder."))
        if spec.family == "mocov3":
            sd = fix_mocov3_keys(sd)
        if any(k.startswith("visual.") for k in sd):  # full PE CLIP file: the text tower shares names
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        load_checked(model, sd, spec.name, path, assign=not tiny)
    return model.apply_spec(spec).freeze()


def _own_vit_module(spec, tiny: bool) -> Encoder:
    if spec.family == "mocov3":
        a = dict(dim=32, depth=2, heads=2) if tiny else MOCOV3_ARCH[spec.arch]
        model = MoCoV3ViT(spec.name, patch=spec.patch, pretrain_grid=8 if tiny else 14, **a)
    elif spec.family == "pe":
        arch = PE_ARCH[spec.arch]
        if tiny:
            arch = replace(arch, width=32, layers=2, heads=2, mlp=64, image_size=8 * arch.patch)
        model = PEViT(spec.name, arch, spec.mean, spec.std, spec.interpolation, final_norm=bool(spec.final_norm))
    else:
        raise ValueError(f"no own ViT for family {spec.family!r}")
    return model
