"""The trainable SD-VAE (f8, 4 latent channels) for end-to-end training, through diffusers.

`build_sdvae()` makes diffusers' `AutoencoderKL` with the Stable Diffusion VAE layout
(block widths 128/256/512/512, two ResNet blocks per level, one mid attention, GroupNorm
32, eps 1e-6), the architecture of sd-vae-ft-mse and of REPA-E's `sdvae-f8d4.pt`.
`load_sdvae(path)` initializes it from a local file or folder, never the network:

- a diffusers folder (config.json + weights, e.g. sd-vae-ft-mse): `from_pretrained`;
- a single state-dict file (.pt / .pth / .ckpt / .safetensors) in the diffusers key
  layout, or in the LDM / taming layout that REPA-E releases and trains
  (encoder.down.0.block.0..., mid.attn_1.q as 1x1 convs, decoder.up.N ordered from the
  highest resolution): `ldm_to_diffusers` renames those keys. `diffusers_to_ldm` is the
  inverse, used to write the reference layout.

Posterior draws take an explicit generator (`sample_posterior`), so a resumed run
repeats its draws; the KL and the clamp of the log-variance to [-30, 20] are diffusers'
`DiagonalGaussianDistribution`, the same formulas as the LDM code.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

SDVAE_F8D4 = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, norm_num_groups=32, sample_size=256,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# tests and the digits demo: the same layout (four levels, f8, 4 channels), narrow
SDVAE_TINY = dict(SDVAE_F8D4, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                  sample_size=64)
# the digits demo at 64 px: narrower at the high-resolution levels, where a CPU spends its time
SDVAE_DIGITS = dict(SDVAE_TINY, block_out_channels=(8, 16, 32, 32))
VAE_CONFIGS = {"f8d4": SDVAE_F8D4, "tiny": SDVAE_TINY, "digits": SDVAE_DIGITS}
REPAE_VAE_FILE = "sdvae-f8d4.pt"


def build_sdvae(config: str | dict = "f8d4") -> nn.Module:
    """diffusers AutoencoderKL, random init, trainable (train mode)."""
    from diffusers import AutoencoderKL

    if isinstance(config, str):
        if config not in VAE_CONFIGS:
            raise ValueError(f"unknown VAE config {config!r}; known: {sorted(VAE_CONFIGS)}")
        config = VAE_CONFIGS[config]
    return AutoencoderKL(**config).train()


# ---------------------------------------------------------------------------------------
# LDM / taming key layout <-> diffusers

_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _levels(sd: dict, side: str, ldm: bool) -> int:
    pat = re.compile(rf"^{side}\.{'down' if side == 'encoder' else 'up'}\.(\d+)\." if ldm else
                     rf"^{side}\.{'down_blocks' if side == 'encoder' else 'up_blocks'}\.(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    if not found:
        raise ValueError(f"VAE state dict has no {side} levels (is it a VAE checkpoint?)")
    return max(found) + 1


def ldm_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM/taming AutoencoderKL keys (REPA-E's sdvae-f8d4.pt) -> diffusers AutoencoderKL keys.

    Keys of other parts (a training loss's `loss.*`, EMA copies) are dropped; attention
    projections go from 1x1 conv weights [C, C, 1, 1] to linear weights [C, C].
    """
    n_up = _levels(sd, "decoder", ldm=True)
    out = {}
    for k, v in sd.items():
        side, _, rest = k.partition(".")
        if side in ("quant_conv", "post_quant_conv"):
            out[k] = v
            continue
        if side not in ("encoder", "decoder"):
            continue
        new = None
        if m := re.match(r"^(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", rest):
            kind, lvl, j, layer, p = m.groups()
            blocks = "down_blocks" if kind == "down" else "up_blocks"
            lvl = int(lvl) if kind == "down" else n_up - 1 - int(lvl)
            new = f"{blocks}.{lvl}.resnets.{j}.{_RESNET.get(layer, layer)}.{p}"
        elif m := re.match(r"^down\.(\d+)\.downsample\.conv\.(weight|bias)$", rest):
            new = f"down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
        elif m := re.match(r"^up\.(\d+)\.upsample\.conv\.(weight|bias)$", rest):
            new = f"up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
        elif m := re.match(r"^mid\.block_([12])\.(\w+)\.(weight|bias)$", rest):
            new = f"mid_block.resnets.{int(m.group(1)) - 1}.{_RESNET.get(m.group(2), m.group(2))}.{m.group(3)}"
        elif m := re.match(r"^mid\.attn_1\.(\w+)\.(weight|bias)$", rest):
            new = f"mid_block.attentions.0.{_ATTN[m.group(1)]}.{m.group(2)}"
            if m.group(1) != "norm" and v.dim() == 4:
                v = v[:, :, 0, 0]
        elif m := re.match(r"^(conv_in|conv_out|norm_out)\.(weight|bias)$", rest):
            new = f"{'conv_norm_out' if m.group(1) == 'norm_out' else m.group(1)}.{m.group(2)}"
        if new is None:
            raise ValueError(f"VAE state dict: key {k!r} has no diffusers counterpart (not an SD-VAE layout?)")
        out[f"{side}.{new}"] = v
    return out


