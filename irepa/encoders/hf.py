"""Encoders whose architecture comes from Hugging Face transformers.

Each family names the transformers model and config classes, how many prefix tokens
(CLS, registers) to drop, the forward keywords that resample absolute position
embeddings to the input grid, and a tiny config of the same architecture for CPU tests.
Real weights load with `from_pretrained(local_folder, local_files_only=True)`; the folder
comes from `base.resolve_weights`, so nothing is fetched from the network.

What the registry entry changes on top of the transformers model, to give the tokens
of the iREPA release (which runs the original repositories' models for DINO, DINOv2,
MAE, I-JEPA and CLIP, and transformers for WebSSL, SigLIP and SAM2):
- position embeddings (`spec.pos`): "timm" / "timm@16" replace transformers'
  run-time bicubic resize by timm's antialiased resample (base.release_pos_embed), the
  one the release applies to the checkpoint's table at load; "hf" keeps transformers'.
- `layer_norm_eps` overrides the Hub config (the original DINO / MAE / I-JEPA models use
  1e-6 where some converted configs say 1e-12).
- `final_norm` False takes the tokens before the model's last LayerNorm (MAE: the
  release's forward_features stops after the blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .base import Encoder, load_checked, release_pos_embed, resolve_weights

@dataclass(frozen=True)
class HFFamily:
    model_cls: str
    config_cls: str
    prefix: Callable[[Any], int]                   # config -> tokens to drop before the patches
    call_kw: dict = field(default_factory=dict)    # forward keywords
    tiny: dict = field(default_factory=dict)       # tiny config of the same architecture
    build_kw: dict = field(default_factory=dict)   # model constructor keywords
    spatial_output: bool = False                   # last_hidden_state is [B, h, w, C]


_VIT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_ONE = lambda c: 1  # noqa: E731
_NONE = lambda c: 0  # noqa: E731

FAMILIES: dict[str, HFFamily] = {
    "vit": HFFamily("ViTModel", "ViTConfig", _ONE, {"interpolate_pos_encoding": True},
                    dict(_VIT_TINY, image_size=128, patch_size=16), {"add_pooling_layer": False}),
    "dinov2": HFFamily("Dinov2Model", "Dinov2Config", _ONE, {},
                       dict(_VIT_TINY, image_size=112, patch_size=14)),
    "dinov3": HFFamily("DINOv3ViTModel", "DINOv3ViTConfig", lambda c: 1 + c.num_register_tokens, {},
                       dict(_VIT_TINY, patch_size=16, num_register_tokens=4)),
    "clip": HFFamily("CLIPVisionModel", "CLIPVisionConfig", _ONE, {"interpolate_pos_encoding": True},
                     dict(_VIT_TINY, image_size=112, patch_size=14)),
    "siglip": HFFamily("SiglipVisionModel", "SiglipVisionConfig", _NONE, {"interpolate_pos_encoding": True},
                       dict(_VIT_TINY, image_size=128, patch_size=16, vision_use_head=False)),
    "ijepa": HFFamily("IJepaModel", "IJepaConfig", _NONE, {"interpolate_pos_encoding": True},
                      dict(_VIT_TINY, image_size=112, patch_size=14), {"add_pooling_layer": False}),
    "mae": HFFamily("ViTMAEModel", "ViTMAEConfig", _ONE, {"interpolate_pos_encoding": True},
                    dict(_VIT_TINY, image_size=128, patch_size=16, mask_ratio=0.0)),
    # Hiera backbone only (the FPN neck is not used): last stage, stride 32
    "sam2": HFFamily("Sam2HieraDetModel", "Sam2HieraDetConfig", _NONE, {},
                     dict(hidden_size=8, num_attention_heads=1, blocks_per_stage=[1, 1, 2, 1],
                          embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
                          global_attention_blocks=[3], window_size_per_stage=[8, 4, 14, 7]),
                     spatial_output=True),
}


# family -> (the model's last LayerNorm, whether last_hidden_state already has it): the
# registry's final_norm decides whether the tokens get it (MAE: no, as the release; CLIP:
# no, post_layernorm only feeds the pooled CLS)
_FINAL_NORM = {"mae": ("layernorm", True), "clip": ("post_layernorm", False)}


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding embeddings / norms (transformers 4 wraps CLIP and SigLIP towers
    in .vision_model, transformers 5 does not)."""
    return model.vision_model if hasattr(model, "vision_model") else model


def _embeddings(model: torch.nn.Module):
    return _inner(model).embeddings


def _stored_pos(emb) -> torch.Tensor:
    """The checkpoint's position table [1, prefix + g*g, D] (nn.Parameter or nn.Embedding)."""
    if hasattr(emb, "position_embeddings"):
        return emb.position_embeddings
    return emb.position_embedding.weight.unsqueeze(0)


