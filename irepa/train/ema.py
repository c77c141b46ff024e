"""Exponential moving averages of the model weights, kept in fp32 outside the trained tree."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """One or more EMA copies of `model` (DiT convention: ema = d * ema + (1 - d) * param).

    buffers=True also averages the floating-point buffers with the same decay and copies
    the others (integer counters), as REPA-E's EMA does for the latent BatchNorm's running
    statistics; otherwise buffers keep the values they had when the EMA was made.
    """

    def __init__(self, model: nn.Module, decays: list[float], buffers: bool = False):
        self.decays = list(decays)
        self.buffers = buffers
        self.models = []
        for _ in self.decays:
            m = copy.deepcopy(model).float().eval().requires_grad_(False)
            self.models.append(m)
        self._src = [p for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in model.parameters()]
        for d, m in zip(self.decays, self.models):
            torch._foreach_lerp_(list(m.parameters()), params, 1.0 - d)
        if self.buffers:
            src = list(model.buffers())
            for d, m in zip(self.decays, self.models):
                for e, b in zip(m.buffers(), src):
                    if e.is_floating_point():
                        e.lerp_(b.detach().to(e.dtype), 1.0 - d)
                    else:
                        e.copy_(b)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [m.state_dict() for m in self.models]

    def load_state_dicts(self, sds: list[dict[str, torch.Tensor]]) -> None:
        if len(sds) != len(self.models):
            raise ValueError(f"checkpoint has {len(sds)} EMA models, config asks for {len(self.models)}")
        for m, sd in zip(self.models, sds):
            m.load_state_dict(sd)
