"""Sample generation for evaluation: N images in shards over ranks, resumable, ADM .npz out.

Plan: N labels drawn once from the seed (uniform random or class-balanced), split into
shards of `shard_size`; shard i goes to rank i % world_size, its noise comes from a
generator seeded by (seed, i), so the output does not depend on the number of ranks and
a killed job resumes by skipping the shards already on disk. Every shard is one atomic
.npz (uint8 images, labels). `merge_shards` streams them into the final ADM batch
(arr_0 images [N, H, W, 3] uint8, arr_1 labels) and a PNG grid. plan.json in the output
folder records the settings; resuming with different settings is refused.

Decoders turn model outputs into images in [0, 1]: the digits pixel codec, a diffusers
AutoencoderKL from a local folder with per-channel latent statistics or a scale factor
(0.18215 for the SD-VAE the reference releases use), or plain pixels in [-1, 1] (JiT).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .npz import NpzArrayWriter, save_grid, to_uint8_nhwc


@dataclass
class SamplePlan:
    num_samples: int = 50_000
    num_classes: int = 1000
    labels: str = "random"
    """random (uniform, ADM/REPA practice) or balanced (N / C per class, shuffled)"""
    seed: int = 0
    shard_size: int = 1000
    batch_size: int = 64
    """images per model call per rank (CFG doubles it inside the sampler)"""
    method: str = "sde"
    steps: int = 250
    cfg: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    """CFG interval in SiT time (t = 1 noise)"""
    latent_shape: tuple[int, ...] = (4, 32, 32)
    extra: dict = field(default_factory=dict)
    """anything else that changes the output (checkpoint, decoder); compared on resume"""

    def __post_init__(self):
        self.interval = tuple(float(v) for v in self.interval)
        self.latent_shape = tuple(int(v) for v in self.latent_shape)
        if self.num_samples <= 0 or self.shard_size <= 0 or self.batch_size <= 0:
            raise ValueError("num_samples, shard_size and batch_size must be positive")
        if self.labels not in ("random", "balanced"):
            raise ValueError(f"labels must be 'random' or 'balanced', got {self.labels!r}")
        from irepa.sampling import check_settings
        check_settings(self.method, self.steps, self.interval)  # before plan.json claims the output folder

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min((i + 1) * self.shard_size, self.num_samples)

    def all_labels(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        if self.labels == "random":
            return torch.randint(self.num_classes, (self.num_samples,), generator=g)
        return (torch.arange(self.num_samples) % self.num_classes)[torch.randperm(self.num_samples, generator=g)]

    def shard_seed(self, i: int) -> int:
        return int(np.random.SeedSequence([self.seed, i]).generate_state(1, np.uint64)[0] >> 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def check_plan(out_dir: Path, plan: SamplePlan) -> None:
    """Write plan.json, or compare with the one a previous run left (resume)."""
    path = out_dir / "plan.json"
    new = json.loads(plan.to_json())
    made = (out_dir / "samples.npz").is_file() or any((out_dir / "shards").glob("shard-*.npz"))
    if path.is_file() and made:  # without any samples yet (a run that failed early) the plan is replaced
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"{path}: this folder holds samples made with other settings ({diff}); "
                             f"use a new output folder or the same settings")
        return
    tmp = path.with_name(f"plan.json.tmp-{os.getpid()}")
    tmp.write_text(plan.to_json())
    os.replace(tmp, path)


def shard_path(out_dir: Path, i: int) -> Path:
    return out_dir / "shards" / f"shard-{i:06d}.npz"


def _save_npz_atomic(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


SampleBatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""(noise [b, *latent_shape], labels [b], sde generator) -> images [b, 3, H, W] in [0, 1]"""