class _ReleasePosEmbed:
    """Stands in for a transformers embeddings module's interpolate_pos_encoding: the
    stored table resampled to the input's grid by a base.release_pos_embed rule."""

    def __init__(self, emb, patch: int, prefix: int, rule: str):
        self.emb, self.patch, self.prefix, self.rule = emb, patch, prefix, rule

    def __call__(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        grid = (height // self.patch, width // self.patch)
        return release_pos_embed(_stored_pos(self.emb), grid, self.prefix, self.rule)


class HFEncoder(Encoder):
    """A transformers vision backbone returning [B, T, E] patch tokens."""

    def __init__(self, spec, model: torch.nn.Module, dim: int):
        super().__init__()
        self.family, self.model, self.dim = spec.family, model, dim
        self.apply_spec(spec)
        fam = FAMILIES[spec.family]
        self._drop = fam.prefix(model.config)
        self._call_kw = dict(fam.call_kw)
        self._spatial = fam.spatial_output
        if spec.pos in ("timm", "timm@16"):
            emb = _embeddings(model)
            # an instance attribute shadows the class method transformers calls
            emb.interpolate_pos_encoding = _ReleasePosEmbed(emb, model.config.patch_size, self._pos_prefix(), spec.pos)
        self.final_norm = None
        if spec.family in _FINAL_NORM:
            attr, in_output = _FINAL_NORM[spec.family]
            owner = _inner(model)
            self.final_norm = getattr(owner, attr) if spec.final_norm else None
            if in_output:
                setattr(owner, attr, torch.nn.Identity())
        self.freeze()

    def _pos_prefix(self) -> int:
        """Rows of the stored table before the patch grid (CLS)."""
        return 0 if self.family in ("siglip", "ijepa") else 1

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        kw = dict(self._call_kw)
        if self.family == "mae":
            # ViTMAE shuffles tokens by argsort(noise); increasing noise keeps grid order, mask_ratio 0 keeps all
            T = (x.shape[-2] // self.model.config.patch_size) * (x.shape[-1] // self.model.config.patch_size)
            kw["noise"] = torch.arange(T, device=x.device, dtype=torch.float32).expand(x.shape[0], T)
        out = self.model(pixel_values=x, **kw).last_hidden_state
        if self._spatial:
            return out.flatten(1, 2)  # [B, h, w, C] -> row-major [B, h*w, C]
        if self.final_norm is not None:
            out = self.final_norm(out)
        return out[:, self._drop:]


def _classes(family: str):
    import transformers
    fam = FAMILIES[family]
    return getattr(transformers, fam.model_cls), getattr(transformers, fam.config_cls)


def tiny_model(family: str, patch: int | None = None, layer_norm_eps: float | None = None) -> torch.nn.Module:
    """Random-init small model of the family; ViTs get the spec's patch and an 8x8
    pretraining grid, so running at 256 px exercises position-embedding resampling."""
    model_cls, config_cls = _classes(family)
    fam = FAMILIES[family]
    cfg = dict(fam.tiny)
    if patch is not None and "patch_size" in cfg:
        cfg["patch_size"] = patch
        if "image_size" in cfg:
            cfg["image_size"] = 8 * patch
    if layer_norm_eps is not None:
        cfg["layer_norm_eps"] = layer_norm_eps
    torch.manual_seed(0)
    return model_cls(config_cls(**cfg), **fam.build_kw)


def output_dim(family: str, config) -> int:
    if family == "sam2":
        return config.embed_dim_per_stage[-1]
    return config.hidden_size


def build_hf(spec, tiny: bool = False, weights=None) -> HFEncoder:
    """Build the transformers encoder described by a registry spec (random tiny or local weights)."""
    family = spec.family
    if tiny:
        model = tiny_model(family, spec.patch, spec.layer_norm_eps)
    else:
        path = resolve_weights(spec.name, hf_repo=spec.source, weights=weights)
        model_cls, _ = _classes(family)
        kw = dict(FAMILIES[family].build_kw)
        if family == "mae":
            kw["mask_ratio"] = 0.0
        if family == "siglip":
            kw["vision_use_head"] = False
        if spec.layer_norm_eps is not None:
            kw["layer_norm_eps"] = spec.layer_norm_eps
        try:
            if family == "sam2":
                return _finish(spec, _load_sam2_backbone(spec, path), tiny)
            model = model_cls.from_pretrained(str(path), local_files_only=True, **kw)
        except OSError as e:
            raise FileNotFoundError(f"encoder {spec.name!r}: {path} is not a complete Hugging Face folder "
                                    f"for {spec.source} (config.json + *.safetensors): {e}") from e
    return _finish(spec, model, tiny)


def _finish(spec, model, tiny: bool) -> HFEncoder:
    dim = output_dim(spec.family, model.config)
    if not tiny and dim != spec.dim:
        raise ValueError(f"encoder {spec.name!r}: the weights give width {dim}, the registry says {spec.dim}")
    return HFEncoder(spec, model, dim)


def _load_sam2_backbone(spec, folder) -> torch.nn.Module:
    """Hiera backbone out of a full SAM2 Hugging Face folder (keys *.backbone.*)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import Sam2HieraDetConfig, Sam2HieraDetModel

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    vision = cfg.get("vision_config", cfg)  # a full Sam2Model config or a vision-only one
    cfg = vision.get("backbone_config", vision)
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    model = Sam2HieraDetModel(Sam2HieraDetConfig(**cfg))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"encoder {spec.name!r}: no *.safetensors in {folder}")
    sd = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if "backbone." in k:
                sd[k.split("backbone.", 1)[1]] = v
    load_checked(model, sd, spec.name, folder)
    return model
