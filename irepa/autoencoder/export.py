"""Export an end-to-end-trained VAE with its latent statistics (REPA-E's save_vae_weights).

One folder that both this project and REPA-E's tools read:
  config.json + diffusion_pytorch_model.safetensors   diffusers AutoencoderKL (launch/prepare.py --vae DIR)
  latent_stats.json      latents_scale / latents_bias (the EMA SiT's BatchNorm: scale = running_var^-1/2,
                         bias = running_mean) and the fixed normalization the latent-only SiT trains
                         with: mean = running_mean, std = sqrt(running_var + eps) (the BatchNorm in eval)
  sdvae-f8d4.pt          the VAE state dict in REPA-E's (LDM) layout
  sdvae-f8d4-latents-stats.pt    {"latents_scale", "latents_bias"} [1, C, 1, 1], REPA-E's layout
  sdvae-f8d4-discriminator-ckpt.pt   the discriminator, when given
The VAE is the raw trained one (REPA-E keeps no VAE EMA), the statistics those of the SiT's
EMA, as REPA-E exports them. Written into a temporary folder and renamed; an existing
folder is refused unless overwrite.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from irepa.errors import InputError

from .sdvae import diffusers_to_ldm

STATS_FILE = "latent_stats.json"


def latent_stats_record(running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> dict:
    mean, var = running_mean.double().flatten(), running_var.double().flatten()
    return {"latents_scale": var.rsqrt().tolist(), "latents_bias": mean.tolist(), "bn_eps": eps,
            "mean": mean.tolist(), "std": (var + eps).sqrt().tolist(),
            "note": "model input = (z - mean) / std (the latent BatchNorm in eval); "
                    "a sample x decodes as x / latents_scale + latents_bias"}


def read_latent_stats(folder: str | os.PathLike) -> dict | None:
    """latent_stats.json of an exported VAE folder, or None when the folder has none."""
    p = Path(folder) / STATS_FILE
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    for k in ("mean", "std", "latents_scale", "latents_bias"):
        if k not in d:
            raise ValueError(f"{p}: no {k!r} (written by irepa.autoencoder.export.export_vae?)")
    return d


def check_export_target(out: str | os.PathLike, overwrite: bool) -> Path:
    """`out` as a Path if an export may be written there: a new path, or (with overwrite) an earlier
    export, which is replaced; anything else that is there is refused, never deleted."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise InputError(f"OUT {out} exists; choose another folder, or pass --overwrite true to replace an "
                         f"earlier export")
    if not out.is_dir() or not (out / STATS_FILE).is_file() or not (out / "config.json").is_file():
        raise InputError(f"OUT {out} is not an exported VAE (no {STATS_FILE} and config.json); --overwrite "
                         f"replaces only an earlier export: choose another folder")
    return out


def export_vae(vae: nn.Module, running_mean: torch.Tensor, running_var: torch.Tensor, out: str | os.PathLike,
               *, eps: float = 1e-4, discriminator: nn.Module | None = None, name: str = "sdvae-f8d4",
               overwrite: bool = False) -> Path:
    out = check_export_target(out, overwrite)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    torch.save(diffusers_to_ldm(sd), tmp / f"{name}.pt")
    C = running_mean.numel()
    rec = latent_stats_record(running_mean.cpu(), running_var.cpu(), eps)
    (tmp / STATS_FILE).write_text(json.dumps(rec, indent=2))
    torch.save({"latents_scale": running_var.detach().cpu().float().rsqrt().view(1, C, 1, 1),
                "latents_bias": running_mean.detach().cpu().float().view(1, C, 1, 1)},
               tmp / f"{name}-latents-stats.pt")
    if discriminator is not None:
        torch.save({k: v.detach().cpu() for k, v in discriminator.state_dict().items()},
                   tmp / f"{name}-discriminator-ckpt.pt")
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
    return out


def load_bn_stats(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents_scale [C], latents_bias [C]) to initialise the latent BatchNorm, from REPA-E's
    <vae>-latents-stats.pt, an exported latent_stats.json (or its folder), or a data manifest.json
    (scale = 1 / channel_std, bias = channel_mean)."""
    p = Path(path)
    if p.is_dir():
        p = p / STATS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"latent statistics not found: {p}")
    if p.suffix in (".pt", ".pth"):
        d = torch.load(str(p), map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or "latents_scale" not in d or "latents_bias" not in d:
            raise ValueError(f"{p}: expected REPA-E latent stats {{'latents_scale', 'latents_bias'}}")
        return d["latents_scale"].float().flatten(), d["latents_bias"].float().flatten()
    d = json.loads(p.read_text())
    if "latents_scale" in d:
        return torch.tensor(d["latents_scale"]).float(), torch.tensor(d["latents_bias"]).float()
    lat = d.get("latent") or {}
    if "channel_std" in lat:
        return 1.0 / torch.tensor(lat["channel_std"]).float(), torch.tensor(lat["channel_mean"]).float()
    raise ValueError(f"{p}: no latent statistics (latents_scale/latents_bias, or latent.channel_mean/channel_std)")
