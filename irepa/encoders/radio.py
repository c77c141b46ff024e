"""C-RADIO (NVIDIA's commercially licensed RADIO students) as a frozen patch-token encoder.

The Hugging Face repos (nvidia/C-RADIOv2-{B,L,H,g}, nvidia/C-RADIOv3-{B,L,H,g},
nvidia/C-RADIOv4-H) need trust_remote_code, so the model is built here from vit.py's
timm block and the checkpoint is loaded by key mapping. What the implementation follows
(sources: NVlabs/RADIO, files under radio/; NVIDIA TAO's backbone_v2/radio.py; the
RADIO ports in vLLM (model_executor/models/radio.py) and transformers (models/radio)):

- Patch embedder: 16 px patches flattened channel-major (c, y, x) through a Linear
  3*16*16 -> D without bias (vit_patch_generator.py: Im2Patches, ViTPatchLinear). The
  DINOv2-wrapper students pass patch_bias=True (enable_cpe_support.py), so a bias is
  loaded when the checkpoint has one. Computed here as the equivalent stride-16 conv.
- Position embedding (CPE): one learned grid of (cpe_max_size/16)^2 entries, 2048 px ->
  128 x 128 (common.py max_resolution 2048; TAO cpe_max_size 2048). Eval mode, for a
  g_h x g_w token grid different from the stored one: bilinear resize of the whole grid to
  m x m, m = max(g_h, g_w), no antialias, then keep the top-left g_h x g_w window
  (vit_patch_generator.py _get_pos_embeddings, eval branch). It is added to the patches
  only; the prefix tokens carry no position. (Training instead grid-samples a random
  crop; not needed for a frozen target.)
- Prefix tokens: ClsToken holds num_cls (one per teacher with cls_token_per_teacher)
  + registers (register_multiple - num_cls % register_multiple) rows, prepended before
  the blocks (cls_token.py); the model returns features y[:, num_skip:] (radio_model.py).
  Their number is read from the checkpoint (cls_token.token rows; 8 for C-RADIOv2-B/L
  per TAO's 4 teachers / register_multiple 8, 10 = 3 cls + 7 registers for v4-H per
  transformers' RadioConfig). All of them are dropped here.
- Input conditioner: (x - mean) / std on x in [0, 1], OpenAI CLIP mean / std
  (input_conditioner.py get_default_conditioner); the checkpoint's
  input_conditioner.norm_mean / norm_std buffers are used when present.
- Blocks: timm VisionTransformer blocks: pre-norm LayerNorm (eps 1e-6), qkv Linear with
  bias, proj, MLP fc1 -> GELU -> fc2 at ratio 4 (TAO radio_model_cfg builds timm's
  VisionTransformer). C-RADIOv3-B/L are timm *_patch16_reg4_dinov2 configs with
  init_values 1e-5, i.e. LayerScale ls1 / ls2, whose parameter RADIO renames
  "gamma" -> "grandma" so the Hub loader leaves it alone (dinov2_arch.py LayerScale,
  extra_timm_models.py _patch_layer_scale; TAO maps it back). Present iff in the file.
- No final norm: create_model_from_args sets model.norm = Identity unless
  args.model_norm (radio_model.py; TAO: "CRADIO models replace norm and head with
  Identity"; transformers' RadioModel has none). A LayerNorm is applied only if the
  checkpoint carries model.norm.*; likewise the optional feature_normalizer
  ((x - mean) @ tx^T on the patch features, feature_normalizer.py) only if its buffers
  are there.
- Sizes: B 768/12/12, L 1024/24/16, H 1280/32/16, g 1536/40/24 (width/depth/heads;
  TAO radio_model_cfg, extra_timm_models.py vit_giant_patch16_224). Parameter counts
  of a third-party C-RADIOv3 port (B 98,254,854; L 319,934,470; H 651,642,886;
  g 1,159,618,566) decompose exactly into these blocks + a bias-free embedder + a
  128 x 128 position grid + 8 prefix tokens (+4 rows of timm's unused reg_token for B/L,
  as that port reads them) + the 6 conditioner values, with LayerScale for B/L only and
  no final norm.
- Keys (hf_model.py wraps everything as radio_model.*; transformers' conversion
  mapping "radio"): radio_model.model.patch_generator.{embedder.weight, pos_embed,
  cls_token.token}, radio_model.model.blocks.N.{norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2}.{weight, bias}, ...ls1/ls2.grandma (or gamma),
  radio_model.input_conditioner.norm_mean/std; ignored: radio_model.summary_idxs,
  radio_model.adaptors.*, radio_model.model.reg_token, video / intermediate
  normalizer buffers. Training checkpoints (*.pth.tar) use base_model.* for the backbone.

Checked by reading NVlabs/RADIO @c0f3701 (radio/vit_patch_generator.py: eval CPE is
bilinear, align_corners=False, to the long side then window_select; radio_model.py:
features y[:, num_skip:] then feature_normalizer). The iREPA release loads C-RADIOv3 from
torch hub ("cradio-vit-b" etc., aliases here) and feeds it the image bilinearly resized
(no antialias) to the run's resolution, i.e. unresized at 16 px per token, without
normalization (the model's input conditioner does it). Not confirmed: prefix-token
counts of the tiny test models for v2-H/g and v3 (real checkpoints say their own);
heads per size.

Resolution: RADIO runs at any multiple of 16 px (v3's preferred 512). The iREPA paper
gives C-RADIO no resolution, so it sees 16 px per output token like the other
patch-16 encoders: 256 px at the 256 px model resolution (16 x 16 = 256 tokens), 512 px
at 512 (1024 tokens), with the 128 x 128 grid resampled as above.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Encoder, load_checked, resolve_weights
from .vit import _TimmBlock

CPE_ALIGN_CORNERS = False  # see the module docstring (assumption)


@dataclass(frozen=True)
class RadioArch:
    dim: int
    depth: int
    heads: int
    layer_scale: bool     # ls1 / ls2 in every block (C-RADIOv3-B/L)
    prefix_tokens: int    # cls + register rows of the tiny model (real ones come from the file)


_B, _L, _H, _G = (768, 12, 12), (1024, 24, 16), (1280, 32, 16), (1536, 40, 24)
RADIO_ARCH = {
    "v2-b": RadioArch(*_B, False, 8), "v2-l": RadioArch(*_L, False, 8),
    "v2-h": RadioArch(*_H, False, 8), "v2-g": RadioArch(*_G, False, 8),
    "v3-b": RadioArch(*_B, True, 8), "v3-l": RadioArch(*_L, True, 8),
    "v3-h": RadioArch(*_H, False, 8), "v3-g": RadioArch(*_G, False, 8),
    "v4-h": RadioArch(*_H, False, 10),
}
_TINY = dict(dim=32, depth=2, heads=2, pos_grid=8)  # 8x8 stored grid: 256 px resamples it


def cpe_pos_embed(pos_1ND: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """RADIO's eval-mode CPE: the stored square grid resized (bilinear) to max(grid)
    squared, top-left grid[0] x grid[1] window kept -> [1, gh*gw, D] row-major."""
    n, D = pos_1ND.shape[1], pos_1ND.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"C-RADIO position embedding has {n} entries, not a square grid")
    if (side, side) == tuple(grid):
        return pos_1ND
    m = max(grid)
    p = pos_1ND.reshape(1, side, side, D).permute(0, 3, 1, 2).float()
    p = F.interpolate(p, size=(m, m), mode="bilinear", align_corners=CPE_ALIGN_CORNERS)
    p = p[..., : grid[0], : grid[1]]
    return p.flatten(2).transpose(1, 2).to(pos_1ND.dtype)


class _ClsToken(nn.Module):
    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.randn(rows, dim) * dim ** -0.5)


class _PatchGenerator(nn.Module):
    """RADIO's ViTPatchGenerator parameters under their own names."""

    def __init__(self, patch: int, dim: int, pos_grid: int, prefix_tokens: int, bias: bool):
        super().__init__()
        self.embedder = nn.Linear(3 * patch * patch, dim, bias=bias)
        self.pos_embed = nn.Parameter(torch.randn(1, pos_grid ** 2, dim) * dim ** -0.5)
        self.cls_token = _ClsToken(prefix_tokens, dim)


