"""Denoising objectives: `loss(model, x, y, generator, drop_mask) -> (loss, hidden)`.

Each objective also splits into its two halves, so a batch can be cut into micro-batches
without changing the random draws:
  draws = objective.draw(x, generator)                  # (t [B], noise like x), once per batch
  objective.loss(model, x[s], y[s], draws[s], drop[s])  # per micro-batch
`objective(model, x, y, generator, drop_mask)` is `loss(..., draw(x, generator), ...)`.
The trainer adds the alignment term on `hidden`; a new diffusion family plugs in here
by registering its objective, not by rewriting the loop.
"""
from __future__ import annotations

import torch

from irepa import transport

Draws = tuple[torch.Tensor, torch.Tensor]  # (t [B], noise [B, ...])


class Objective:
    """Base: subclasses define `draw` and `loss`."""

    def draw(self, x: torch.Tensor, generator: torch.Generator | None) -> Draws:
        raise NotImplementedError

    def loss(self, model, x, y, draws: Draws, drop_mask) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, model, x, y, generator, drop_mask):
        return self.loss(model, x, y, self.draw(x, generator), drop_mask)


def slice_draws(draws: Draws, s: slice) -> Draws:
    return draws[0][s], draws[1][s]


class SiTObjective(Objective):
    """Flow matching on x_t = (1 - t) x + t e with the velocity target e - x (SPEC.md section 3)."""

    def __init__(self, time_sampling: str = "uniform"):
        transport.sample_time(1, time_sampling)  # validates the name now, not at step 0
        self.time_sampling = time_sampling

    def draw(self, x, generator):
        t = transport.sample_time(x.shape[0], self.time_sampling, generator=generator, device=x.device)
        return t, torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def loss(self, model, x, y, draws, drop_mask):
        t, noise = draws
        pred, hidden = model(transport.interpolate(x, noise, t), t, y, drop_mask)
        return transport.denoising_loss(pred, transport.velocity_target(x, noise)), hidden


def sit_objective(time_sampling: str = "uniform") -> SiTObjective:
    return SiTObjective(time_sampling)


def build_objective(name: str, time_sampling: str = "uniform") -> Objective:
    if name == "sit":
        return sit_objective(time_sampling)
    if name == "jit":
        from .objective_jit import jit_objective
        return jit_objective()
    raise ValueError(f"unknown objective {name!r}; choose 'sit' or 'jit'")
