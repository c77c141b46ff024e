"""The train step: one optimizer step of the trained parts, used by the trainer and perf/bench_step.py.

`TrainStep(batch, index)`: the run's recipe draws every random number of the step for the
whole batch (from a generator seeded by (seed, rank, step), so a resumed run repeats an
uninterrupted one exactly), the batch is cut into micro-batches (gradients accumulate,
each micro-batch's loss weighted by its share, so the result is the batch mean whatever
the micro-batch size), then unscale / clip / learning rate / optimizer / loss scale / EMA.
No host sync: everything returned stays on the device.

A recipe that trains several parts in its own order (Recipe.make_step) builds its step from
the pieces here: `parts`, `generator`, `slices`, `features`, `autocast`, `grad_sync`,
`backward`, `optimizer_step`.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from irepa.train import parallelize
from irepa.train.loss_scale import LossScaler


UPDATE = "irepa.optimizer_step"
"""the profiler label of a part's update (unscale, clip, optimizer, EMA)"""


@dataclass
class Part:
    """A trained part: what the step optimizes and a checkpoint stores (irepa.train.checkpoint)."""

    module: nn.Module
    """the trained tree (FSDP shards it in place)"""
    train_module: nn.Module
    """what the forward calls: `module`, compiled blocks inside, or its DDP wrapper"""
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    """the optimizer's parameters, in its order"""
    base_lr: float
    ema: object = None
    """irepa.train.ema.EMA / ShardedEMA, or None"""
    ema_target: nn.Module | None = None
    """the sub-tree the EMA averages (default: module)"""
    grad_clip: float | None = None
    parallel: str = "none"
    """none | ddp | fsdp: how gradients are synchronized"""


def slice_tree(tree, s: slice):
    """Rows `s` of every tensor in a dict / list of [B, ...] tensors (other values as they are)."""
    if torch.is_tensor(tree):
        return tree[s]
    if isinstance(tree, dict):
        return {k: slice_tree(v, s) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(slice_tree(v, s) for v in tree)
    return tree


class TrainStep:
    def __init__(self, recipe, parts: dict[str, Part], *, features: Callable[[dict], list[torch.Tensor]],
                 micro_batch: int, amp_dtype: torch.dtype | None, scaler: LossScaler, align_weight: float,
                 warmup_steps: int, seed: int, rank: int, device: torch.device,
                 autocast: Callable[[torch.dtype], AbstractContextManager] | None = None):
        self.recipe, self.parts = recipe, parts
        self.features = features
        """batch (slice) -> alignment targets: stored features, or the online encoders run on its images"""
        self.micro_batch, self.amp_dtype, self.scaler = micro_batch, amp_dtype, scaler
        self.autocast_fn = autocast or (lambda dtype: torch.autocast(device.type, dtype))
        """dtype -> the autocast context of the forward passes (perf/roofline: CUDA's policy on fake CPU tensors)"""
        self.align_weight, self.warmup_steps = align_weight, warmup_steps
        self.seed, self.rank, self.device = seed, rank, device
        self.grad_norms: dict[str, torch.Tensor] = {}
        """each part's gradient norm of the last step (by part name; 0 for an fp16 step the loss scaler
        skipped), on the device: the trainer's finite check reads them without a sync"""

    # -- pieces ---------------------------------------------------------------------------
    def generator(self, step: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_033 + step)
        return g

    def lr(self, part: Part, step: int) -> float:
        w = self.warmup_steps
        return part.base_lr * min(1.0, (step + 1) / w) if w > 0 else part.base_lr

    def slices(self, batch_size: int) -> list[slice]:
        m = self.micro_batch
        return [slice(start, min(start + m, batch_size)) for start in range(0, batch_size, m)]

    def autocast(self):
        return self.autocast_fn(self.amp_dtype) if self.amp_dtype else nullcontext()

    def grad_sync(self, part: Part, enabled: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        if part.parallel == "ddp":
            return nullcontext() if enabled else part.train_module.no_sync()
        if part.parallel == "fsdp":
            part.module.set_requires_gradient_sync(enabled)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale_loss(loss).backward()

    def optimizer_step(self, part: Part, step: int, update_scale: bool = True) -> torch.Tensor:
        """Unscale (fp16: an overflow on any rank skips the step), clip, set the lr, step, zero the
        gradients, update the EMA; returns the gradient norm before clipping. Marked for profilers
        (record_function UPDATE: perf/roofline counts what runs inside as the update)."""
        with torch.profiler.record_function(UPDATE):
            return self._optimizer_step(part, step, update_scale)

    def _optimizer_step(self, part: Part, step: int, update_scale: bool) -> torch.Tensor:
        ok = self.scaler.unscale_and_check(part.params)
        clip = part.grad_clip
        grad_norm = parallelize.clip_grad_norm_(part.params, clip if clip else math.inf)
        for group in part.optimizer.param_groups:
            group["lr"] = self.lr(part, step)
        if ok:
            part.optimizer.step()
        name = next((n for n, p in self.parts.items() if p is part), "?")
        self.grad_norms[name] = grad_norm if ok else torch.zeros_like(grad_norm)
        if update_scale:
            self.scaler.update(ok)
        part.optimizer.zero_grad(set_to_none=True)
        if part.ema is not None:
            part.ema.update(part.ema_target if part.ema_target is not None else part.module)
        return grad_norm

    # -- the default step: the diffusion model and its projectors, one optimizer ---------------
    def __call__(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        part = self.parts["model"]
        draws = self.recipe.draw(batch, self.generator(step))  # every random draw, once for the whole batch
        B = batch["y"].shape[0]
        totals: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
        for s in self.slices(B):
            mb = slice_tree(batch, s)
            feats = self.features(mb)
            with self.grad_sync(part, s.stop == B):
                with self.autocast():
                    denoise, align, logs = part.train_module(mb, slice_tree(draws, s), feats)
                share = (s.stop - s.start) / B
                self.backward((denoise + self.align_weight * align) * share)
            totals.append((denoise.detach() * share, align.detach() * share,
                           {k: v.detach() * share for k, v in logs.items()}))
        denoise, align = sum(t[0] for t in totals), sum(t[1] for t in totals)
        logs = {k: sum(t[2][k] for t in totals) for k in totals[0][2]}
        loss = denoise + self.align_weight * align
        grad_norm = self.optimizer_step(part, step)
        return {"loss": loss.detach(), "denoise": denoise.detach(), "align": align.detach(), "grad_norm": grad_norm,
                **logs}
