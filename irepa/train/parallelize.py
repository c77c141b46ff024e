"""The ordered parallelize step: activation checkpointing -> compile per block -> FSDP2 or DDP.

`parallelize(net, ...)` applies small `apply_*` steps in that order to the trained tree
(`DiffusionWithAlignment`: the diffusion model and its projectors) and returns the module
the train step calls. What stays outside the trained tree:
- the frozen encoders (run online in the step, or not at all when features are stored):
  they never get gradients, so sharding them would only add all-gathers;
- the EMA copies. Under FSDP they are shard-local (`ShardedEMA`): each rank keeps fp32
  copies of exactly the parameter shards it owns, with the trained DTensors' layout, and
  updates them with no communication. Checkpoints save them as sharded DTensors through
  torch.distributed.checkpoint, so a full EMA exists only when one is asked for
  (`full_state_dict`, sampling, `python -m irepa.train.export RUN`). Keeping a full copy
  on rank 0 instead would cost an all-gather of the whole model every step.

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


def apply_compile(model: nn.Module, mode: str = "default") -> None:
    """torch.compile each block's forward (fullgraph); blocks of one shape share one graph.

    dynamic=False: JiT's blocks after the in-context tokens see a longer sequence; a static
    graph per length beats the symbolic-length graph dynamo would otherwise compile after
    the first mismatch."""
    for blk in model.blocks:
        blk.forward = torch.compile(blk.forward, fullgraph=True, dynamic=False, mode=mode)


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
                activation_checkpointing: bool = False, param_dtype: torch.dtype | None = None,
                compile_mode: str = "default") -> nn.Module:
    """Apply the steps in order; returns the module the train step calls (net itself for none/fsdp)."""
    if activation_checkpointing:
        apply_activation_checkpointing(net.model)
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


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global grad-norm clipping that also works on FSDP's sharded DTensor grads; returns the norm."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm else math.inf, total, foreach=True)
    return total


class ShardedEMA:
    """EMA of an FSDP2-sharded model, shard-local (same interface as irepa.train.ema.EMA).

    `shards[i][j]` is rank-local fp32 storage for parameter j of EMA i, laid out like the
    trained parameter's local shard, so `update` is a foreach lerp with no communication.
    Persistent buffers are not sharded by FSDP and are kept as full copies.
    """

    def __init__(self, model: nn.Module, decays: list[float]):
        from torch.distributed.tensor import DTensor
        self.decays = list(decays)
        named = list(model.named_parameters())
        self.names = [clean_name(n) for n, _ in named]
        self._meta = [(p.device_mesh, p.placements, p.shape, p.stride()) if isinstance(p, DTensor) else None
                      for _, p in named]
        self.shards = [[_local(p).detach().float().clone() for _, p in named] for _ in self.decays]
        pnames = set(self.names)
        self.buffers = {clean_name(k): _local(v).detach().clone() for k, v in model.state_dict().items()
                        if clean_name(k) not in pnames}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [_local(p).detach() for p in model.parameters()]
        params = [p.float() if p.dtype != torch.float32 else p for p in params]
        for d, shards in zip(self.decays, self.shards):
            torch._foreach_lerp_(shards, params, 1.0 - d)

    def _dtensor(self, j: int, local: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor
        meta = self._meta[j]
        if meta is None:
            return local
        mesh, placements, shape, stride = meta
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Sharded state dicts (DTensors over the local shards): what torch.distributed.checkpoint saves."""
        return [{**{n: self._dtensor(j, s) for j, (n, s) in enumerate(zip(self.names, shards))}, **self.buffers}
                for shards in self.shards]

    def load_state_dicts(self, sds: list[dict[str, torch.Tensor]]) -> None:
        """Load sharded (DTensor) or full state dicts; a full tensor is cut to this rank's shard."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        if len(sds) != len(self.shards):
            raise ValueError(f"checkpoint has {len(sds)} EMA models, config asks for {len(self.shards)}")
        with torch.no_grad():
            for shards, sd in zip(self.shards, sds):
                missing = [n for n in self.names if n not in sd]
                if missing:
                    raise ValueError(f"EMA state dict lacks {missing[:5]}")
                for j, (n, s) in enumerate(zip(self.names, shards)):
                    v = sd[n]
                    if not isinstance(v, DTensor) and self._meta[j] is not None:
                        mesh, placements, _, _ = self._meta[j]
                        v = distribute_tensor(v.to(s.device), mesh, placements, src_data_rank=None)
                    s.copy_(_local(v))
                for n, b in self.buffers.items():
                    if n in sd:
                        b.copy_(_local(sd[n]))

    def full_state_dict(self, i: int = 0) -> dict[str, torch.Tensor]:
        """Collective (every rank must call it): EMA i as full tensors, on every rank."""
        sd = {}
        for j, (n, s) in enumerate(zip(self.names, self.shards[i])):
            t = self._dtensor(j, s)
            sd[n] = t.full_tensor() if self._meta[j] is not None else t
        return {**sd, **self.buffers}


def make_ema(model: nn.Module, decays: list[float], mode: str):
    """The EMA for a parallel mode: shard-local under FSDP (build after sharding), else full copies."""
    if mode == "fsdp":
        return ShardedEMA(model, decays)
    from irepa.train.ema import EMA
    return EMA(model, decays)
