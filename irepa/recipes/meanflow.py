"""MeanFlow (+ REPA / iREPA): one-step generation from the average velocity (Gsunshine/meanflow @d70cb55;
docs/recipes.md lists the choices made where the sources are silent).

The math (draws, guided target, JVP, adaptive loss, samplers) is irepa.meanflow; this file
binds it to the trainer. The model is a SiT with a second timestep embedder for h = t - r
(`build_model`). Options: config section `meanflow` (irepa.meanflow.MeanFlowSettings).

Draws, in this order, for the whole batch: the posterior sample and the label-dropout mask
of every recipe (`draw_data`: rand < model.class_dropout_prob), turned into MeanFlow's rule
(the same number of samples, the first by index, `first_k`); then t, r and the noise.

Alignment (REPA / iREPA) reads the hidden state of the pass that makes u, at (z_t, t, h =
t - r, the possibly dropped label): the normal forward in the "split" JVP mode, the primal of
the JVP through has_aux in "joint" mode; both give the same values and gradients (tested).
The release of MeanFlow + REPA is not public (iREPA App. G: the MeanFlow authors gave
it to them privately); the alternative seen in
a third-party port, a separate plain forward at the same inputs, is the same hidden state.

Sampling (`sample`): method "euler" is MeanFlow's N-step sampler, z <- z - (t_i - t_{i+1})
u(z, t_i, h = t_i - t_{i+1}) on a uniform grid, one call per step (`steps` = NFE; 1 and 4
in iREPA Table 3b). "heun" / "sde" integrate the instantaneous velocity u(z, t, h = 0)
(`velocity_fn`) with irepa.sampling. Guidance is trained in: sample with cfg 1.

Presets: meanflow-sit-{b2,l2,xl2}-{repa,irepa} (guidance per size from the MeanFlow paper; B/2 as
Gsunshine/meanflow configs/default.py@d70cb55; Adam
betas (0.9, 0.95), lr 1e-4 constant, no clipping, EMA 0.9999, batch 256, 100K steps as
iREPA Table 3b), digits-meanflow-{irepa,repa} (CPU, minutes).
"""
from __future__ import annotations

import dataclasses

import torch

from irepa import forward_ad
from irepa import meanflow as mf
from irepa.config import merge_trees

from .base import Loss
from .sit import DATASET, SiTRecipe, _presets as _sit_presets

# (omega, kappa, t_start, t_end) per size: the MeanFlow paper's settings (effective scale omega / (1 - kappa))
GUIDANCE = {"SiT-B/2": (1.0, 0.5, 0.0, 1.0), "SiT-L/2": (0.2, 0.92, 0.0, 0.8), "SiT-XL/2": (0.2, 0.92, 0.0, 0.75)}


def _presets() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for model, tag, depth in (("SiT-B/2", "b2", 4), ("SiT-L/2", "l2", 8), ("SiT-XL/2", "xl2", 8)):
        omega, kappa, lo, hi = GUIDANCE[model]
        base = {"model": {"name": model, "align_depth": depth, "input_size": 32, "in_channels": 4,
                          "class_dropout_prob": 0.1},
                "data": {"source": DATASET, "resolution": 256},
                "optim": {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.0, "grad_clip": None},
                "train": {"steps": 100_000, "batch_size": 256, "ema_decays": [0.9999], "sample_method": "euler",
                          "sample_steps": 1},
                "meanflow": {"omega": omega, "kappa": kappa, "t_start": lo, "t_end": hi}}
        out[f"meanflow-sit-{tag}-repa"] = merge_trees(base, {"align": {"encoders": ["dinov2-vit-b"], "projector": "mlp",
                                                                       "gamma": None, "weight": 0.5}})
        out[f"meanflow-sit-{tag}-irepa"] = merge_trees(base, {"align": {"encoders": ["dinov2-vit-b"],
                                                                        "projector": "conv", "gamma": 0.6,
                                                                        "weight": 1.0}})
    # digits: the SiT digits default's data and target (never mirrored) with the SiT-T/2 it was sized
    # with; MeanFlow's optimizer and B/2 guidance, for a 2-core CPU in minutes (a MeanFlow step costs
    # ~3x a flow-matching one: perf/RESULTS.md). 1200 steps (5.5 min idle on 2 cores, measured with
    # mirrored views): at 400 the 1-NFE grid is strokes, at 1200 each row is its digit
    digits = merge_trees(_sit_presets()["digits-sit-irepa"], {
        "model": {"name": "SiT-T/2", "align_depth": 2},
        "optim": {"lr": 1e-3, "betas": (0.9, 0.95), "grad_clip": 1.0, "warmup_steps": 50},
        "train": {"steps": 1200, "batch_size": 32, "ema_decays": [0.99], "log_every": 40, "ckpt_every": 600,
                  "sample_method": "euler", "sample_steps": 1},
        "meanflow": {"omega": 1.0, "kappa": 0.5, "jvp": "joint"}})
    out["digits-meanflow-irepa"] = digits
    out["digits-meanflow-repa"] = merge_trees(digits, {"align": {"projector": "mlp", "gamma": None, "weight": 0.5,
                                                                 "hidden_dim": 256}})
    return out


