"""Construct what a run needs from its Config: model, alignment head, data, encoders."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from irepa import models
from irepa.align import AlignmentHead, alignment_loss
from irepa.config import Config


def build_model(cfg: Config, fused: bool) -> nn.Module:
    m = cfg.model
    kw = dict(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
              class_dropout_prob=m.class_dropout_prob, attn_backend=m.attn_backend, fused_kernels=fused)
    if m.align_depth is not None:
        kw["align_depth"] = m.align_depth
    return models.build(m.name, **kw)


def build_head(cfg: Config, dim: int, encoder_dims: list[int], fused: bool) -> AlignmentHead | None:
    if not cfg.align.encoders or cfg.align.weight == 0:
        return None
    loss_fn = alignment_loss
    if fused:
        from irepa.kernels import fused_alignment_loss
        loss_fn = fused_alignment_loss
    return AlignmentHead(dim, encoder_dims, cfg.align.projector, cfg.align.gamma, cfg.align.hidden_dim, loss_fn)


class DiffusionWithAlignment(nn.Module):
    """The trained tree: the diffusion model plus its projectors (one FSDP/compile root)."""

    def __init__(self, model: nn.Module, head: AlignmentHead | None):
        super().__init__()
        self.model = model
        self.head = head


@dataclass
class DataBundle:
    loader: object
    encoder_dims: list[int]
    decode: object = None
    """latents -> images in [0, 1] for sample grids (None: no decoder on this machine)"""
    latent_scale: dict = field(default_factory=dict)
    online_encoders: list = field(default_factory=list)
    """frozen encoders run in the step on batch["images"] when features are not stored"""

    @torch.no_grad()
    def online_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not self.online_encoders:
            raise ValueError("the batch has no stored features and no online encoders are configured "
                             "(set data.online_encoders=True)")
        amp = torch.autocast(images.device.type, torch.bfloat16, enabled=images.device.type == "cuda")
        with amp:
            return [enc(images) for enc in self.online_encoders]


@torch.no_grad()
def encode_features(encoders, images: torch.Tensor, batch: int = 256) -> list[torch.Tensor]:
    out = []
    for enc in encoders:
        chunks = [enc(images[i:i + batch]).float() for i in range(0, images.shape[0], batch)]
        out.append(torch.cat(chunks).to(torch.bfloat16))
    return out


def build_encoders(names: list[str], device) -> list[nn.Module]:
    from irepa import encoders
    return [encoders.build(n).to(device).eval().requires_grad_(False) for n in names]


def build_data(cfg: Config, rank: int, world_size: int, device) -> DataBundle:
    local_batch = cfg.train.batch_size // world_size
    if cfg.train.batch_size % world_size:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world_size} ranks")
    if cfg.data.source == "digits":
        return _digits(cfg, local_batch, rank, world_size, device)
    from irepa import data as data_pkg
    if not hasattr(data_pkg, "build_loader"):
        raise ValueError(f"data.source={cfg.data.source!r}: prepared datasets need irepa.data.build_loader")
    return data_pkg.build_bundle(cfg, local_batch, rank, world_size, device)


def _digits(cfg: Config, local_batch: int, rank: int, world_size: int, device) -> DataBundle:
    from irepa.data.digits import load_digits_images, pixel_codec_decode, pixel_codec_encode
    from irepa.data.memory import TensorLoader

    if cfg.model.num_classes != 10:
        raise ValueError(f"digits has 10 classes, model.num_classes is {cfg.model.num_classes}")
    if cfg.model.in_channels != 1:
        raise ValueError(f"digits uses the 1-channel pixel codec, model.in_channels is {cfg.model.in_channels}")
    images, labels = load_digits_images(cfg.data.resolution)
    latents = pixel_codec_encode(images, cfg.model.input_size)
    encs = build_encoders(cfg.align.encoders, "cpu") if cfg.align.encoders else []
    feats = encode_features(encs, images)
    flips = encode_features(encs, images.flip(-1))
    loader = TensorLoader(latents, labels, feats, local_batch, seed=cfg.train.seed, rank=rank,
                          world_size=world_size, device=device, flip_feats=flips)
    return DataBundle(loader, [e.dim for e in encs], decode=pixel_codec_decode)
