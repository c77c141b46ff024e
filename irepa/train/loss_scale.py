"""Dynamic loss scaling for fp16 training, consistent across ranks under DDP and FSDP2.

fp16 gradients below ~6e-8 flush to zero, so the loss is multiplied by a scale S before
the backward and the gradients divided by S before clipping and the optimizer step. A
step whose gradients hold an inf or NaN on any rank is skipped on every rank and S is
halved; after `growth_interval` clean steps S doubles (torch.amp.GradScaler's policy).

Why not torch.amp.GradScaler: under FSDP2 each rank sees only its gradient shards, so the
overflow flag must be all-reduced before the skip decision, or ranks would diverge. This
scaler works on the local shards (DTensor.to_local) and all-reduces the flag. The skip
decision costs one host sync per step, in fp16 runs only; bf16 and fp32 runs use the
disabled scaler, whose methods do nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_and_check(self, params: list[torch.Tensor]) -> bool:
        """Divide the gradients by the scale in place; True when the step may be taken (all finite on all ranks)."""
        if not self.enabled:
            return True
        grads = [_local(p.grad) for p in params if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        found_inf = torch.zeros(1, device=device)
        inv = torch.full((1,), 1.0 / self.scale, device=device)
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            by_key.setdefault((g.device, g.dtype), []).append(g)
        for (dev, _), gs in by_key.items():
            flag = torch.zeros(1, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(gs, flag, inv.to(dev))
            found_inf = torch.maximum(found_inf, flag.to(device))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        return not bool(found_inf.item())

    def update(self, ok: bool) -> None:
        if not self.enabled:
            return
        if not ok:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps} if self.enabled else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