def generate_shards(plan: SamplePlan, out_dir: str | Path, sample_batch: SampleBatchFn, rank: int = 0,
                    world_size: int = 1, device="cpu", log: Callable[[str], None] = print) -> list[int]:
    """Make this rank's missing shards; returns the shard indices written by this call."""
    out_dir = Path(out_dir)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    labels = plan.all_labels()
    written = []
    mine = range(rank, plan.num_shards, world_size)
    todo = [i for i in mine if not shard_path(out_dir, i).is_file()]
    if len(todo) < len(mine):
        log(f"[rank {rank}] resuming: {len(mine) - len(todo)} of {len(mine)} shards already done")
    for i in todo:
        lo, hi = plan.shard_range(i)
        seed = plan.shard_seed(i)
        g_noise = torch.Generator().manual_seed(seed)
        g_sde = torch.Generator(device=device).manual_seed(seed + 1)
        images = []
        for b0 in range(lo, hi, plan.batch_size):
            b1 = min(b0 + plan.batch_size, hi)
            noise = torch.randn((b1 - b0, *plan.latent_shape), generator=g_noise).to(device)
            images.append(to_uint8_nhwc(sample_batch(noise, labels[b0:b1].to(device), g_sde).cpu()))
        _save_npz_atomic(shard_path(out_dir, i), images=np.concatenate(images), labels=labels[lo:hi].numpy())
        written.append(i)
        log(f"[rank {rank}] shard {i} of {plan.num_shards} done ({hi - lo} images)")
    return written


def merge_shards(plan: SamplePlan, out_dir: str | Path, name: str = "samples.npz", grid: int = 64,
                 keep_shards: bool = False) -> Path:
    """All shards -> out_dir/name (ADM: arr_0 uint8 [N, H, W, 3], arr_1 labels) + out_dir/grid.png."""
    out_dir = Path(out_dir)
    paths = [shard_path(out_dir, i) for i in range(plan.num_shards)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}/shards: {len(missing)} shard(s) missing ({missing[:4]}...); "
                                f"run sample.py again to finish them")
    with np.load(paths[0]) as z:
        hwc = z["images"].shape[1:]
    writer = NpzArrayWriter(out_dir / name)

    def blocks(key):
        for i, p in enumerate(paths):
            with np.load(p) as z:
                arr = z[key]
            lo, hi = plan.shard_range(i)
            if arr.shape[0] != hi - lo:
                raise ValueError(f"{p}: {arr.shape[0]} rows, expected {hi - lo}")
            yield arr
    try:
        writer.write_array("arr_0", (plan.num_samples, *hwc), np.uint8, blocks("images"))
        writer.write_array("arr_1", (plan.num_samples,), np.int64, blocks("labels"))
    except BaseException:
        writer.abort()
        raise
    final = writer.close()
    if grid:
        with np.load(paths[0]) as z:
            first = z["images"][:grid]
        save_grid(first, out_dir / "grid.png")
    if not keep_shards:
        for p in paths:
            p.unlink()
        (out_dir / "shards").rmdir()
    return final


# ---------------------------------------------------------------- decoders
OFFICIAL_LATENT_STATS = "sdvae-ft-mse-f8d4-latents-stats.pt"
"""The iREPA (and REPA-E) releases' per-channel SD-VAE statistics: {"latents_scale", "latents_bias"}."""


def _channel_vector(v, what: str, path: Path) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v, dtype=torch.float32).flatten()
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(f"{path}: {what} must be finite numbers, one per latent channel; got {t.tolist()}")
    return t


