"""Stopping a run on a signal at the same step boundary on every rank, with a normal checkpoint.

SIGTERM / SIGINT / SIGUSR1 (a scheduler's preemption warning, torchrun forwarding its own
shutdown, ^C) only set a flag: a handler that checkpointed itself could run in the middle of a
step or of a collective. The loop asks `requested()` after each step; the ranks agree on it
with an all-reduce of the flag, so a signal that reaches rank 0 during step k and rank 1 after
it still stops both after the same step (one rank stopping alone would leave the others waiting
in the next step's collectives). The all-reduce runs on a CPU tensor over gloo (a side group
under NCCL), so it never waits for the GPU.

A run stopped this way exits with PREEMPTED (75, EX_TEMPFAIL: "try again"): launch/slurm.sh
requeues the job on it, and a rerun of the same command resumes from the checkpoint.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

import torch
import torch.distributed as dist

PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    def __init__(self, world: int):
        self.signum = 0
        self._group = None
        if world > 1 and dist.get_backend() != "gloo":  # collective: every rank builds it at start
            self._group = dist.new_group(backend="gloo")
        self._world = world

    def _on_signal(self, signum, frame):
        self.signum = signum

    @contextmanager
    def handlers(self):
        """STOP_SIGNALS set the flag while the block runs; the previous handlers come back after it."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def requested(self) -> int:
        """The signal that asks every rank to stop now (0: none); collective with several ranks."""
        if self._world == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag)
