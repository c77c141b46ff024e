"""Denoising objectives. Each is `loss(model, x, y, generator, drop_mask) -> (loss, hidden)`.

The trainer adds the alignment term on `hidden`; a new diffusion family plugs in here
by registering its objective, not by rewriting the loop.
"""
from __future__ import annotations

from typing import Callable

import torch

from irepa import transport

Objective = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def sit_objective(time_sampling: str = "uniform") -> Objective:
    """Flow matching on x_t = (1 - t) x + t e with the velocity target e - x (SPEC.md section 3)."""

    def loss(model, x, y, generator, drop_mask):
        t = transport.sample_time(x.shape[0], time_sampling, generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        pred, hidden = model(transport.interpolate(x, noise, t), t, y, drop_mask)
        return transport.denoising_loss(pred, transport.velocity_target(x, noise)), hidden

    return loss


def build_objective(name: str, time_sampling: str = "uniform") -> Objective:
    if name == "sit":
        return sit_objective(time_sampling)
    if name == "jit":
        from .objective_jit import jit_objective
        return jit_objective()
    raise ValueError(f"unknown objective {name!r}; choose 'sit' or 'jit'")
