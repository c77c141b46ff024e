"""Construct what a run needs from its Config: model, alignment head, data, encoders."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    return AlignmentHead(dim, encoder_dims, cfg.align.projector, cfg.align.gamma, cfg.align.hidden_dim, loss_fn,
                         kernel_size=cfg.align.proj_kernel_size)


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


def build_encoders(names: list[str], device) -> list[nn.Module]:
    from irepa import encoders
    return [encoders.build(n).to(device).eval().requires_grad_(False) for n in names]


def build_data(cfg: Config, model: nn.Module, rank: int, world_size: int, device) -> DataBundle:
    """The loader for cfg.data.source, checked against the model before step 0.

    "digits" is prepared once (prepare -> manifest -> loader, like any dataset) into
    data.cache_dir; a path is a folder made by launch/prepare.py.
    """
    from irepa import data as data_pkg

    local_batch = cfg.train.batch_size // world_size
    if cfg.train.batch_size % world_size:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world_size} ranks")
    path = _prepare_builtin(cfg, rank, world_size) if cfg.data.source == "digits" else cfg.data.source
    manifest = data_pkg.read_manifest(path)
    if manifest["resolution"] != cfg.data.resolution:
        raise ValueError(f"{path}: prepared at {manifest['resolution']} px but data.resolution is "
                         f"{cfg.data.resolution}; set --data.resolution {manifest['resolution']}")
    online = cfg.data.online_encoders
    if online and (manifest["resolution"] // 16) ** 2 != model.num_tokens:
        raise ValueError(f"{path}: online encoders give {(manifest['resolution'] // 16) ** 2} tokens at "
                         f"{manifest['resolution']} px ((res/16)^2), the model has {model.num_tokens}")
    encs = build_encoders(cfg.align.encoders, device) if online else []
    stored = {e["name"]: e["dim"] for e in manifest["encoders"]}
    dims = [e.dim for e in encs] if online else [stored.get(n, -1) for n in cfg.align.encoders]
    data_pkg.check_manifest(manifest, latent_shape=(model.in_channels, model.input_size, model.input_size),
                            num_tokens=model.num_tokens,
                            encoder_dims=None if online else dict(zip(cfg.align.encoders, dims)))
    if manifest.get("num_classes", 0) > cfg.model.num_classes:
        raise ValueError(f"{path}: {manifest['num_classes']} classes, model.num_classes is {cfg.model.num_classes}")
    loader = data_pkg.build_loader(path, local_batch, [] if online else cfg.align.encoders, seed=cfg.train.seed,
                                   rank=rank, world_size=world_size, device=device, backend=cfg.data.backend,
                                   images=online)
    return DataBundle(loader, dims, decode=_decoder(manifest, loader, device), online_encoders=encs)


def _prepare_builtin(cfg: Config, rank: int, world_size: int) -> str:
    """Prepare the built-in dataset once into data.cache_dir (a no-op when it is complete).

    Under torch.distributed every rank calls prepare (it shards the work and synchronizes
    itself); a single process prepares alone.
    """
    import torch.distributed as dist

    from irepa import data as data_pkg

    root = Path(cfg.data.cache_dir or Path(cfg.train.out_dir) / "datasets")
    kind = "pixels" if cfg.train.objective == "jit" else "latent"
    online = cfg.data.online_encoders  # store the images for the encoders run in the step, not their features
    tag = "online-images" if online else "-".join(cfg.align.encoders) or "noenc"
    out = root / f"{cfg.data.source}-{kind}-{cfg.data.resolution}px-{tag}"
    if not (out / "manifest.json").is_file():
        formats = ("ffcv", "memmap") if data_pkg.ffcv_available() else ("memmap",)
        collective = world_size > 1 and dist.is_initialized()
        data_pkg.prepare(cfg.data.source, str(out), resolution=cfg.data.resolution,
                         encoders=[] if online else cfg.align.encoders, store_images=online,
                         kind=kind, formats=formats, device="cpu", progress=rank == 0,
                         rank=None if collective else 0, world_size=None if collective else 1)
    return str(out)


def _decoder(manifest: dict, loader, device):
    """Model-space latents -> images in [0, 1], or None when no decoder is available here."""
    if manifest["kind"] == "pixels":
        return lambda x: ((x + 1) / 2).clamp(0, 1)
    shift, scale = loader.shift, loader.scale
    vae = manifest.get("latent", {}).get("vae")
    if vae == "digits-codec":
        from irepa.data.digits import pixel_codec_decode
        return lambda x: pixel_codec_decode(x * scale.to(x.device) + shift.to(x.device))
    if vae and Path(vae).is_dir():
        from diffusers import AutoencoderKL
        ae = AutoencoderKL.from_pretrained(vae, local_files_only=True).to(device).eval().requires_grad_(False)

        @torch.no_grad()
        def decode(x):
            return ((ae.decode(x * scale.to(x.device) + shift.to(x.device)).sample + 1) / 2).clamp(0, 1)
        return decode
    return None
