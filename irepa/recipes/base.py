"""The recipe interface: what one training recipe owns, with the defaults SiT-like recipes share.

A recipe is bound to a run's Config (`Recipe(cfg)`); the trainer, perf/bench_step.py,
the sample grid, online FID and launch/sample.py only call these methods, so nothing else
switches on a recipe's name. irepa/recipes/__init__.py lists what a recipe file must provide.

The step contract (kept exactly, so a run's random numbers do not depend on the micro-batch
size): `draw(batch, generator)` makes every random draw of a step for the whole batch, once,
and returns a dict of tensors with a leading batch dim; the step slices it per micro-batch
and calls `loss(model, batch[s], draws[s])`. The shared data draws (`draw_data`) come first:
the posterior sample of stored latents, then the label-dropout mask.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from irepa import codec, models
from irepa.config import Config, TrainConfig
from irepa.sampling import VelocityFn, model_velocity_fn
from irepa.sampling import sample as integrate


@dataclass
class Loss:
    """What `Recipe.loss` returns for one micro-batch."""

    denoise: torch.Tensor
    """scalar: the recipe's denoising objective (the trainer adds align.weight x the alignment loss)"""
    hidden: torch.Tensor | None
    """[B, T, D] hidden state the alignment head projects (None: no alignment term)"""
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    """extra detached scalars to log (batch means are formed by the step)"""


@dataclass
class PartSpec:
    """A trained part besides the diffusion model (`Recipe.extra_parts`): REPA-E's VAE and discriminator."""

    module: nn.Module
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    """params -> optimizer; None = AdamW with the run's optim settings"""
    ema_decays: tuple[float, ...] = ()
    """EMA copies of the part (none by default)"""
    grad_clip: float | None = None
    """max grad norm of the part's own optimizer step (None = no clipping)"""


