"""How many samples one forward/backward can hold: the micro-batch planner.

SiT-XL/2 at batch 256 saves about 97 GiB of activations for its backward (eager, bf16
autocast), more than one 80 GB H100 has, so a one-GPU run of the published batch must
accumulate gradients over micro-batches. `plan_micro_batch` picks the largest divisor of
the per-rank batch whose activations fit the device's memory, from a measurement rather
than a guess: one forward of the trained tree on fake tensors (no memory, no FLOPs) at two
batch sizes, counting the bytes autograd saves for the backward (each storage once). The
fit saved(n) = fixed + per_sample * n separates batch-independent tensors (weights cast
for autocast) from activations.

The count is what eager autograd keeps; torch.compile's partitioner usually saves less
(it recomputes cheap pointwise ops), so the plan errs on the safe side. Activation
checkpointing, when applied before the plan, is seen as such: the checkpointed blocks
save only their inputs.

Static memory per rank: what the device already holds (model and encoders on it) plus
gradients, AdamW's two moments and the fp32 EMA copies, all fp32, divided by the world
size under FSDP. Planning happens before sharding and compiling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int
    batch: int
    per_sample_bytes: int
    fixed_bytes: int
    static_bytes: int
    budget_bytes: int | None
    """device memory the plan may use (None: no limit known, e.g. CPU)"""

    @property
    def accum_steps(self) -> int:
        return self.batch // self.micro_batch

    def describe(self) -> str:
        gib = 2 ** 30
        fit = (f"budget {self.budget_bytes / gib:.1f} GiB" if self.budget_bytes is not None else "no device limit")
        return (f"micro-batch {self.micro_batch} x {self.accum_steps} of a per-rank batch of {self.batch} "
                f"(activations {self.per_sample_bytes / 2**20:.1f} MiB/sample + {self.fixed_bytes / gib:.2f} GiB "
                f"fixed, static {self.static_bytes / gib:.1f} GiB, {fit})")


def saved_bytes(fn, *args) -> int:
    """Bytes autograd saves for the backward while `fn(*args)` runs, each storage counted once."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        st = t.untyped_storage()
        key = st._cdata
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def measure_activations(forward, make_inputs, sizes: tuple[int, int] = (1, 2)) -> tuple[int, int]:
    """(fixed, per_sample) bytes from `forward(*make_inputs(n))` on fake tensors at two batch sizes.

    `make_inputs(n)` builds the inputs (called inside the fake mode, so it allocates nothing);
    the module's real parameters are turned into fake ones on the way in.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    counts = []
    for n in sizes:
        try:
            with FakeTensorMode(allow_non_fake_inputs=True):
                counts.append(saved_bytes(forward, *make_inputs(n)))
        except Exception as e:  # e.g. a third-party kernel without a fake (meta) implementation
            raise RuntimeError(f"the micro-batch planner could not run the forward on fake tensors ({type(e).__name__}: "
                               f"{e}); set train.micro_batch_size (bench_step: --micro_batch) by hand") from e
    (n0, n1), (c0, c1) = sizes, counts
    per_sample = max(0, (c1 - c0) // (n1 - n0))
    return max(0, c0 - per_sample * n0), per_sample


def static_bytes(trainable: nn.Module, n_ema: int, world_size: int, sharded: bool, device: torch.device) -> int:
    """Memory held across the step besides activations (see the module docstring)."""
    p = sum(t.numel() for t in trainable.parameters() if t.requires_grad) * 4
    extra = p * (1 + 2 + n_ema)  # grads, AdamW exp_avg / exp_avg_sq, EMA copies (fp32)
    if device.type == "cuda":
        held = torch.cuda.memory_allocated(device)
    else:
        held = sum(t.numel() * t.element_size() for t in trainable.parameters())
    if sharded and world_size > 1:
        return held - p + (p + extra) // world_size
    return held + extra


def device_budget(device: torch.device, fraction: float) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory * fraction)


def choose_micro_batch(batch: int, per_sample: int, fixed: int, static: int, budget: int | None) -> int:
    """Largest divisor of `batch` whose activations fit `budget - static - fixed` (all of it if no budget)."""
    if budget is None or per_sample == 0:
        return batch
    room = budget - static - fixed
    fits = [d for d in range(1, batch + 1) if batch % d == 0 and d * per_sample <= room]
    if not fits:
        raise MemoryError(
            f"one sample needs {per_sample / 2**30:.2f} GiB of activations but only {max(room, 0) / 2**30:.2f} GiB "
            f"is left of the {budget / 2**30:.1f} GiB budget after {static / 2**30:.1f} GiB of weights, gradients, "
            "optimizer and EMA state; enable train.activation_checkpointing, shard over more GPUs (FSDP) or "
            "raise train.memory_budget_gib")
    return max(fits)


def plan_micro_batch(forward, make_inputs, batch: int, static: int, device: torch.device,
                     budget: int | None = None, fraction: float = 0.9) -> MemoryPlan:
    """`budget` in bytes; None = `fraction` of the GPU's memory (no limit on CPU)."""
    fixed, per_sample = measure_activations(forward, make_inputs)
    budget = device_budget(device, fraction) if budget is None else budget
    micro = choose_micro_batch(batch, per_sample, fixed, static, budget)
    return MemoryPlan(micro, batch, per_sample, fixed, static, budget)


def plan_train_step(net, recipe, encoder_dims: list[int], amp_dtype: torch.dtype | None, batch: int, static: int,
                    device: torch.device, budget: int | None = None, autocast=None) -> MemoryPlan:
    """The plan for a trained tree (irepa.train.build.AlignedDiffusion): one forward of the recipe's
    draws and loss plus the alignment head, on fake inputs of the model's shape, under the step's
    autocast (`autocast(dtype)`, default torch.autocast on `device`): irepa.train.assemble plans
    every run this way."""
    from contextlib import nullcontext

    autocast = autocast or (lambda dtype: torch.autocast(device.type, dtype))

    model = net.model
    C, S = model.in_channels, model.input_size

    def make_inputs(n):
        batch = {"x": torch.randn(n, C, S, S, device=device), "y": torch.zeros(n, dtype=torch.long, device=device)}
        return batch, [torch.randn(n, model.num_tokens, d, device=device, dtype=torch.bfloat16) for d in encoder_dims]

    def forward(batch, feats):
        with autocast(amp_dtype) if amp_dtype else nullcontext():
            net(batch, recipe.draw(batch, None), feats)

    return plan_micro_batch(forward, make_inputs, batch, static, device, budget)
