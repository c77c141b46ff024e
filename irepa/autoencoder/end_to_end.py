"""REPA-E's end-to-end step: VAE, discriminator and SiT updated in one step, three optimizers.

The order of REPA-E's `train_repae.py` (SPEC_RECIPES.md B1), for one batch:
  1. the VAE encodes x in [-1, 1]: posterior, z = mean + std * eps, recon = decode(z);
     t and noise are drawn once for both alignment passes;
  2. VAE update: the SiT (with its projectors) is frozen and in eval mode, so its latent
     BatchNorm normalizes z with running statistics; the alignment loss of block
     `align_depth` (the SiT stops there) reaches the VAE through those frozen blocks:
     loss = L1 + LPIPS + KL + GAN + vae_align_weight (1.5) * align; clip; VAE step;
  3. discriminator update: hinge on (x, recon.detach()); clip; D step;
  4. SiT update on z.detach() in train mode (BatchNorm on batch statistics, running
     stats updated): denoising + sit_align_weight (0.5) * align, same t and noise;
     clip; SiT step; EMA (parameters and the BatchNorm buffers).
The diffusion loss never reaches the VAE (z is detached), the VAE pass changes no SiT
parameter (frozen, and its optimizer does not step) and the SiT pass none of the VAE.

Wrapped modules: each part is called through its DDP/FSDP wrapper when it is trained by
that call (gradients must be reduced) and as the plain module when it is frozen (the SiT
in the VAE pass, D in the generator term), so DDP never waits for gradients that a
frozen pass does not produce. Under FSDP2 the plain module is the sharded one itself.
Random draws (posterior eps, t, noise) come from the step's generator, in that order.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from irepa import transport

from .losses import VAELossConfig, discriminator_loss, generator_loss


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
    """The VAE's training forward as one module (what DDP / FSDP wrap):
    x [-1, 1] -> (posterior mean, log-variance, z = mean + std * eps, recon = decode(z))."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        moments = self.vae.encode(x).latent_dist.parameters
        mean, logvar = moments.chunk(2, dim=1)
        post = Posterior(mean, logvar)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = post.mean + post.std * eps
        return mean, logvar, z, self.vae.decode(z).sample


class RepaESiT(nn.Module):
    """The trained SiT tree (SiT with `latent_norm`, plus the alignment head) with the REPA-E
    forward: latent BatchNorm -> noising with the given (t, noise) -> SiT -> losses."""

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        if getattr(model, "latent_norm", None) is None:
            raise ValueError("REPA-E needs a SiT built with latent_norm=True (BatchNorm of the latent at the input)")
        self.model, self.head = model, head

    def forward(self, z, y, feats, t, noise, drop_mask=None, align_only: bool = False):
        """-> (denoising loss or None when align_only, alignment loss)."""
        x = self.model.latent_norm(z)
        pred, hidden = self.model(transport.interpolate(x, noise, t), t, y, drop_mask, hidden_only=align_only)
        align = self.head(hidden, feats)
        if align_only:
            return None, align
        return transport.denoising_loss(pred, transport.velocity_target(x, noise)), align


@dataclass
class EndToEndConfig:
    vae_align_weight: float = 1.5
    """alignment weight in the VAE update (REPA-E --vae-align-proj-coeff)"""
    sit_align_weight: float = 0.5
    """alignment weight in the SiT update (REPA-E --proj-coeff)"""
    grad_clip: float | None = 1.0
    """max grad norm, each part separately"""
    loss: VAELossConfig = field(default_factory=VAELossConfig)


def _clip(params, max_norm):
    from irepa.train.parallelize import clip_grad_norm_
    return clip_grad_norm_(params, max_norm if max_norm else math.inf)


@dataclass
class EndToEndStep:
    """Holds the parts; `step(x, y, feats, drop_mask, generator, step)` runs one REPA-E step.

    `*_train` are the modules to call for a trained pass (DDP/FSDP wrappers or the
    modules), `sit`, `vae`, `disc` the plain ones. `ema.update(sit.model)` after the SiT step.
    """
    vae_train: nn.Module
    vae: VAEAutoencode
    disc_train: nn.Module
    disc: nn.Module
    lpips: nn.Module
    sit_train: nn.Module
    sit: RepaESiT
    opt_vae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    opt_sit: torch.optim.Optimizer
    ema: object
    cfg: EndToEndConfig = field(default_factory=EndToEndConfig)
    amp_dtype: torch.dtype | None = None
    time_sampling: str = "uniform"
    observer: object = None
    """test hook: called as observer(name, **tensors) at each pass"""

    def _amp(self, x):
        return torch.autocast(x.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()

    def step(self, x: torch.Tensor, y: torch.Tensor, feats, drop_mask, generator, step: int) -> dict:
        cfg = self.cfg
        self.vae.train()
        self.disc.train()
        with self._amp(x):
            mean, logvar, z, recon = self.vae_train(x, generator)
        t = transport.sample_time(x.shape[0], self.time_sampling, generator=generator, device=x.device)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)

        # 1. VAE: frozen SiT in eval mode (BatchNorm running stats), alignment through blocks 1..depth
        sit_params = [p for p in self.sit.parameters() if p.requires_grad]
        self.sit.eval()
        for p in sit_params:
            p.requires_grad_(False)
        try:
            with self._amp(x):
                _, vae_align = self.sit(z, y, feats, t, noise, None, align_only=True)
            if self.observer:
                self.observer("vae_pass", t=t, noise=noise, training=self.sit.training,
                              frozen=not any(p.requires_grad for p in self.sit.parameters()))
            rec_loss, parts = generator_loss(x, recon, Posterior(mean, logvar), self.disc, self.lpips, step, cfg.loss)
            vae_loss = rec_loss + cfg.vae_align_weight * vae_align
            vae_loss.backward()
        finally:
            for p in sit_params:
                p.requires_grad_(True)
            self.sit.train()
        vae_params = [p for p in self.vae.parameters() if p.requires_grad]
        gn_vae = _clip(vae_params, cfg.grad_clip)
        self.opt_vae.step()
        self.opt_vae.zero_grad(set_to_none=True)

        # 2. discriminator on (x, recon.detach())
        d_loss, d_parts = discriminator_loss(x, recon, self.disc_train, step, cfg.loss)
        d_loss.backward()
        gn_disc = _clip([p for p in self.disc.parameters() if p.requires_grad], cfg.grad_clip)
        self.opt_disc.step()
        self.opt_disc.zero_grad(set_to_none=True)

        # 3. SiT on the detached latent, train mode (BatchNorm batch statistics), same t and noise
        with self._amp(x):
            denoise, sit_align = self.sit_train(z.detach(), y, feats, t, noise, drop_mask)
        if self.observer:
            self.observer("sit_pass", t=t, noise=noise, training=self.sit.training,
                          frozen=not any(p.requires_grad for p in self.sit.parameters()))
        sit_loss = denoise + cfg.sit_align_weight * sit_align
        sit_loss.backward()
        gn_sit = _clip(sit_params, cfg.grad_clip)
        self.opt_sit.step()
        self.opt_sit.zero_grad(set_to_none=True)
        self.ema.update(self.sit.model)
        return {"loss": sit_loss.detach(), "denoise": denoise.detach(), "align": sit_align.detach(),
                "vae_loss": vae_loss.detach(), "vae_align": vae_align.detach(), **parts,
                "d_loss": d_loss.detach(), **d_parts, "grad_norm": gn_sit, "grad_norm_vae": gn_vae,
                "grad_norm_disc": gn_disc}