class Recipe:
    """Base class: SiT-style defaults. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    """registry key, the value of train.recipe"""
    model_families: ClassVar[tuple[str, ...]] = ()
    """model name prefixes it trains, e.g. ("SiT",) for SiT-XL/2 (checked against model.name)"""
    data_kind: ClassVar[str] = "latent"
    """what the data holds: "latent" (VAE posterior) or "pixels" (images in [-1, 1])"""
    presets: ClassVar[dict[str, dict]] = {}
    """preset name -> config tree (irepa.config sections); train.recipe is set by the registry"""
    Options: ClassVar[type | None] = None
    """a dataclass of the recipe's own options: config section `name` (cfg.<name>, --<name>.<key>)"""
    resume_may_change: ClassVar[frozenset[str]] = frozenset()
    """options of `Options` a resume may change (how the step runs, where initial weights come
    from); every other one must equal the run folder's, as model/align/data do (irepa.train.run_folder)"""
    sample_quantize: ClassVar[str] = "round"
    """how launch/sample.py turns decoded images in [0, 1] into the uint8 FID batch, as the
    recipe's release writes its samples: "round" or "truncate" (irepa.grid.quantize_unit)"""
    interval_rule: ClassVar[str] = "sit"
    """where CFG is on, as the recipe's release decides it (irepa.sampling.guidance_schedule)"""
    trains_decoder: ClassVar[bool] = False
    """the decoder is a trained part of the run (REPA-E's VAE): `decoder` takes it from the live parts
    or a checkpoint, and launch/export_vae.py exports it"""

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg if cfg is not None else Config(train=TrainConfig(recipe=self.name))

    @property
    def options(self) -> Any:
        """This run's values of `Options` (its defaults when the config has no such section)."""
        if self.Options is None:
            return None
        return self.cfg.extra.get(self.name) or self.Options()

    # -- model ----------------------------------------------------------------------------
    def model_kwargs(self, fused: bool) -> dict:
        """Constructor keywords for irepa.models.build(model.name, ...); add recipe-specific ones here."""
        m = self.cfg.model
        kw = dict(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                  class_dropout_prob=m.class_dropout_prob, attn_backend=m.attn_backend)
        if models.takes_fused_kernels(m.name):  # a family without a fused kernel refuses the flag
            kw["fused_kernels"] = fused
        if m.align_depth is not None:
            kw["align_depth"] = m.align_depth
        return kw

    def data_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """What one sample of the prepared data holds, checked against the dataset's manifest: the
        model's input (C, H, W) by default; a recipe that encodes the data itself (REPA-E: images
        through its trained VAE) returns the image shape."""
        return model.in_channels, model.input_size, model.input_size

    def build_model(self, fused: bool) -> nn.Module:
        """The diffusion model (seeded by the caller). Modules a recipe attaches here are trained,
        averaged by the EMA and checkpointed with it (e.g. MeanFlow's second time embedder)."""
        return models.build(self.cfg.model.name, **self.model_kwargs(fused))

    # -- objective ------------------------------------------------------------------------
    def draw_data(self, batch: dict, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The data draws, in this order: "x" (a posterior sample x + x_std * e when the loader
        stores the std, else the batch's x) and "drop" (label dropout, when model.class_dropout_prob > 0)."""
        x = batch["x"]
        if "x_std" in batch:
            x = x + batch["x_std"] * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        out = {"x": x}
        p = self.cfg.model.class_dropout_prob
        if p > 0:
            out["drop"] = torch.rand(x.shape[0], generator=generator, device=x.device) < p
        return out

    def draw(self, batch: dict, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Every random draw of one step for the whole batch: dict of [B, ...] tensors."""
        raise NotImplementedError(f"recipe {self.name!r} does not define draw()")

    def loss(self, model: nn.Module, batch: dict, draws: dict[str, torch.Tensor]) -> Loss:
        """One micro-batch: `batch` and `draws` are the same slice of the loader batch and of `draw`."""
        raise NotImplementedError(f"recipe {self.name!r} does not define loss()")

    def alignment_hidden(self, model: nn.Module, batch: dict, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """The hidden state the alignment head reads, without the denoising output: for a step that
        aligns through the model's first blocks only (REPA-E's VAE update; the trained tree's
        forward with align_only=True)."""
        raise NotImplementedError(f"recipe {self.name!r} has no alignment-only pass")

    # -- sampling -------------------------------------------------------------------------
    def velocity_fn(self, model: nn.Module) -> VelocityFn:
        """The trained model as a velocity in SiT time (t = 1 noise) for irepa.sampling."""
        return model_velocity_fn(model)

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, labels: torch.Tensor | None, *, method: str = "sde",
               steps: int = 250, cfg: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
               null_class: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples (model space, like `noise`) for `labels`; the trainer's grid, online FID and
        launch/sample.py all come here. interval: CFG interval in SiT time."""
        return integrate(self.velocity_fn(model), noise, labels, method, steps, cfg, interval,
                         null_class=null_class, generator=generator, interval_rule=self.interval_rule)

    def decoder(self, manifest: dict | None, device, vae: str | None = None,
                scaling: codec.LatentScaling | None = None, *, parts: Mapping[str, nn.Module] | None = None,
                checkpoint: Path | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Model outputs -> images in [0, 1], or None when no decoder is available on this machine.
        manifest: the run's prepared-data manifest (its codec and latent statistics) when known;
        vae / scaling override them (launch/sample.py --vae, --latent_stats, --latent_scale).
        For a recipe that `trains_decoder`: parts, the run's live trained parts by name (while
        training), or checkpoint, the single-file checkpoint folder a sampling tool loaded the
        model from."""
        if self.data_kind == "pixels":
            return codec.decode_pixels
        name = vae or ((manifest or {}).get("latent") or {}).get("vae")
        if scaling is None and manifest is not None and (manifest.get("latent") or {}).get("channel_mean"):
            scaling = codec.LatentScaling.from_manifest(manifest)
        return codec.latent_decoder(name, scaling, device)

    def decoder_tag(self, checkpoint: Path | None = None) -> str:
        """How launch/sample.py's plan.json names the decoder of a pixel-data recipe's samples."""
        return "pixels"

    # -- trained parts and the step -------------------------------------------------------
    def extra_parts(self, device) -> dict[str, PartSpec]:
        """Trained parts besides the diffusion model and its projectors, by name (letters, digits,
        underscores). The trainer gives each an optimizer (and EMA), data-parallel wrapping and a
        place in every checkpoint (files <name>.safetensors, <name>-optimizer..., <name>-ema...)."""
        return {}

    def make_step(self, step):
        """The train step the loop calls as step(batch, index) -> dict of scalar tensors ("loss"
        at least, no host sync). Default: irepa.train.step.TrainStep, the one-optimizer step.
        A recipe that trains several parts in its own order returns an object of its own that
        uses the given step's pieces: step.parts (name -> Part: module, train_module, optimizer,
        ema, params), step.generator(index), step.slices(B), step.features(batch), step.autocast(),
        step.grad_sync(part, enabled), step.backward(loss), step.optimizer_step(part, index).
        Called once per run (irepa.train.assemble.build_run), right after `extra_parts`: what the
        step needs besides the parts (REPA-E's LPIPS, its initial latent statistics) it builds here."""
        return step