class _FeatureNormalizer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("tx", torch.eye(dim))

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) @ self.tx.to(x.dtype).T


class RadioViT(Encoder):
    """C-RADIO backbone: CPE patch generator + timm blocks; patch tokens, prefix dropped."""

    def __init__(self, name: str, dim: int, depth: int, heads: int, *, patch: int = 16,
                 pos_grid: int = 128, prefix_tokens: int = 8, layer_scale: bool = False,
                 patch_bias: bool = False, final_norm: bool = False, feature_normalizer: bool = False,
                 mean=None, std=None, interpolation: str = "bicubic"):
        super().__init__()
        self.name, self.dim, self.patch = name, dim, patch
        self.mean, self.std, self.interpolation = mean, std, interpolation
        self.prefix_tokens = prefix_tokens
        self.patch_generator = _PatchGenerator(patch, dim, pos_grid, prefix_tokens, patch_bias)
        self.blocks = nn.ModuleList(_TimmBlock(dim, heads, layer_scale=1e-5 if layer_scale else None)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6) if final_norm else nn.Identity()
        if feature_normalizer:
            self.feature_normalizer = _FeatureNormalizer(dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        pg, p = self.patch_generator, self.patch
        # Linear on (c, y, x)-flattened patches == conv with the weight viewed as [D, 3, p, p]
        x = F.conv2d(x, pg.embedder.weight.view(-1, 3, p, p), pg.embedder.bias, stride=p)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = x + cpe_pos_embed(pg.pos_embed, grid).to(x.dtype)
        prefix = pg.cls_token.token.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([prefix, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, self.prefix_tokens:]
        if hasattr(self, "feature_normalizer"):
            x = self.feature_normalizer(x)
        return x


# ---------------------------------------------------------------------------------------
# checkpoints

_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pth.tar", "*.pth")
# backbone keys RADIO checkpoints carry that do not enter the image forward
_UNUSED = ("reg_token", "patch_generator.video_embedder.", "head.", "mask_token")


def _read_file(f: Path) -> dict:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(f))
    # training checkpoints pickle their argparse args next to the weights
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(str(f), map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "state_dict", "model"):  # hubconf prefers the EMA weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def read_radio_checkpoint(path: Path) -> tuple[dict, dict]:
    """(backbone state dict under our names, extras) from a RADIO file or HF folder.

    extras: "mean" / "std" of the input conditioner when the file has them.
    """
    path = Path(path)
    if path.is_dir():
        files = []
        for pattern in _FILE_PATTERNS:
            files = sorted(path.glob(pattern))
            if files:
                break
        if not files:
            raise FileNotFoundError(f"C-RADIO folder {path} has no weights ({', '.join(_FILE_PATTERNS)}); "
                                    f"found {sorted(p.name for p in path.iterdir())[:10]}")
    else:
        files = [path]
    raw = {}
    for f in files:
        raw.update(_read_file(f))
    sd, extras = {}, {}
    for k, v in raw.items():
        while k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("radio_model."):          # Hugging Face export
            k = k[len("radio_model."):]
        elif k.startswith("base_model."):         # training checkpoint
            k = "model." + k[len("base_model."):]
        if k.startswith("model."):
            k = k[len("model."):]
            if k.endswith(".grandma"):            # RADIO's LayerScale name on the Hub
                k = k[: -len("grandma")] + "gamma"
            sd[k] = v
        elif k.startswith("feature_normalizer."):
            sd[k] = v
        elif k in ("input_conditioner.norm_mean", "input_conditioner.norm_std"):
            extras["mean" if k.endswith("mean") else "std"] = tuple(float(t) for t in v.float().flatten())
    return sd, extras


def radio_layout(sd: dict, name: str, path) -> dict:
    """RadioViT options read off a checkpoint (prefix rows, grid, LayerScale, norms)."""
    need = ("patch_generator.embedder.weight", "patch_generator.pos_embed", "patch_generator.cls_token.token")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"encoder {name!r}: {path} is not a C-RADIO ViT checkpoint: no "
                         f"{', '.join('radio_model.model.' + k for k in missing)}")
    n = sd["patch_generator.pos_embed"].shape[1]
    return dict(prefix_tokens=sd["patch_generator.cls_token.token"].shape[0], pos_grid=math.isqrt(n),
                layer_scale=any(k.endswith(".ls1.gamma") for k in sd),
                patch_bias="patch_generator.embedder.bias" in sd, final_norm="norm.weight" in sd,
                feature_normalizer="feature_normalizer.tx" in sd)


