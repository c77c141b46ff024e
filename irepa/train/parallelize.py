"""The ordered parallelize step: activation checkpointing -> compile per block -> FSDP2 or DDP.

Small `apply_*` steps applied in that order to the trained tree (`AlignedDiffusion`: the
diffusion model and its projectors); `parallelize(net, ...)` returns the module the train
step calls. What stays outside the trained tree:
- the frozen encoders (run online in the step, or not at all when features are stored):
  they never get gradients, so sharding them would only add all-gathers;
- the EMA copies (irepa.train.ema; shard-local under FSDP).

Compile is applied to each block's `forward` in place, so parameter names (checkpoint
keys, EMA names) do not change and FSDP's hooks run outside the compiled graphs; the
Triton kernels (fused adaLN, fused alignment loss) are torch.library custom ops and stay
inside them. FSDP2 uses MixedPrecisionPolicy(param = the autocast dtype, reduce = fp32);
the step still runs under autocast, so forward inputs are not cast (norms and the
alignment cosine keep computing in fp32 as in the single-device run).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

MODES = ("auto", "none", "ddp", "fsdp")
_AC_PREFIX = "_checkpoint_wrapped_module."


def resolve_mode(mode: str, world_size: int) -> str:
    """auto -> fsdp with several ranks, none with one. ddp/fsdp need a process group."""
    if mode not in MODES:
        raise ValueError(f"train.parallel must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "fsdp" if world_size > 1 else "none"
    if mode in ("ddp", "fsdp") and world_size == 1:
        return "none"  # one rank: the plain module is the same computation, and single-file checkpoints
    if mode == "none" and world_size > 1:
        raise ValueError(f"train.parallel='none' with {world_size} ranks would train {world_size} unrelated "
                         "models; use ddp or fsdp")
    return mode


def clean_name(fqn: str) -> str:
    """Parameter name without wrapper prefixes (activation checkpointing, torch.compile)."""
    return fqn.replace(_AC_PREFIX, "").replace("_orig_mod.", "")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in the backward. State-dict keys stay the same (the wrapper's hooks strip its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i, blk in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(blk)


def apply_compile(model: nn.Module, mode: str = "default", backend: str = "inductor") -> None:
    """torch.compile each block's forward (fullgraph); blocks of one shape share one graph.

    dynamic=False: JiT's blocks after the in-context tokens see a longer sequence; a static
    graph per length beats the symbolic-length graph dynamo would otherwise compile after
    the first mismatch. backend "aot_eager" captures the same graphs (dynamo + AOT autograd)
    and runs them eagerly, without Inductor's code generation (tests)."""
    kw = {"mode": mode} if backend == "inductor" else {}
    for blk in model.blocks:
        blk.forward = torch.compile(blk.forward, fullgraph=True, dynamic=False, backend=backend, **kw)


def broadcast_from_rank0(module: nn.Module) -> None:
    """Make every rank start from rank 0's weights (FSDP, unlike DDP, does not do this)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def apply_fsdp(net: nn.Module, device: torch.device, param_dtype: torch.dtype | None,
               reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """FSDP2: fully_shard each block, then the root (embedders, final layer, projectors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for blk in net.model.blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    # the root is needed right again at the start of the backward: keep it gathered
    fully_shard(net, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return net


def apply_ddp(net: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device.type != "cuda":
        return DDP(net)
    return DDP(net, device_ids=[device.index if device.index is not None else torch.cuda.current_device()])


def parallelize(net: nn.Module, mode: str, device: torch.device, *, compile: bool = False,
                param_dtype: torch.dtype | None = None, compile_mode: str = "default",
                compile_scope: str = "blocks") -> nn.Module:
    """Compile per block -> FSDP2 / DDP; returns the module the train step calls (net itself for none/fsdp).

    compile_scope "model" compiles the whole tree in one graph instead, as reference
    implementations do (perf/bench_step.py's baseline; one process only). Activation
    checkpointing, when asked for, is applied before (irepa.train.assemble, ahead of the
    micro-batch planner, which then counts its savings)."""
    if compile and compile_scope == "model":
        if mode != "none":
            raise ValueError(f"compile_scope 'model' runs in one process, not under {mode}")
        return torch.compile(net, mode=compile_mode)
    if compile:
        apply_compile(net.model, compile_mode)
    if mode == "fsdp":
        broadcast_from_rank0(net)
        return apply_fsdp(net, device, param_dtype)
    if mode == "ddp":
        return apply_ddp(net, device)
    return net


def compile_encoders(encoders: list[nn.Module]) -> None:
    """Frozen online encoders: compiled for speed, never sharded or wrapped."""
    for enc in encoders:
        enc.forward = torch.compile(enc.forward)


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global grad-norm clipping that also works on FSDP's sharded DTensor grads; returns the norm."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm else math.inf, total, foreach=True)
    return total
