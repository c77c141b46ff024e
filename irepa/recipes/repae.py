"""REPA-E (and iREPA-E): the VAE trained end to end with the SiT, as
End2End-Diffusion/REPA-E train_repae.py@3ad8046 trains it.

Data: images (a prepared "pixels" dataset: uint8 crops + stored encoder features). Parts,
each with its own AdamW and grad-norm clip 1.0, all in every checkpoint:
  model  SiT (with `latent_norm`, REPA-E's BatchNorm of the clean latent, in its EMA) + projector;
         its sin-cos pos_embed is trained too (repae.train_pos_embed, below)
  vae    the SD-VAE (diffusers AutoencoderKL) as VAEAutoencode, from a local checkpoint
  disc   the PatchGAN discriminator
The step (`RepaEStep`, in REPA-E's order): VAE forward -> VAE update with L1 + LPIPS + KL +
GAN + vae_align_weight (1.5) x alignment through the frozen, eval-mode SiT's first blocks
-> discriminator update -> SiT update on the detached latent (denoising + align.weight x
alignment, same t and noise) -> EMA. The whole per-rank batch goes through each pass at once
(its BatchNorm statistics are the batch's), so train.micro_batch_size does not apply.

iREPA-E = the same step with iREPA's conv projector and spatial norm (align.projector conv,
align.gamma 0.6) in both alignment terms. The weights stay REPA-E's 0.5 (SiT) and 1.5 (VAE):
iREPA's App. G adds the two iREPA changes to the official REPA-E code and names no other.

Sampling returns VAE latents: the SiT samples in its normalized space and its (EMA) BatchNorm
statistics map them back (x / scale + bias); the decoder is the run's own VAE (the live part
while training, the checkpoint's vae.safetensors when sampling a run, or --vae EXPORTED).
The position embedding: the release's SiT holds the sin-cos table as a Parameter created
with requires_grad=False (models/sit.py@3ad8046, line 208), but train_repae.py turns every
SiT parameter's gradient back on after the VAE update (requires_grad(model, True), line 410)
and its AdamW (weight decay 0), clip_grad_norm_ and EMA take model.parameters(): so the
table is trained, and enters the clip norm, from step 1. REPA's train.py@67f7145 and
iREPA's ldm/train.py@99ad4ac never re-enable it (fixed there, as in our other recipes). repae.train_pos_embed true (default)
follows the release: a Parameter in the SiT's optimizer, clip and EMA, saved with the run;
false keeps the fixed buffer. A run's config.json from before the option has no such key
and means false (RepaEOptions.ADDED); a resume keeps the run's choice.

After training, launch/export_vae.py writes the VAE and the statistics; prepared with it
(launch/prepare.py --vae EXPORTED) a dataset trains the plain `sit` recipe with the BatchNorm
held fixed as the dataset's normalization (REPA-E's train_ldm_only).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from irepa import transport
from irepa.autoencoder.discriminator import build_discriminator
from irepa.autoencoder.export import load_bn_stats
from irepa.autoencoder.losses import VAELossConfig, discriminator_loss, generator_loss
from irepa.autoencoder.lpips import LPIPS, build_lpips
from irepa.autoencoder.sdvae import REPAE_VAE_FILE, Posterior, VAEAutoencode, build_sdvae, load_sdvae, resolve_vae
from irepa.config import merge_trees
from irepa.errors import InputError, InputNotFound
from irepa.models.latent_norm import LatentNorm

from .base import Loss, PartSpec
from .sit import SiTRecipe

DATASET = "/data/imagenet256-pixels"
"""where the presets expect an ImageNet prepared as pixels with DINOv2-B features (launch/prepare.py --kind pixels)"""
RANDOM = "random"
ESTIMATE = "estimate"


@dataclass
class RepaEOptions:
    vae: str = "f8d4"
    """VAE architecture: f8d4 (SD-VAE) | tiny | digits"""
    vae_weights: str | None = None
    """diffusers folder or REPA-E sdvae-f8d4.pt; None = looked up like encoder weights
    ($IREPA_ENCODER_SDVAE_F8D4, $IREPA_ENCODER_DIR/sdvae-f8d4.pt, ...); "random" = random init"""
    latent_stats: str | None = None
    """latent BatchNorm init: REPA-E <vae>-latents-stats.pt, latent_stats.json or a manifest.json; None =
    the file next to the VAE weights (<stem>-latents-stats.pt / latent_stats.json); "estimate" = the
    first batch's posterior samples (a random-init VAE)"""
    disc_weights: str | None = None
    """REPA-E sdvae-f8d4-discriminator-ckpt.pt; None = looked up; "random" = random init"""
    lpips: str = "vgg"
    """vgg (LPIPS VGG16 + v0.1 heads from local files) | tiny (random init, 1/16 width: tests, demo) |
    vgg-random (the VGG16 network at random init: its cost without its files, perf/bench_repae.py)"""
    vae_lr: float = 1e-4
    disc_lr: float = 1e-4
    vae_align_weight: float = 1.5
    """alignment weight in the VAE update (REPA-E --vae-align-proj-coeff); the SiT's is align.weight"""
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    kl_weight: float = 1e-6
    gan_weight: float = 0.1
    gan_start: int = 0
    lpips_input: str = "reference"
    """reference (LPIPS sees 2x - 1 of the [-1, 1] images, as REPA-E) | standard"""
    recon_every: int = 0
    """write a reconstruction grid (top: input, bottom: VAE output) every N steps; 0 = off"""
    train_pos_embed: bool = True
    """train the SiT's sin-cos position embedding with its other weights (optimizer, clipping, EMA), as the
    release does; false = the fixed table of the other recipes"""
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    """distribution of t in both passes: uniform | lognormal (as sit.time_sampling; train.time_sampling before)"""

    ADDED: ClassVar[dict[str, Any]] = {"train_pos_embed": False}
    """keys added after runs were made -> the value such a run had (its config.json lacks the key)"""

    def __post_init__(self):
        if self.vae not in ("f8d4", "tiny", "digits"):
            raise ValueError(f"repae.vae must be f8d4, tiny or digits, got {self.vae!r}")
        if self.lpips not in ("vgg", "tiny", "vgg-random"):
            raise ValueError(f"repae.lpips must be vgg, tiny or vgg-random, got {self.lpips!r}")
        transport.check_time_sampling(self.time_sampling)
        if self.vae_lr <= 0 or self.disc_lr <= 0 or self.vae_align_weight < 0:
            raise ValueError("repae: vae_lr and disc_lr must be > 0, vae_align_weight >= 0")
        self.loss_config()  # validates the loss settings now

    def loss_config(self) -> VAELossConfig:
        return VAELossConfig(l1_weight=self.l1_weight, lpips_weight=self.lpips_weight, kl_weight=self.kl_weight,
                             gan_weight=self.gan_weight, gan_start=self.gan_start, lpips_input=self.lpips_input)


