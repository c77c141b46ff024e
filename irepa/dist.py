"""Rank, world size and device: one place for the setup every entry point needs.

`setup(device)` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), picks the
device ("auto": the local rank's GPU, else the CPU), makes it current and starts the process
group (NCCL on GPUs, gloo on CPUs) when there are several ranks. The helpers below work the
same with and without a process group (one process: rank 0 of 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from irepa.errors import InputError, UserError


@dataclass(frozen=True)
class Setup:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """"auto" -> cuda:<local rank> when a GPU is visible, else cpu; a CUDA device becomes current."""
    if name == "auto":
        local = env()[1] if local_rank is None else local_rank
        name = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(dev)
    return dev


def setup(device: str = "auto", backend: str | None = None, timeout: timedelta | None = None) -> Setup:
    """Read the ranks, pick the device and, with several ranks, start the process group.
    timeout: how long a collective waits for the slowest rank (torch's default: 10 min NCCL, 30 min gloo)."""
    rank, local, world = env()
    check_restartable()
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), timeout=timeout)
    return Setup(rank, local, world, dev)


def check_restartable() -> None:
    """Refuse torchrun restarts (--max-restarts) across several nodes with the rendezvous store shared
    with the workers (torch's default): the agents count restarts apart (one after its failed worker,
    another after the membership change only), so the new group can meet the old group's keys in that
    store and its start hangs or fails (pytorch/pytorch#135712; seen here with a killed rank)."""
    e = os.environ
    if (int(e.get("GROUP_WORLD_SIZE", "1")) > 1 and int(e.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and e.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        raise InputError("torchrun --max-restarts on several nodes needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                         "the environment of every node's torchrun (else a restart can hang at the start of the new "
                         "process group, pytorch/pytorch#135712); launch/slurm.sh sets it")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] without a process group)."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class RankFailed(UserError, RuntimeError):
    """Another rank failed: raised on the ranks that did not, with that rank's message."""


def on_every_rank(fn):
    """fn() on each rank; with several ranks, a failure on any ends every rank (collective: each calls it).

    The failing rank raises its own error (a bug keeps its traceback); the others raise RankFailed
    with the first failing rank's message, so rank 0 prints the cause of a user error as its one line
    and no rank is left waiting in a collective for a peer that exited. fn itself must not call
    collectives (a rank that failed early would never reach them)."""
    err, out = None, None
    try:
        out = fn()
    except Exception as e:
        err = e
    if rank_world()[1] > 1:
        seen = all_gather_object(None if err is None else (isinstance(err, UserError), str(err)))
        failed = [(r, s) for r, s in enumerate(seen) if s is not None]
        if failed and err is None:
            r, (user, msg) = failed[0]
            raise RankFailed(msg if user else f"rank {r} failed: {msg}")
    if err is not None:
        raise err
    return out


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