def diffusers_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `ldm_to_diffusers` (writes the REPA-E / LDM layout)."""
    n_up = _levels(sd, "decoder", ldm=False)
    inv_res = {v: k for k, v in _RESNET.items()}
    inv_attn = {v: k for k, v in _ATTN.items()}
    out = {}
    for k, v in sd.items():
        side, _, rest = k.partition(".")
        if side in ("quant_conv", "post_quant_conv"):
            out[k] = v
            continue
        if m := re.match(r"^(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$", rest):
            kind, lvl, j, layer, p = m.groups()
            lvl = int(lvl) if kind == "down" else n_up - 1 - int(lvl)
            new = f"{kind}.{lvl}.block.{j}.{inv_res.get(layer, layer)}.{p}"
        elif m := re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$", rest):
            new = f"down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$", rest):
            new = f"up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.match(r"^mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)$", rest):
            new = f"mid.block_{int(m.group(1)) + 1}.{inv_res.get(m.group(2), m.group(2))}.{m.group(3)}"
        elif m := re.match(r"^mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", rest):
            new = f"mid.attn_1.{inv_attn[m.group(1)]}.{m.group(2)}"
            if m.group(1) != "group_norm" and v.dim() == 2:
                v = v[:, :, None, None]
        elif m := re.match(r"^(conv_in|conv_out|conv_norm_out)\.(weight|bias)$", rest):
            new = f"{'norm_out' if m.group(1) == 'conv_norm_out' else m.group(1)}.{m.group(2)}"
        else:
            raise ValueError(f"VAE state dict: diffusers key {k!r} has no LDM counterpart")
        out[f"{side}.{new}"] = v
    return out


def is_ldm_layout(sd: dict) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in sd)


# ---------------------------------------------------------------------------------------
# loading

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors or torch file (weights_only) -> flat tensor dict; unwraps {"state_dict"|"vae": ...}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "vae"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: not a VAE state dict (expected a mapping of tensor names to tensors)")
    return sd


def resolve_vae(weights: str | os.PathLike | None = None, name: str = "sdvae-f8d4",
                filename: str = REPAE_VAE_FILE) -> Path:
    """Where the VAE weights are, by the encoders' rules (irepa.encoders.base.resolve_weights):
    `weights`, $IREPA_ENCODER_SDVAE_F8D4, $IREPA_ENCODER_DIR/sdvae-f8d4 or /sdvae-f8d4.pt,
    the torch hub cache; a FileNotFoundError naming every place tried otherwise."""
    from irepa.encoders.base import resolve_weights
    return resolve_weights(name, filename=filename, weights=weights, what="VAE")


def load_sdvae(weights: str | os.PathLike | None = None, config: str | dict = "f8d4") -> nn.Module:
    """Trainable AutoencoderKL initialized from a local diffusers folder or state-dict file."""
    path = resolve_vae(weights)
    if path.is_dir():
        if (path / "config.json").is_file():
            from diffusers import AutoencoderKL
            return AutoencoderKL.from_pretrained(str(path), local_files_only=True).train()
        inner = path / REPAE_VAE_FILE
        if not inner.is_file():
            raise FileNotFoundError(f"VAE folder {path} has neither config.json (diffusers) nor {REPAE_VAE_FILE}")
        path = inner
    sd = read_state_dict(path)
    if is_ldm_layout(sd):
        sd = ldm_to_diffusers(sd)
    vae = build_sdvae(config)
    own = vae.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise ValueError(f"{path}: VAE weights do not fit the {config if isinstance(config, str) else 'given'} "
                         f"SD-VAE layout: missing {missing[:4]}, unexpected {extra[:4]}")
    bad = [k for k in own if own[k].shape != sd[k].shape]
    if bad:
        raise ValueError(f"{path}: VAE tensor shapes differ for {bad[:4]} (e.g. {tuple(sd[bad[0]].shape)} in the "
                         f"file vs {tuple(own[bad[0]].shape)}): another VAE configuration?")
    vae.load_state_dict(sd)
    return vae


# ---------------------------------------------------------------------------------------
# the training forward

class Posterior:
    """Diagonal Gaussian q(z|x) with the LDM / diffusers clamp of the log-variance to [-30, 20]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over C, H, W: [B]."""
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).sum((1, 2, 3))


class VAEAutoencode(nn.Module):
    """The VAE's training forward as one module (what DDP wraps; state-dict keys vae.*):
    x in [-1, 1] -> (posterior mean, log-variance, z = mean + std * eps, recon = decode(z)),
    eps from `generator`, so a resumed run repeats its draws."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mean, logvar = self.vae.encode(x).latent_dist.parameters.chunk(2, dim=1)
        post = Posterior(mean, logvar)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = post.mean + post.std * eps
        return mean, logvar, z, self.vae.decode(z).sample