def _presets() -> dict[str, dict]:
    out = {}
    for model, tag, depth in (("SiT-B/2", "b2", 4), ("SiT-L/2", "l2", 8), ("SiT-XL/2", "xl2", 8)):
        base = {"model": {"name": model, "align_depth": depth, "input_size": 32, "in_channels": 4},
                "data": {"source": DATASET, "resolution": 256},
                "train": {"steps": 400_000, "batch_size": 256, "ema_decays": [0.9999]},
                "optim": {"lr": 1e-4, "betas": (0.9, 0.999), "grad_clip": 1.0},
                "repae": {"vae": "f8d4", "vae_lr": 1e-4, "disc_lr": 1e-4, "vae_align_weight": 1.5}}
        out[f"repae-sit-{tag}-repa"] = merge_trees(base, {"align": {"encoders": ["dinov2-vit-b"], "projector": "mlp",
                                                                     "gamma": None, "weight": 0.5}})
        out[f"repae-sit-{tag}-irepa"] = merge_trees(base, {"align": {"encoders": ["dinov2-vit-b"], "projector": "conv",
                                                                      "gamma": 0.6, "weight": 0.5}})
    # CPU demo: digits pixels at 32 px (4x4x4 latents, 2x2 tokens), a narrow random-init VAE trained
    # end to end from step 0 (no pre-trained VAE exists for this data; REPA-E's losses train it)
    out["digits-repae-irepa"] = {
        "model": {"name": "SiT-T/2", "input_size": 4, "in_channels": 4, "num_classes": 10, "align_depth": 2,
                  "attn_backend": "sdpa"},
        "align": {"encoders": ["hog-patch"], "projector": "conv", "gamma": 0.6, "weight": 0.5},
        "data": {"source": "digits", "resolution": 32, "backend": "memmap"},
        "optim": {"lr": 1e-3, "betas": (0.9, 0.999), "grad_clip": 1.0, "warmup_steps": 20},
        "train": {"steps": 300, "batch_size": 32, "ema_decays": [0.99], "log_every": 25, "ckpt_every": 150,
                  "sample_steps": 40, "sample_method": "heun"},
        "repae": {"vae": "digits", "vae_weights": RANDOM, "latent_stats": ESTIMATE, "disc_weights": RANDOM,
                  "lpips": "tiny", "vae_lr": 1e-3, "disc_lr": 1e-4, "recon_every": 100},
    }
    return out