class LatentScaling:
    """Model latents <-> VAE latents, per channel, in the form the statistics come in (so decoding
    matches their source bit for bit):

    - mean/std (our data manifests): vae = model * std + mean (prepare stored model = (vae - mean) / std);
    - scale/bias (the REPA/iREPA releases: latents_scale = 1 / std, latents_bias = mean, and the
      SD factor 0.18215): vae = model / scale + bias, as ldm/generate.py@99ad4ac decodes.
    """

    def __init__(self, mean, std=None, *, scale=None):
        if (std is None) == (scale is None):
            raise ValueError("LatentScaling takes std (vae = z * std + mean) or scale (vae = z / scale + mean)")
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = self.scale = None
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=torch.float32)
            if not (scale > 0).all():
                raise ValueError(f"latent scale must be positive per channel, got {scale.flatten().tolist()}")
            self.scale = scale.view(1, -1, 1, 1)
        else:
            std = torch.as_tensor(std, dtype=torch.float32)
            self.std = torch.where(std > 0, std, torch.ones_like(std)).view(1, -1, 1, 1)  # constant channel: shift only

    @property
    def channels(self) -> int:
        return (self.scale if self.scale is not None else self.std).shape[1]

    @classmethod
    def factor(cls, scale: float = 0.18215, channels: int = 4) -> "LatentScaling":
        """One factor for every channel, no shift (SD / the REPA release: vae = z / 0.18215)."""
        return cls([0.0] * channels, scale=[scale] * channels)

    @classmethod
    def from_file(cls, path: str | Path) -> "LatentScaling":
        """Per-channel statistics from a file:

        - .pt: the releases' latents-stats file (sdvae-ft-mse-f8d4-latents-stats.pt), a dict of
          tensors latents_scale / latents_bias, read with torch.load(weights_only=True) (no
          pickled code runs; anything but plain tensors is refused);
        - .npz: latents_scale/latents_bias or mean/std arrays;
        - .json: a data manifest.json, or latents_scale/latents_bias or mean/std lists (top level
          or under 'latent_stats').
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent statistics not found: {path}")
        if path.suffix == ".pt":
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickled code or a corrupt file: refuse, never unpickle
                raise ValueError(f"{path}: cannot load as plain tensors with weights_only=True ({e})") from e
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        else:
            try:
                d = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: latent statistics must be .pt, .npz or .json ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a dict of latent statistics, got {type(d).__name__}")
        if isinstance(d.get("latent"), dict) and "channel_mean" in d["latent"]:  # data/prepare.py manifest
            d = {"mean": d["latent"]["channel_mean"], "std": d["latent"]["channel_std"]}
        d = d.get("latent_stats") if isinstance(d.get("latent_stats"), dict) else d
        if "latents_scale" in d and "latents_bias" in d:
            scale = _channel_vector(d["latents_scale"], "latents_scale", path)
            bias = _channel_vector(d["latents_bias"], "latents_bias", path)
            if scale.numel() != bias.numel():
                raise ValueError(f"{path}: latents_scale has {scale.numel()} channels, latents_bias {bias.numel()}")
            return cls(bias, scale=scale)
        if "mean" in d and "std" in d:
            return cls(_channel_vector(d["mean"], "mean", path), _channel_vector(d["std"], "std", path))
        raise KeyError(f"{path}: no latent statistics (expected latents_scale and latents_bias, as in "
                       f"{OFFICIAL_LATENT_STATS}, or mean and std, at the top level or under 'latent_stats', "
                       f"or a data manifest's latent.channel_mean/channel_std); found keys {sorted(d)[:8]}")

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or self.channels not in (1, z.shape[1]):
            raise ValueError(f"latents {tuple(z.shape)} do not have the {self.channels} channels of the latent "
                             f"statistics")
        if self.scale is not None:
            return z.float() / self.scale.to(z.device) + self.mean.to(z.device)
        return z.float() * self.std.to(z.device) + self.mean.to(z.device)


class VAEDecoder:
    """diffusers AutoencoderKL from a local folder; latents (model scale) -> images in [0, 1]."""

    def __init__(self, vae_dir: str | Path, scaling: LatentScaling, device="cpu", dtype=torch.float32):
        vae_dir = Path(vae_dir)
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {vae_dir} has no config.json (expected a diffusers "
                                    f"AutoencoderKL saved with save_pretrained, e.g. sd-vae-ft-mse)")
        try:
            from diffusers.models import AutoencoderKL
        except ImportError as e:
            raise ImportError("decoding latents needs diffusers (pip install diffusers)") from e
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).to(device, dtype).eval()
        self.scaling, self.dtype = scaling, dtype

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(self.scaling.unscale(z).to(self.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)


def pixels_decoder(x: torch.Tensor) -> torch.Tensor:
    """Pixel-space models (JiT): [-1, 1] -> [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def pixel_codec_decoder(x: torch.Tensor) -> torch.Tensor:
    from irepa.data.digits import pixel_codec_decode
    return pixel_codec_decode(x.float())
