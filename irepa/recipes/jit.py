"""JiT: x-prediction on pixels with the loss in velocity space, as End2End-Diffusion/iREPA
jit/denoiser.py@99ad4ac trains it.

JiT time runs the other way from SiT: z = t x + (1 - t) e, t = 1 is data. t is drawn
logit-normal, t = sigmoid(N(-0.8, 0.8)), so most samples are noisy. The network predicts
x; the loss compares velocities v = (x - z) / max(1 - t, T_EPS) and the same transform of
the prediction, T_EPS = 0.05 (the clamp keeps the weight 1/(1 - t)^2 of the equivalent
x-loss bounded near the data end). Images are in [-1, 1] (data kind "pixels").

Sampling: the model is called at its own time s = 1 - t and v = (x_t - x_hat) / max(t, T_EPS).
With s = 1 - t the JiT ODE dz/ds = (x_hat - z) / max(1 - s, eps) is exactly
dx/dt = (x_t - x_hat) / max(t, eps), the same clamp the loss uses, so Heun on linspace(1, 0)
reproduces JiT's Heun on linspace(0, 1) step for step (including the final Euler step:
irepa.sampling skips the corrector at t = 0). The clamp acts only for t < T_EPS: it keeps
the step finite at t = 0 and caps the 1/t amplification of the prediction error; with 50
steps the last step (t = 0.02 -> 0) moves 0.02/0.05 = 40% of the way to x_hat, as in the
release. CFG on this v equals CFG on x_hat (same denominator); the interval is given in SiT
time (irepa.sampling.jit_interval converts) and applied as the JiT release does (interval_rule "jit").

Presets (the published recipe): AdamW betas (0.9, 0.95), wd 0, lr 5e-5 x batch / 256,
5-epoch linear warm-up (optim.warmup_epochs: the trainer counts the steps from the dataset
and the global batch, as the release's drop_last loader does) then constant, no gradient
clipping, EMAs 0.9999 and 0.9996, label dropout 0.1, Heun 50 steps for sampling.
"""
from __future__ import annotations

import copy

import torch

from irepa import transport
from irepa.sampling import velocity_from_x_prediction

from .base import Loss, Recipe

DATASET = "/data/imagenet{res}-pixels"
"""where the presets expect a prepared pixel dataset (launch/prepare.py --kind pixels)"""


def jit_recipe(model: str, align_depth: int, *, batch_size: int = 256, steps: int = 200_000,
               resolution: int = 256) -> dict:
    """The JiT training recipe (no alignment section) as a preset tree."""
    return {
        "model": {"name": model, "input_size": resolution, "in_channels": 3, "num_classes": 1000,
                  "class_dropout_prob": 0.1, "align_depth": align_depth},
        "data": {"source": DATASET.format(res=resolution), "resolution": resolution},
        "optim": {"lr": 5e-5, "scale_lr_with_batch": True, "betas": (0.9, 0.95), "weight_decay": 0.0,
                  "grad_clip": None, "warmup_epochs": 5},
        "train": {"steps": steps, "batch_size": batch_size,
                  "ema_decays": [0.9999, 0.9996], "sample_steps": 50, "sample_method": "heun"},
    }


REPA_ALIGN = {"encoders": ["dinov2-vit-b"], "projector": "mlp", "gamma": None, "weight": 0.5}
IREPA_ALIGN = {"encoders": ["dinov2-vit-b"], "projector": "conv", "gamma": 0.8, "weight": 0.5}


def _presets() -> dict[str, dict]:
    out = {}
    for model, tag, depth in (("JiT-B/16", "jit-b16", 4), ("JiT-L/16", "jit-l16", 8), ("JiT-H/16", "jit-h16", 8)):
        out[f"{tag}-repa"] = {**jit_recipe(model, depth), "align": copy.deepcopy(REPA_ALIGN)}
        out[f"{tag}-irepa"] = {**jit_recipe(model, depth), "align": copy.deepcopy(IREPA_ALIGN)}
    # a tiny pixel-space JiT on the embedded digits with a HOG target: the built-in digits
    # are prepared as a pixel dataset (RGB in [-1, 1] at the data resolution); 16 px
    # patches at 128 px give the 8x8 grid HOG yields. The published lr is far too small for
    # a 1,200-step demo, so this one uses 1e-3 unscaled.
    out["digits-jit-irepa"] = {
        "model": {"name": "JiT-T/16", "input_size": 128, "in_channels": 3, "num_classes": 10,
                  "class_dropout_prob": 0.1, "align_depth": 2, "attn_backend": "sdpa"},
        "align": {"encoders": ["hog-patch"], "projector": "conv", "gamma": 0.8, "weight": 0.5},
        "data": {"source": "digits", "resolution": 128, "backend": "memmap"},
        "optim": {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0, "grad_clip": None,
                  "warmup_steps": 50},
        "train": {"steps": 1200, "batch_size": 64, "ema_decays": [0.995, 0.99],
                  "log_every": 50, "ckpt_every": 400, "sample_steps": 40, "sample_method": "heun"},
    }
    return out


class JiTRecipe(Recipe):
    """x-prediction with the loss in velocity space; see the module docstring."""

    name = "jit"
    model_families = ("JiT",)
    data_kind = "pixels"
    presets = _presets()
    sample_quantize = "round"  # JiT engine_jit.py@99ad4ac: np.round(clip(255 x, 0, 255))
    interval_rule = "jit"  # the JiT release's open CFG interval, decided at every model call

    P_MEAN, P_STD = -0.8, 0.8
    """t = sigmoid(N(P_MEAN, P_STD))"""
    T_EPS = 0.05
    """the clamp of 1 - t in the loss and of t in the sampler's velocity"""
    NOISE_SCALE = 1.0
    """multiplies e (1.0 at 256 px; the release uses 2.0 at 512 px)"""

    def draw(self, batch, generator):
        d = self.draw_data(batch, generator)
        x = d["x"]
        d["t"] = transport.sample_time(x.shape[0], "lognormal", generator=generator, device=x.device,
                                       mean=self.P_MEAN, std=self.P_STD)
        d["noise"] = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * self.NOISE_SCALE
        return d

    def loss(self, model, batch, draws):
        x, t, noise = draws["x"], draws["t"], draws["noise"]
        tb = t.view(-1, *([1] * (x.dim() - 1)))
        z = (tb * x.float() + (1 - tb) * noise.float()).to(x.dtype)
        x_pred, hidden = model(z, t, batch["y"], draws.get("drop"))
        denom = (1 - tb).clamp_min(self.T_EPS)
        v_target = (x.float() - z.float()) / denom
        v_pred = (x_pred.float() - z.float()) / denom
        return Loss(transport.denoising_loss(v_pred, v_target), hidden)

    def velocity_fn(self, model):
        return velocity_from_x_prediction(model, self.T_EPS)