class RepaERecipe(SiTRecipe):
    name = "repae"
    model_families = ("SiT",)
    data_kind = "pixels"
    presets = _presets()
    Options = RepaEOptions
    trains_decoder = True
    # where the parts' first weights come from (a resume loads its own), their learning rates, logging
    resume_may_change = frozenset({"vae_weights", "latent_stats", "disc_weights", "vae_lr", "disc_lr", "recon_every"})

    # -- model and parts ------------------------------------------------------------------
    def model_kwargs(self, fused):
        return {**super().model_kwargs(fused), "train_pos_embed": self.options.train_pos_embed}

    def build_model(self, fused: bool):
        """The SiT with `latent_norm`, REPA-E's BatchNorm of the clean latent (applied before noising,
        in `loss`, not in the SiT's forward): its statistics are saved and averaged with the model."""
        model = super().build_model(fused)
        model.latent_norm = LatentNorm(model.in_channels)
        return model

    def _stats_path(self) -> Path:
        o = self.options
        if o.latent_stats:
            return Path(o.latent_stats)
        if o.vae_weights == RANDOM:
            raise ValueError("repae.vae_weights=random needs repae.latent_stats (a file, or 'estimate')")
        w = resolve_vae(o.vae_weights)
        if w.is_dir() and not (w / "config.json").is_file():
            w = w / REPAE_VAE_FILE
        for cand in ([w / "latent_stats.json"] if w.is_dir() else
                     [w.with_name(w.stem + "-latents-stats.pt"), w.with_name("latent_stats.json")]):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"repae: no latent statistics next to the VAE weights {w} (expected "
                                f"{w.stem}-latents-stats.pt or latent_stats.json); pass --repae.latent_stats FILE "
                                f"or 'estimate'")

    def data_shape(self, model) -> tuple[int, int, int]:
        f = 8  # the SD-VAE's downsampling
        return 3, model.input_size * f, model.input_size * f

    def extra_parts(self, device):
        o = self.options
        torch.manual_seed(self.cfg.train.seed + 2)  # the same random init on every rank and rerun
        vae = build_sdvae(o.vae) if o.vae_weights == RANDOM else load_sdvae(o.vae_weights, config=o.vae)
        disc = build_discriminator(None if o.disc_weights == RANDOM else o.disc_weights, tiny=o.vae != "f8d4",
                                   pretrained=o.disc_weights != RANDOM)
        adamw = lambda lr: lambda ps: torch.optim.AdamW(  # noqa: E731
            ps, lr=lr, betas=self.cfg.optim.betas, eps=self.cfg.optim.eps, weight_decay=self.cfg.optim.weight_decay,
            fused=torch.device(device).type == "cuda" or None)
        clip = self.cfg.optim.grad_clip
        return {"vae": PartSpec(VAEAutoencode(vae), adamw(o.vae_lr), grad_clip=clip),
                "disc": PartSpec(disc, adamw(o.disc_lr), grad_clip=clip)}

    def make_step(self, step):
        """REPA-E's step, with what it needs besides the parts: LPIPS (built right after the parts, from
        the same seeded stream) and the latent BatchNorm's initial statistics, read now (a missing file
        fails before step 0) and set at step 0; a resumed run takes them from its checkpoint."""
        o = self.options
        lpips = LPIPS() if o.lpips == "vgg-random" else build_lpips(tiny=o.lpips == "tiny")
        stats = None if o.latent_stats == ESTIMATE else load_bn_stats(self._stats_path())
        return RepaEStep(self, step, lpips.to(step.device), stats)

    # -- objective: the SiT part ------------------------------------------------------------
    def loss(self, model, batch, draws):
        """draws["x"]: the VAE latent (unnormalized); the latent BatchNorm comes first."""
        x = model.latent_norm(draws["x"])
        t, noise = draws["t"], draws["noise"]
        pred, hidden = model(transport.interpolate(x, noise, t), t, batch["y"], draws.get("drop"))
        return Loss(transport.denoising_loss(pred, transport.velocity_target(x, noise)), hidden)

    def alignment_hidden(self, model, batch, draws):
        """The VAE's alignment pass: the normalized latent noised, through blocks 1..align_depth."""
        x = model.latent_norm(draws["x"])
        t, noise = draws["t"], draws["noise"]
        return model(transport.interpolate(x, noise, t), t, batch["y"], draws.get("drop"), hidden_only=True)[1]

    # -- sampling and decoding ------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model, noise, labels, **kw):
        """VAE latents: the SiT's samples mapped back by its BatchNorm statistics (x / scale + bias)."""
        return model.latent_norm.denormalize(super().sample(model, noise, labels, **kw))

    def decoder(self, manifest, device, vae=None, scaling=None, *, parts=None, checkpoint=None):
        """The run's own VAE: the live "vae" part while training, else an export of it (`vae`), else
        the checkpoint's vae.safetensors; read at the first call."""
        state = {"vae": parts["vae"].vae if parts is not None and "vae" in parts else None}

        @torch.no_grad()
        def decode(z):
            ae = state["vae"]
            if ae is None:
                ae = state["vae"] = self._load_decoder_vae(vae, checkpoint, device)
            img = ae.decode(z.to(next(ae.parameters()).dtype)).sample
            return ((img.float() + 1) / 2).clamp(0, 1)
        return decode

    def decoder_tag(self, checkpoint=None) -> str:
        return f"repae-vae:{checkpoint}"

    def _load_decoder_vae(self, vae, checkpoint, device):
        if vae is not None:  # an exported VAE folder
            return load_sdvae(vae, config=self.options.vae).to(device).eval()
        path = Path(checkpoint) / "vae.safetensors" if checkpoint else None
        if path is None or not path.is_file():
            raise InputNotFound(f"REPA-E decoding needs the run's VAE: {path} not found (a sharded checkpoint? "
                                    f"export it with launch/export_vae.py and pass --vae EXPORTED)")
        from safetensors.torch import load_file
        ae = VAEAutoencode(build_sdvae(self.options.vae))
        sd = load_file(str(path))
        bad = next((k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise InputError(f"{path}: non-finite weights (NaN or inf in {bad!r}); the run diverged before this "
                             f"checkpoint was written, use an older one")
        ae.load_state_dict(sd)
        return ae.vae.to(device).eval()


class RepaEStep:
    """One REPA-E step from the default step's pieces (irepa.train.step.TrainStep)."""

    def __init__(self, recipe: RepaERecipe, step, lpips: nn.Module,
                 initial_stats: tuple[torch.Tensor, torch.Tensor] | None):
        self.recipe, self.step = recipe, step
        self.model, self.vae, self.disc = step.parts["model"], step.parts["vae"], step.parts["disc"]
        self.loss_cfg = recipe.options.loss_config()
        self.lpips = lpips
        """the frozen LPIPS network of the reconstruction loss"""
        self.initial_stats = initial_stats
        """(scale, bias) the latent BatchNorm starts from at step 0; None: estimated from that step's batch"""
        self.observer = None
        """test hook: observer(name, **values) at each pass"""

    def __call__(self, batch: dict, index: int) -> dict[str, torch.Tensor]:
        st, r = self.step, self.recipe
        o = r.options
        g = st.generator(index)
        data = r.draw_data(batch, g)  # "x": the images in [-1, 1]; "drop": label dropout
        x = data["x"]
        with st.autocast():
            mean, logvar, z, recon = self.vae.train_module(x, g)
        t = transport.sample_time(x.shape[0], r.time_sampling, generator=g, device=x.device)
        noise = torch.randn(z.shape, generator=g, device=z.device, dtype=z.dtype)
        feats = st.features(batch)
        net = self.model.module  # model + head, plain (frozen passes need no gradient reduction)
        if index == 0:
            self._init_stats(z.detach())

        # 1. VAE: the SiT frozen and in eval (BatchNorm running stats), alignment through blocks 1..depth
        trained = [p for p in net.parameters() if p.requires_grad]
        net.eval()
        for p in trained:
            p.requires_grad_(False)
        try:
            with st.autocast():  # through the tree's own forward: FSDP gathers its root parameters there
                _, vae_align, _ = net(batch, {"x": z, "t": t, "noise": noise}, feats, align_only=True)
            if self.observer:
                self.observer("vae_pass", t=t, noise=noise, training=net.training,
                              frozen=not any(p.requires_grad for p in net.parameters()))
            rec, logs = generator_loss(x, recon, Posterior(mean, logvar), self.disc.module, self.lpips, index,
                                       self.loss_cfg)
            vae_loss = rec + o.vae_align_weight * vae_align
            st.backward(vae_loss)
        finally:
            for p in trained:
                p.requires_grad_(True)
            net.train()
        gn_vae = st.optimizer_step(self.vae, index, update_scale=False)

        # 2. discriminator on (x, recon.detach())
        d_loss, d_logs = discriminator_loss(x, recon, self.disc.train_module, index, self.loss_cfg)
        st.backward(d_loss)
        gn_disc = st.optimizer_step(self.disc, index, update_scale=False)

        # 3. SiT on the detached latent, train mode, the same t and noise
        draws = {"x": z.detach(), "t": t, "noise": noise, **({"drop": data["drop"]} if "drop" in data else {})}
        with st.autocast():
            denoise, align, _ = self.model.train_module(batch, draws, feats)
        if self.observer:
            self.observer("sit_pass", t=t, noise=noise, training=net.training,
                          frozen=not any(p.requires_grad for p in net.parameters()))
        loss = denoise + st.align_weight * align
        st.backward(loss)
        gn = st.optimizer_step(self.model, index)
        n = index + 1
        if o.recon_every and (n % o.recon_every == 0 or n == r.cfg.train.steps) and st.rank == 0:
            self._save_recon(x, recon, n)
        return {"loss": loss.detach(), "denoise": denoise.detach(), "align": align.detach(), "grad_norm": gn,
                "vae_loss": vae_loss.detach(), "vae_align": vae_align.detach(), **logs, "d_loss": d_loss.detach(),
                **d_logs, "grad_norm_vae": gn_vae, "grad_norm_disc": gn_disc}

    @torch.no_grad()
    def _save_recon(self, x: torch.Tensor, recon: torch.Tensor, n: int) -> None:
        """run folder / recon / step-N.png: 8 inputs over their reconstructions (a host copy, every recon_every steps)."""
        from irepa.grid import save_grid, to_uint8_nhwc
        k = min(8, x.shape[0])
        both = torch.cat([x[:k], recon[:k]]).float().add(1).div(2).clamp(0, 1).cpu()
        path = self.recipe.cfg.run_dir / "recon" / f"step-{n:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(to_uint8_nhwc(both), path, nrow=k)

    @torch.no_grad()
    def _init_stats(self, z: torch.Tensor) -> None:
        """Step 0: the latent BatchNorm and its EMA copies start from the configured statistics
        (REPA-E's init_bn: running_mean = bias, running_var = scale^-2), or with
        repae.latent_stats=estimate from the first batch's posterior samples pooled over ranks."""
        if self.initial_stats is None:
            return self._estimate_stats(z)
        scale, bias = (t.to(z.device) for t in self.initial_stats)
        self._set_stats(bias, scale.reciprocal().pow(2))

    @torch.no_grad()
    def _estimate_stats(self, z: torch.Tensor) -> None:
        import torch.distributed as dist
        zf = z.float()
        s = torch.stack([zf.sum((0, 2, 3)), (zf * zf).sum((0, 2, 3))])
        n = torch.tensor(float(z.shape[0] * z.shape[2] * z.shape[3]), device=z.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(s)
            dist.all_reduce(n)
        mean = s[0] / n
        var = (s[1] / n - mean * mean).clamp_min(1e-8)
        self._set_stats(mean, var)

    def _set_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """The live latent BatchNorm's statistics, then the EMA's buffers from the live model's (step 0:
        nothing else of them has moved yet)."""
        self.model.module.model.latent_norm.init_from_stats(var.rsqrt(), mean)
        if self.model.ema is not None:
            self.model.ema.copy_buffers(self.model.module.model)