class MeanFlowRecipe(SiTRecipe):
    """The average velocity u(z, r, t) of the linear path, trained with one JVP per step."""

    name = "meanflow"
    model_families = ("SiT",)
    data_kind = "latent"
    presets = _presets()
    Options = mf.MeanFlowSettings
    resume_may_change = frozenset({"jvp", "target_precision", "compile_jvp"})  # same values, other kernels
    # MeanFlow train.py@d70cb55: clip(127.5 x + 128) cast to uint8 for x in [-1, 1], i.e. the nearest
    # value (ties up; round-half-even differs from it only on exact .5 ties)
    sample_quantize = "round"

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._jvp_fn = None
        self._settings = None

    def build_model(self, fused: bool):
        return mf.attach_h_embedder(super().build_model(fused))

    def draw(self, batch, generator):
        d = self.draw_data(batch, generator)
        if "drop" in d:
            d["drop"] = mf.first_k(d["drop"])
        d.update(mf.draw_times_and_noise(d["x"], generator, self.options))
        return d

    def _run_settings(self, model) -> mf.MeanFlowSettings:
        """The options, with fp32 targets turned to amp where the forward sees bf16/fp16 weights (FSDP2's
        param_dtype): autocast off would feed fp32 activations to them."""
        if self._settings is None:
            s = self.options
            precision = self.cfg.train.precision
            low = precision in ("bf16", "fp16") or (precision == "auto" and torch.cuda.is_available())
            if s.target_precision == "fp32" and low and _is_fsdp(model):
                forward_ad.note_fallback("MeanFlow target under the run's autocast, not fp32",
                                         "FSDP gathers bf16/fp16 parameters for the forward")
                s = dataclasses.replace(s, target_precision="amp")
            self._settings = s
        return self._settings

    def _compiled_jvp(self, model, s: mf.MeanFlowSettings):
        """The split mode's no-grad JVP as one compiled graph (meanflow.compile_jvp, default train.compile)."""
        want = s.compile_jvp if s.compile_jvp is not None else self.cfg.train.compile
        if not want or s.jvp != "split" or _is_fsdp(model):
            return None
        if self._jvp_fn is None:
            self._jvp_fn = torch.compile(mf.jvp_call, dynamic=False, mode=self.cfg.train.compile_mode)
        return self._jvp_fn

    def loss(self, model, batch, draws):
        s = self._run_settings(model)
        out, hidden, logs = mf.loss(model, draws["x"], batch["y"], draws["t"], draws["r"], draws["noise"],
                                    draws.get("drop"), s, model.null_class, jvp_fn=self._compiled_jvp(model, s))
        return Loss(out, hidden, logs)

    def velocity_fn(self, model):
        """The instantaneous velocity v(z, t) = u(z, t, t) (h = 0), for the ODE / SDE samplers."""
        def velocity(x, t, y):
            return mf.average_velocity(model, x, t, torch.zeros_like(t), y)[0]
        return velocity

    @torch.no_grad()
    def sample(self, model, noise, labels, *, method="euler", steps=1, cfg=1.0, interval=(0.0, 1.0),
               null_class=None, generator=None):
        if method == "euler":
            return mf.sample(model, noise, labels, steps=steps, cfg=cfg, interval=interval, null_class=null_class)
        return super().sample(model, noise, labels, method=method, steps=steps, cfg=cfg, interval=interval,
                              null_class=null_class, generator=generator)


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())
