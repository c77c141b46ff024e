"""The pieces a run is built from (irepa.train.assemble.build_run puts them together): the trained
tree (diffusion model + alignment head), its optimizer and learning rate, and the data with its
alignment targets (stored features or online encoders)."""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from irepa.align import AlignmentHead, alignment_loss
from irepa.config import Config
from irepa.errors import InputError
from irepa.train.world_checks import check_batch_divides


def build_head(cfg: Config, dim: int, encoder_dims: list[int], fused: bool) -> AlignmentHead | None:
    if not cfg.align.encoders or cfg.align.weight == 0:
        return None
    loss_fn = alignment_loss
    if fused:
        from irepa.kernels import fused_alignment_loss
        loss_fn = fused_alignment_loss
    return AlignmentHead(dim, encoder_dims, cfg.align.projector, cfg.align.gamma, cfg.align.hidden_dim, loss_fn,
                         kernel_size=cfg.align.proj_kernel_size)


class AlignedDiffusion(nn.Module):
    """The trained tree: the diffusion model plus its projectors (one FSDP / DDP / compile root).

    forward(batch, draws, feats) -> (denoising loss, alignment loss, logs) for one micro-batch:
    the recipe's loss on the model, then the alignment head on the hidden state it returns.
    align_only=True: the alignment loss of the recipe's `alignment_hidden` alone, the denoising
    loss 0 (REPA-E's VAE update; through this forward, where FSDP gathers the root's parameters).
    Parameter names: model.* and head.* (checkpoint keys)."""

    def __init__(self, model: nn.Module, head: AlignmentHead | None, recipe):
        super().__init__()
        self.model = model
        self.head = head
        self.recipe = recipe

    def forward(self, batch: dict, draws: dict, feats: list[torch.Tensor], align_only: bool = False):
        if align_only:
            hidden = self.recipe.alignment_hidden(self.model, batch, draws)
            zero = hidden.new_zeros(())
            return zero, (zero if self.head is None else self.head(hidden, feats)), {}
        out = self.recipe.loss(self.model, batch, draws)
        if self.head is None or out.hidden is None:
            return out.denoise, out.denoise.new_zeros(()), out.logs
        return out.denoise, self.head(out.hidden, feats), out.logs


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """module.to(device), skipped where every tensor is there already (fake tensors, perf/roofline's
    trace, cannot go through the move, which would change nothing)."""
    tensors = [*module.parameters(), *module.buffers()]
    return module if all(t.device == torch.device(device) for t in tensors) else module.to(device)


