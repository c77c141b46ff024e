"""The JiT objective (x-prediction, loss in velocity space) and the JiT training recipes.

JiT time runs the other way from SiT: z = t x + (1 - t) e, t = 1 is data. t is drawn
logit-normal, t = sigmoid(N(-0.8, 0.8)), so most samples are noisy. The network predicts
x; the loss compares velocities v = (x - z) / max(1 - t, eps) and the same transform of
the prediction, eps = 0.05 (the clamp keeps the weight 1/(1 - t)^2 of the equivalent
x-loss bounded near the data end). Images are expected in [-1, 1]. SPEC.md section 4.

`JIT_PRESETS` holds the published recipes in the config tree format of irepa.config
(registered there on first use): AdamW betas (0.9, 0.95), wd 0, lr 5e-5 x batch / 256,
5-epoch linear warm-up (optim.warmup_epochs: the trainer counts the steps from the
dataset and the global batch, as the release's drop_last loader does) then constant, no gradient clipping, EMAs 0.9999 and 0.9996,
label dropout 0.1, Heun 50 steps for sampling.
"""
from __future__ import annotations

import copy

import torch

from irepa import transport
from irepa.train.objective import Objective

P_MEAN, P_STD, T_EPS = -0.8, 0.8, 0.05


class JiTObjective(Objective):
    """x-prediction with the loss in velocity space; see the module docstring."""

    def __init__(self, p_mean: float = P_MEAN, p_std: float = P_STD, t_eps: float = T_EPS,
                 noise_scale: float = 1.0):
        self.p_mean, self.p_std, self.t_eps, self.noise_scale = p_mean, p_std, t_eps, noise_scale

    def draw(self, x, generator):
        t = transport.sample_time(x.shape[0], "lognormal", generator=generator, device=x.device,
                                  mean=self.p_mean, std=self.p_std)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * self.noise_scale
        return t, noise

    def loss(self, model, x, y, draws, drop_mask):
        t, noise = draws
        tb = t.view(-1, *([1] * (x.dim() - 1)))
        z = (tb * x.float() + (1 - tb) * noise.float()).to(x.dtype)
        x_pred, hidden = model(z, t, y, drop_mask)
        denom = (1 - tb).clamp_min(self.t_eps)
        v_target = (x.float() - z.float()) / denom
        v_pred = (x_pred.float() - z.float()) / denom
        return transport.denoising_loss(v_pred, v_target), hidden


def jit_objective(p_mean: float = P_MEAN, p_std: float = P_STD, t_eps: float = T_EPS,
                  noise_scale: float = 1.0) -> JiTObjective:
    """`loss(model, x, y, generator, drop_mask) -> (v-space MSE, hidden)` for a JiT model.

    x [B, C, H, W] in [-1, 1]. Draws t then the noise from `generator` (as the SiT
    objective does). noise_scale multiplies e (1.0 at 256 px, 2.0 at 512 px in the release).
    """
    return JiTObjective(p_mean, p_std, t_eps, noise_scale)


def jit_recipe(model: str, align_depth: int, *, batch_size: int = 256, steps: int = 200_000,
               resolution: int = 256) -> dict:
    """The JiT training recipe (no alignment section) as a preset tree."""
    return {
        "model": {"name": model, "input_size": resolution, "in_channels": 3, "num_classes": 1000,
                  "class_dropout_prob": 0.1, "align_depth": align_depth},
        "data": {"source": f"data/imagenet{resolution}", "resolution": resolution},
        "optim": {"lr": 5e-5, "scale_lr_with_batch": True, "betas": (0.9, 0.95), "weight_decay": 0.0,
                  "grad_clip": None, "warmup_epochs": 5},
        "train": {"objective": "jit", "steps": steps, "batch_size": batch_size,
                  "ema_decays": [0.9999, 0.9996], "sample_steps": 50, "sample_method": "heun"},
    }


REPA_ALIGN = {"encoders": ["dinov2-vit-b"], "projector": "mlp", "gamma": None, "weight": 0.5}
IREPA_ALIGN = {"encoders": ["dinov2-vit-b"], "projector": "conv", "gamma": 0.8, "weight": 0.5}


def _published() -> dict[str, dict]:
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
        "align": {"encoders": ["hog"], "projector": "conv", "gamma": 0.8, "weight": 0.5},
        "data": {"source": "digits", "resolution": 128, "backend": "memmap"},
        "optim": {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0, "grad_clip": None,
                  "warmup_steps": 50},
        "train": {"objective": "jit", "steps": 1200, "batch_size": 64, "ema_decays": [0.995, 0.99],
                  "log_every": 50, "ckpt_every": 400, "sample_steps": 40, "sample_method": "heun"},
    }
    return out


JIT_PRESETS: dict[str, dict] = _published()
