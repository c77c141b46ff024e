"""Codecs between images and what a model is trained on: VAE encode for data preparation,
decode for sample grids, online FID and launch/sample.py, all through the same classes.

  VAE            a diffusers AutoencoderKL from a local folder (never the hub)
  DigitsCodec    the embedded digits' "latent": the gray image area-downsampled by 8, in [-1, 1]
  LatentScaling  model latents <-> codec latents per channel: our manifests' mean/std, or the
                 releases' latents_scale/latents_bias (and the SD factor 0.18215)
  decode_pixels  pixel-space models (JiT): [-1, 1] -> [0, 1]
A codec has `name` (what a data manifest records as latent.vae), `encode(x01) -> (mean, std)`
of the posterior (x01 [B, 3, R, R] in [0, 1]) and `decode(z) -> x01` of codec latents.
`LatentDecoder(codec, scaling)` decodes model latents; `latent_decoder(name, scaling)` opens
one by name, or gives None when the VAE folder is not on this machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from irepa.errors import InputError, InputKeyError, InputNotFound

DIGITS_CODEC = "digits-codec"


def pixel_codec_encode(images: torch.Tensor, latent_size: int) -> torch.Tensor:
    """[N, 3, R, R] in [0, 1] -> [N, 1, L, L] in [-1, 1] (area downsample of the gray channel)."""
    return F.interpolate(images[:, :1], size=(latent_size, latent_size), mode="area") * 2 - 1


def pixel_codec_decode(latents: torch.Tensor) -> torch.Tensor:
    """[N, 1, L, L] in [-1, 1] -> [N, 3, L, L] in [0, 1]."""
    return ((latents + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixel-space model outputs in [-1, 1] -> images in [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


class DigitsCodec:
    """The digits pixel codec as a "VAE" whose posterior has zero std (factor 8, like SD-VAE's f8)."""

    name = DIGITS_CODEC

    def __init__(self, resolution: int | None = None):
        if resolution is not None and resolution % 8:
            raise InputError(f"digits codec: resolution {resolution} is not a multiple of 8")
        self.latent_size = None if resolution is None else resolution // 8

    @torch.no_grad()
    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent_size is None:
            raise ValueError("DigitsCodec.encode needs the image resolution (DigitsCodec(resolution))")
        mean = pixel_codec_encode(x01.float(), self.latent_size)
        return mean, torch.zeros_like(mean)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return pixel_codec_decode(z.float())


class VAE:
    """diffusers AutoencoderKL loaded from a local save_pretrained folder, frozen, in eval mode."""

    def __init__(self, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise InputNotFound(f"VAE folder {path}: no config.json (expected a diffusers AutoencoderKL "
                                f"saved with save_pretrained, e.g. sd-vae-ft-mse)")
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ImportError("a VAE codec needs diffusers (pip install diffusers)") from e
        self.vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device, dtype)
        self.vae.eval().requires_grad_(False)
        self.name, self.dtype = str(path.resolve()), dtype

    @torch.no_grad()
    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode((x01 * 2 - 1).to(self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(z.to(self.dtype)).sample.float() + 1) / 2).clamp(0, 1)


def open_codec(name: str, device="cpu", resolution: int | None = None):
    """"digits-codec" or a VAE folder -> the codec."""
    return DigitsCodec(resolution) if name == DIGITS_CODEC else VAE(name, device)


OFFICIAL_LATENT_STATS = "sdvae-ft-mse-f8d4-latents-stats.pt"
"""The iREPA (and REPA-E) releases' per-channel SD-VAE statistics: {"latents_scale", "latents_bias"}."""


def _channel_vector(v, what: str, path: Path) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v, dtype=torch.float32).flatten()
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise InputError(f"{path}: {what} must be finite numbers, one per latent channel; got {t.tolist()}")
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
    def from_manifest(cls, manifest: dict) -> "LatentScaling":
        """The per-channel statistics a prepared dataset records (data/prepare.py), which its loader applies."""
        lat = manifest.get("latent") or {}
        if "channel_mean" not in lat:
            raise InputKeyError("the data manifest has no latent.channel_mean/channel_std (not a latent dataset)")
        return cls(lat["channel_mean"], lat["channel_std"])

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
            raise InputNotFound(f"latent statistics not found: {path}")
        if path.suffix == ".pt":
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # pickled code or a corrupt file: refuse, never unpickle
                raise InputError(f"{path}: cannot load as plain tensors with weights_only=True ({e})") from e
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        else:
            try:
                d = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{path}: latent statistics must be .pt, .npz or .json ({e})") from e
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a dict of latent statistics, got {type(d).__name__}")
        if isinstance(d.get("latent"), dict) and "channel_mean" in d["latent"]:  # data/prepare.py manifest
            d = {"mean": d["latent"]["channel_mean"], "std": d["latent"]["channel_std"]}
        d = d.get("latent_stats") if isinstance(d.get("latent_stats"), dict) else d
        if "latents_scale" in d and "latents_bias" in d:
            scale = _channel_vector(d["latents_scale"], "latents_scale", path)
            bias = _channel_vector(d["latents_bias"], "latents_bias", path)
            if scale.numel() != bias.numel():
                raise InputError(f"{path}: latents_scale has {scale.numel()} channels, latents_bias {bias.numel()}")
            return cls(bias, scale=scale)
        if "mean" in d and "std" in d:
            return cls(_channel_vector(d["mean"], "mean", path), _channel_vector(d["std"], "std", path))
        raise InputKeyError(f"{path}: no latent statistics (expected latents_scale and latents_bias, as in "
                            f"{OFFICIAL_LATENT_STATS}, or mean and std, at the top level or under 'latent_stats', "
                            f"or a data manifest's latent.channel_mean/channel_std); found keys {sorted(d)[:8]}")

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or self.channels not in (1, z.shape[1]):
            raise ValueError(f"latents {tuple(z.shape)} do not have the {self.channels} channels of the latent "
                             f"statistics")
        if self.scale is not None:
            return z.float() / self.scale.to(z.device) + self.mean.to(z.device)
        return z.float() * self.std.to(z.device) + self.mean.to(z.device)


class LatentDecoder:
    """Model latents -> images in [0, 1]: unscale, then the codec's decode."""

    def __init__(self, codec, scaling: LatentScaling | None):
        self.codec, self.scaling = codec, scaling

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.scaling.unscale(z) if self.scaling is not None else z.float())


def latent_decoder(name: str | None, scaling: LatentScaling | None, device="cpu") -> LatentDecoder | None:
    """A decoder for codec `name` ("digits-codec" or a VAE folder), or None when that folder is not here."""
    if name is None or (name != DIGITS_CODEC and not (Path(name) / "config.json").is_file()):
        return None
    return LatentDecoder(open_codec(name, device), scaling)
