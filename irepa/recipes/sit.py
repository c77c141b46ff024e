"""SiT flow matching (REPA / iREPA): the latent-diffusion recipe of
End2End-Diffusion/iREPA ldm/train.py and ldm/loss.py @99ad4ac.

Time runs from data to noise: x_t = (1 - t) x + t e, t = 1 is noise, t drawn uniformly
(SiT / REPA default) or logit-normal (sit.time_sampling). The network regresses the
velocity e - x with an MSE in fp32; trained models are velocities for irepa.sampling as
they are. Data: VAE latents (posterior mean and std; a fresh posterior sample each step).

Presets: SiT-B/2, L/2, XL/2 with REPA (MLP projector, target y, lambda 0.5) or iREPA
(3x3 conv projector, spatial norm gamma 0.6, lambda 1.0), AdamW lr 1e-4 constant, batch
256, grad clip 1.0, EMA 0.9999, 400K steps; and the embedded default, a small SiT on
scikit-learn's digits with a HOG target that trains in minutes on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from irepa import transport
from irepa.config import merge_trees

from .base import Loss, Recipe

DATASET = "/data/imagenet256"
"""where the presets expect a prepared ImageNet (launch/prepare.py); outside the source tree"""


def _presets() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for model, tag, depth in (("SiT-B/2", "sit-b2", 4), ("SiT-L/2", "sit-l2", 8), ("SiT-XL/2", "sit-xl2", 8)):
        base = {"model": {"name": model, "align_depth": depth, "input_size": 32, "in_channels": 4},
                "data": {"source": DATASET, "resolution": 256},
                "train": {"steps": 400_000, "batch_size": 256, "ema_decays": [0.9999]},
                "optim": {"lr": 1e-4, "betas": (0.9, 0.999), "grad_clip": 1.0}}
        out[f"{tag}-repa"] = merge_trees(base, {"align": {"encoders": ["dinov2-vit-b"], "projector": "mlp",
                                                          "gamma": None, "weight": 0.5}})
        out[f"{tag}-irepa"] = merge_trees(base, {"align": {"encoders": ["dinov2-vit-b"], "projector": "conv",
                                                           "gamma": 0.6, "weight": 1.0}})
    # the embedded default: a small SiT on scikit-learn's digits with a HOG target, CPU, minutes.
    # Never mirrored (a mirrored digit is not its class); a 2-block SiT at lr 5e-3 learns per CPU
    # second faster than SiT-T/2 at 1e-3 (docs/study-spatial-vs-global.md: measured before / after)
    out["digits-sit-irepa"] = {
        "model": {"name": "SiT-Tiny/2", "input_size": 16, "in_channels": 1, "num_classes": 10,
                  "align_depth": 1, "attn_backend": "sdpa"},
        "align": {"encoders": ["hog-patch"], "projector": "conv", "gamma": 0.6, "weight": 1.0},
        "data": {"source": "digits", "resolution": 128, "backend": "memmap", "hflip": False},
        "optim": {"lr": 5e-3, "betas": (0.9, 0.999), "grad_clip": 1.0, "warmup_steps": 50},
        "train": {"steps": 800, "batch_size": 64, "ema_decays": [0.99], "log_every": 100,
                  "ckpt_every": 400, "sample_steps": 10, "sample_method": "heun"},
    }
    out["digits-sit-repa"] = merge_trees(out["digits-sit-irepa"], {"align": {"projector": "mlp", "gamma": None,
                                                                             "weight": 0.5, "hidden_dim": 256}})
    return out


@dataclass
class SiTOptions:
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    """distribution of t: uniform | lognormal (sigmoid of a standard normal); train.time_sampling before"""

    def __post_init__(self):
        transport.check_time_sampling(self.time_sampling)  # an unknown name fails now, not at step 0


class SiTRecipe(Recipe):
    """Flow matching with the velocity target e - x on the linear path."""

    name = "sit"
    model_families = ("SiT",)
    data_kind = "latent"
    presets = _presets()
    Options = SiTOptions
    # iREPA ldm/generate.py@99ad4ac (and REPA-E generate.py@3ad8046): clamp(255 x, 0, 255).to(uint8)
    sample_quantize = "truncate"

    @property
    def time_sampling(self) -> str:
        """<name>.time_sampling; a recipe built on this one whose own Options have no such key draws t as
        SiT's default does (uniform)."""
        return getattr(self.options, "time_sampling", SiTOptions.time_sampling)

    def draw(self, batch, generator):
        d = self.draw_data(batch, generator)
        x = d["x"]
        d["t"] = transport.sample_time(x.shape[0], self.time_sampling, generator=generator, device=x.device)
        d["noise"] = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return d

    def loss(self, model, batch, draws):
        x, t, noise = draws["x"], draws["t"], draws["noise"]
        pred, hidden = model(transport.interpolate(x, noise, t), t, batch["y"], draws.get("drop"))
        return Loss(transport.denoising_loss(pred, transport.velocity_target(x, noise)), hidden)