def _refuse_unused(model: nn.Module, sd: dict, name: str, path) -> None:
    """Backbone tensors we would silently skip mean a different architecture: refuse."""
    own = model.state_dict()
    extra = [k for k in sd if k not in own and not k.startswith(_UNUSED)]
    if extra:
        raise ValueError(f"encoder {name!r}: {path} has backbone tensors this C-RADIO ViT does not use, "
                         f"e.g. {extra[:5]}; a different RADIO architecture?")


def build_radio(spec, tiny: bool = False, weights=None) -> RadioViT:
    """C-RADIO encoder; tiny with `weights` loads a small checkpoint in the released layout
    (tests). Real sizes are built on the meta device and take the checkpoint's tensors."""
    arch = RADIO_ARCH[spec.arch]
    sd, extras, path = None, {}, None
    layout = dict(prefix_tokens=arch.prefix_tokens, layer_scale=arch.layer_scale)
    if not tiny or weights is not None:
        path = resolve_weights(spec.name, hf_repo=spec.source, weights=weights)
        sd, extras = read_radio_checkpoint(path)
        layout = radio_layout(sd, spec.name, path)
    size = dict(_TINY) if tiny else dict(dim=arch.dim, depth=arch.depth, heads=arch.heads)
    size.update(layout)
    torch.manual_seed(0)
    with torch.device("meta" if not tiny else "cpu"):
        model = RadioViT(spec.name, patch=spec.patch, mean=extras.get("mean", spec.mean),
                         std=extras.get("std", spec.std), interpolation=spec.interpolation, **size)
    if sd is not None:
        _refuse_unused(model, sd, spec.name, path)
        load_checked(model, sd, spec.name, path, assign=not tiny)
    return model.freeze()