def adamw(cfg: Config, params: list[torch.Tensor], lr: float, device: torch.device,
          fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW with the run's optim settings; fused (one kernel for all parameters) on CUDA unless told."""
    o = cfg.optim
    return torch.optim.AdamW(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                             fused=(device.type == "cuda" or None) if fused is None else fused)


def base_lr(cfg: Config) -> float:
    return cfg.optim.lr * (cfg.train.batch_size / 256 if cfg.optim.scale_lr_with_batch else 1.0)


@dataclass
class DataBundle:
    """What a run trains on: the loader (None for a run that is given its batches: export, benchmarks),
    the alignment targets' widths, the dataset's manifest and the online encoders."""

    loader: object
    encoder_dims: list[int]
    manifest: dict
    online_encoders: list = field(default_factory=list)
    """frozen encoders run in the step on batch["images"] when features are not stored"""
    encoder_autocast: Callable[[], AbstractContextManager] | None = None
    """the online encoders' autocast; None: bf16 on CUDA, none elsewhere (perf/roofline: CUDA's policy)"""

    def features(self, batch: dict) -> list[torch.Tensor]:
        """Alignment targets of a batch (slice): its stored features, or the online encoders' output."""
        if not self.online_encoders:
            if "feats" not in batch:
                raise InputError("the batch has no stored features and no online encoders are configured "
                                 "(set data.online_encoders=True)")
            return batch["feats"]
        if "images" not in batch:
            raise InputError("data.online_encoders needs the batch's images, and the loader gives none")
        return self.online_features(batch["images"])

    @torch.no_grad()
    def online_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        amp = (self.encoder_autocast() if self.encoder_autocast is not None else
               torch.autocast(images.device.type, torch.bfloat16, enabled=images.device.type == "cuda"))
        with amp:
            return [enc(images) for enc in self.online_encoders]


def build_encoders(names: list[str], device) -> list[nn.Module]:
    from irepa import encoders
    return [encoders.build(n).to(device).eval().requires_grad_(False) for n in names]


def dataset_dir(cfg: Config, kind: str) -> Path:
    """The prepared dataset a run trains on: data.source, or where the built-in one is prepared."""
    if cfg.data.source != "digits":
        return Path(cfg.data.source)
    root = Path(cfg.data.cache_dir or Path(cfg.train.out_dir) / "datasets")
    # online encoders: the images are stored for the encoders run in the step, not their features
    tag = "online-images" if cfg.data.online_encoders else "-".join(cfg.align.encoders) or "noenc"
    return root / f"{cfg.data.source}-{kind}-{cfg.data.resolution}px-{tag}"


def build_data(cfg: Config, recipe, model: nn.Module, rank: int, world_size: int, device) -> DataBundle:
    """The loader for cfg.data.source, checked against the model before step 0.

    "digits" is prepared once (prepare -> manifest -> loader, like any dataset) into
    data.cache_dir as the recipe's data kind; a path is a folder made by launch/prepare.py.
    """
    from irepa import data as data_pkg

    check_batch_divides(cfg.train.batch_size, world_size)
    local_batch = cfg.train.batch_size // world_size
    path = str(dataset_dir(cfg, recipe.data_kind))
    if cfg.data.source == "digits":
        _prepare_builtin(cfg, path, recipe.data_kind, rank, world_size)
    manifest = data_pkg.read_manifest(path)
    if manifest["resolution"] != cfg.data.resolution:
        raise InputError(f"{path}: prepared at {manifest['resolution']} px but data.resolution is "
                         f"{cfg.data.resolution}; set --data.resolution {manifest['resolution']}")
    online = cfg.data.online_encoders
    if online and (manifest["resolution"] // 16) ** 2 != model.num_tokens:
        raise InputError(f"{path}: online encoders give {(manifest['resolution'] // 16) ** 2} tokens at "
                         f"{manifest['resolution']} px ((res/16)^2), the model has {model.num_tokens}")
    encs = build_encoders(cfg.align.encoders, device) if online else []
    stored = {e["name"]: e["dim"] for e in manifest["encoders"]}
    dims = [e.dim for e in encs] if online else [stored.get(n, -1) for n in cfg.align.encoders]
    data_pkg.check_manifest(manifest, latent_shape=recipe.data_shape(model),
                            num_tokens=model.num_tokens,
                            encoder_dims=None if online else dict(zip(cfg.align.encoders, dims)))
    check_num_classes(manifest, cfg.model.num_classes, path)
    loader = data_pkg.build_loader(path, local_batch, [] if online else cfg.align.encoders, seed=cfg.train.seed,
                                   rank=rank, world_size=world_size, device=device, backend=cfg.data.backend,
                                   images=online, verify=cfg.data.verify, hflip=cfg.data.hflip)
    return DataBundle(loader, dims, manifest, online_encoders=encs)


def scan_full(data: DataBundle, is_main: bool, log: Callable[[str], None]) -> None:
    """data.verify full: every byte against a full digest where prepare recorded one (the loader did
    that), and every record of the dataset scanned for non-finite values and bad labels (rank 0)."""
    from irepa import data as data_pkg
    loader = data.loader
    done = data_pkg.scan_dataset(loader.root, loader.manifest, fields=loader.fields) if is_main else None
    log(f"data.verify full: {done}")


def check_num_classes(manifest: dict, num_classes: int, path: str) -> None:
    """The model has exactly the dataset's classes: fewer would put labels out of range, more would
    train (and sample in every grid) classes that have no images."""
    have = manifest.get("num_classes")
    if have and have != num_classes:
        raise InputError(f"{path}: the data has {have} classes (manifest.json num_classes), model.num_classes is "
                         f"{num_classes}; set --model.num_classes {have}")


def _prepare_builtin(cfg: Config, out: str, kind: str, rank: int, world_size: int) -> None:
    """Prepare the built-in dataset once into `out` (a no-op when it is complete).

    Under torch.distributed every rank calls prepare (it shards the work and synchronizes
    itself); a single process prepares alone.
    """
    import torch.distributed as dist

    from irepa import data as data_pkg

    if (Path(out) / "manifest.json").is_file():
        return
    online = cfg.data.online_encoders
    formats = ("ffcv", "memmap") if data_pkg.ffcv_available() else ("memmap",)
    collective = world_size > 1 and dist.is_initialized()
    data_pkg.prepare(cfg.data.source, out, resolution=cfg.data.resolution,
                     encoders=[] if online else cfg.align.encoders, store_images=online,
                     kind=kind, formats=formats, device="cpu", progress=rank == 0,
                     rank=None if collective else 0, world_size=None if collective else 1)
