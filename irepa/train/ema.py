"""Exponential moving averages of trained weights, kept in fp32 outside the trained tree.

`EMA` holds full copies (one process, DDP); `ShardedEMA` holds, under FSDP2, fp32 copies of
exactly the parameter shards this rank owns, with the trained DTensors' layout, and updates
them with no communication. Checkpoints save those as sharded DTensors through
torch.distributed.checkpoint, so a full EMA exists only when one is asked for
(`full_state_dict`, sampling, `python -m irepa.train.export RUN`); keeping a full copy on
rank 0 instead would cost an all-gather of the whole model every step.

Both follow DiT: ema = d * ema + (1 - d) * param, and average the persistent floating-point
buffers the same way (BatchNorm running statistics, as REPA-E's EMA does); integer buffers
(BatchNorm's batch count) are copied. Non-persistent buffers (fixed tables) are left alone.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from irepa.train.parallelize import clean_name


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the buffers the state dict holds, in state-dict order."""
    out = []
    for prefix, mod in model.named_modules():
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out.append((clean_name(f"{prefix}.{name}" if prefix else name), b))
    return out


@torch.no_grad()
def _average_buffers(dst: list[torch.Tensor], src: list[torch.Tensor], decay: float) -> None:
    for d, s in zip(dst, src):
        if d.is_floating_point():
            d.lerp_(s.to(d.dtype), 1.0 - decay)
        else:
            d.copy_(s)


class EMA:
    """One or more EMA copies of `model`."""

    def __init__(self, model: nn.Module, decays: list[float]):
        self.decays = list(decays)
        self.models = [_fp32_copy(model).eval().requires_grad_(False) for _ in self.decays]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in model.parameters()]
        bufs = [b for _, b in persistent_buffers(model)]
        for d, m in zip(self.decays, self.models):
            torch._foreach_lerp_(list(m.parameters()), params, 1.0 - d)
            if bufs:
                _average_buffers([b for _, b in persistent_buffers(m)], bufs, d)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """Every copy's persistent buffers := `model`'s: state a recipe sets outside the optimizer
        (REPA-E's latent statistics at step 0) starts the average where the model starts."""
        src = [b for _, b in persistent_buffers(model)]
        for m in self.models:
            for d, s in zip([b for _, b in persistent_buffers(m)], src):
                d.copy_(s)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [m.state_dict() for m in self.models]

    def load_state_dicts(self, sds: list[dict[str, torch.Tensor]]) -> None:
        if len(sds) != len(self.models):
            raise ValueError(f"checkpoint has {len(sds)} EMA models, config asks for {len(self.models)}")
        for m, sd in zip(self.models, sds):
            m.load_state_dict(sd)


def _fp32_copy(model: nn.Module) -> nn.Module:
    """A deep copy in fp32; an fp32 model is copied as it is (fake tensors, perf/roofline's trace,
    cannot go through the conversion pass, which would change nothing)."""
    out = copy.deepcopy(model)
    tensors = [*out.parameters(), *out.buffers()]
    return out.float() if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors) else out


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedEMA:
    """EMA of an FSDP2-sharded model, shard-local (the interface of `EMA`).

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
        self.buffers = [{n: _local(b).detach().clone() for n, b in persistent_buffers(model)} for _ in self.decays]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [_local(p).detach() for p in model.parameters()]
        params = [p.float() if p.dtype != torch.float32 else p for p in params]
        bufs = [_local(b) for _, b in persistent_buffers(model)]
        for d, shards, own in zip(self.decays, self.shards, self.buffers):
            torch._foreach_lerp_(shards, params, 1.0 - d)
            if bufs:
                _average_buffers(list(own.values()), bufs, d)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """As EMA.copy_buffers: every copy's (full) buffers := `model`'s, by name."""
        src = {n: _local(b) for n, b in persistent_buffers(model)}
        for own in self.buffers:
            for n, b in own.items():
                b.copy_(src[n])

    def _dtensor(self, j: int, local: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor
        meta = self._meta[j]
        if meta is None:
            return local
        mesh, placements, shape, stride = meta
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Sharded state dicts (DTensors over the local shards): what torch.distributed.checkpoint saves."""
        return [{**{n: self._dtensor(j, s) for j, (n, s) in enumerate(zip(self.names, shards))}, **own}
                for shards, own in zip(self.shards, self.buffers)]

    def load_state_dicts(self, sds: list[dict[str, torch.Tensor]]) -> None:
        """Load sharded (DTensor) or full state dicts; a full tensor is cut to this rank's shard."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        if len(sds) != len(self.shards):
            raise ValueError(f"checkpoint has {len(sds)} EMA models, config asks for {len(self.shards)}")
        with torch.no_grad():
            for shards, own, sd in zip(self.shards, self.buffers, sds):
                missing = [n for n in self.names if n not in sd]
                if missing:
                    raise ValueError(f"EMA state dict lacks {missing[:5]}")
                for j, (n, s) in enumerate(zip(self.names, shards)):
                    v = sd[n]
                    if not isinstance(v, DTensor) and self._meta[j] is not None:
                        mesh, placements, _, _ = self._meta[j]
                        v = distribute_tensor(v.to(s.device), mesh, placements, src_data_rank=None)
                    s.copy_(_local(v))
                for n, b in own.items():
                    if n in sd:
                        b.copy_(_local(sd[n]))

    def full_state_dict(self, i: int = 0) -> dict[str, torch.Tensor]:
        """Collective (every rank must call it): EMA i as full tensors, on every rank."""
        sd = {}
        for j, (n, s) in enumerate(zip(self.names, self.shards[i])):
            t = self._dtensor(j, s)
            sd[n] = t.full_tensor() if self._meta[j] is not None else t
        return {**sd, **self.buffers[i]}


def make_ema(model: nn.Module, decays: list[float], sharded: bool):
    """Shard-local under FSDP (build it after sharding), else full copies (build it before wrapping)."""
    return ShardedEMA(model, decays) if sharded else EMA(model, decays)
