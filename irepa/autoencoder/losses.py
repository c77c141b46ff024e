"""The VAE's losses in REPA-E: L1 + LPIPS + KL + PatchGAN hinge
(End2End-Diffusion/REPA-E loss/losses.py@3ad8046).

Reductions and weights are those of REPA-E's `ReconstructionLoss_Single_Stage` with
`configs/l1_lpips_kl_gan.yaml`:
  generator = mean|x - x_rec| / exp(logvar = 0)
            + 1.0 * mean_b LPIPS(x, x_rec)
            + 1e-6 * sum_{b,c,h,w} KL / B
            + 0.1 * factor * (-mean D(x_rec))          factor = 1 from step 0
  discriminator = factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec.detach())))
No adaptive GAN weight, no LeCam term. Everything here runs in fp32 with autocast off,
as the reference's loss module does. D is called with its parameters frozen for the
generator term (gradients reach x_rec only); real and fake go through D in separate
calls (separate BatchNorm batches), as in the reference.

LPIPS input: REPA-E passes its [-1, 1] images to an LPIPS wrapper that documents [0, 1]
inputs and maps them by 2x - 1 itself, so its LPIPS sees [-3, 1]. `lpips_input=
"reference"` (the default) reproduces that; "standard" feeds LPIPS the [-1, 1] images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    kl_weight: float = 1e-6
    gan_weight: float = 0.1
    """discriminator_weight: the generator's adversarial term"""
    gan_factor: float = 1.0
    gan_start: int = 0
    """discriminator_start: the GAN terms count from this step on (REPA-E: 0)"""
    logvar: float = 0.0
    lpips_input: str = "reference"
    """reference (LPIPS sees 2x - 1 of the [-1, 1] images, as REPA-E) | standard"""

    def __post_init__(self):
        if self.lpips_input not in ("reference", "standard"):
            raise ValueError(f"lpips_input must be 'reference' or 'standard', got {self.lpips_input!r}")
        for k in ("l1_weight", "lpips_weight", "kl_weight", "gan_weight", "gan_factor"):
            if getattr(self, k) < 0:
                raise ValueError(f"VAE loss: {k} must be >= 0, got {getattr(self, k)}")

    def factor(self, step: int) -> float:
        return self.gan_factor if step >= self.gan_start else 0.0


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


def generator_loss(x: torch.Tensor, recon: torch.Tensor, posterior, disc: nn.Module, lpips: nn.Module,
                   step: int, cfg: VAELossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x, recon [B, 3, H, W] in [-1, 1]; posterior has .kl() -> [B]. -> (total, detached parts)."""
    with _no_autocast(x.device.type):
        x, recon = x.float().contiguous(), recon.float().contiguous()
        rec = F.l1_loss(recon, x) * cfg.l1_weight / torch.exp(torch.tensor(cfg.logvar))
        px, pr = (x * 2 - 1, recon * 2 - 1) if cfg.lpips_input == "reference" else (x, recon)
        perceptual = lpips(px, pr).mean()
        kl = posterior.kl().float()
        kl = kl.sum() / kl.shape[0]
        factor = cfg.factor(step)
        gan = x.new_zeros(())
        if factor > 0 and cfg.gan_weight > 0:
            frozen = [p for p in disc.parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                gan = -disc(recon).mean()
            finally:
                for p in frozen:
                    p.requires_grad_(True)
        weighted_gan = cfg.gan_weight * factor * gan
        total = rec + cfg.lpips_weight * perceptual + cfg.kl_weight * kl + weighted_gan
    parts = {"l1": rec.detach(), "lpips": (cfg.lpips_weight * perceptual).detach(), "kl": (cfg.kl_weight * kl).detach(),
             "gan": weighted_gan.detach()}
    return total, parts


def discriminator_loss(x: torch.Tensor, recon: torch.Tensor, disc: nn.Module, step: int,
                       cfg: VAELossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinge loss of D on real x and detached recon (two calls). -> (loss, detached logits means)."""
    with _no_autocast(x.device.type):
        real = disc(x.detach().float())
        fake = disc(recon.detach().float())
        loss = cfg.factor(step) * hinge_d_loss(real, fake)
    return loss, {"logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
