"""Codecs between images and what a model is trained on: VAE encode for data preparation,
decode for sample grids, online FID and launch/sample.py, all through the same classes.

  VAE            a diffusers AutoencoderKL from a local folder (never the hub)
  DigitsCodec    the embedded digits' "latent": the gray image area-downsampled by 8, in [-1, 1]
  LatentScaling  model latents <-> codec latents per channel: model = (codec - mean) / std
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
            raise ValueError(f"digits codec: resolution {resolution} is not a multiple of 8")
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
            raise FileNotFoundError(f"VAE folder {path}: no config.json (expected a diffusers AutoencoderKL "
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


class LatentScaling:
    """Model latents <-> codec latents: model = (codec - mean) / std per channel."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32)
        self.std = torch.where(std > 0, std, torch.ones_like(std)).view(1, -1, 1, 1)  # constant channel: shift only

    @classmethod
    def factor(cls, scale: float = 0.18215, channels: int = 4) -> "LatentScaling":
        """The single scale factor of the reference releases (0.18215 for SD-VAE)."""
        return cls([0.0] * channels, [1.0 / scale] * channels)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "LatentScaling":
        """The per-channel statistics a prepared dataset records (data/prepare.py), which its loader applies."""
        lat = manifest.get("latent") or {}
        if "channel_mean" not in lat:
            raise KeyError("the data manifest has no latent.channel_mean/channel_std (not a latent dataset)")
        return cls(lat["channel_mean"], lat["channel_std"])

    @classmethod
    def from_file(cls, path: str | Path) -> "LatentScaling":
        """A data manifest.json, a .json with mean/std lists (top level or under 'latent_stats'),
        or an .npz with mean/std."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent statistics not found: {path}")
        if path.suffix == ".npz":
            with np.load(path) as z:
                return cls(z["mean"], z["std"])
        d = json.loads(path.read_text())
        if isinstance(d.get("latent"), dict) and "channel_mean" in d["latent"]:
            return cls.from_manifest(d)
        d = d.get("latent_stats") or d
        if "mean" not in d or "std" not in d:
            raise KeyError(f"{path}: no latent statistics (expected 'mean' and 'std' lists, under "
                           f"'latent_stats' or at the top level, or latent.channel_mean/channel_std)")
        return cls(d["mean"], d["std"])

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
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
