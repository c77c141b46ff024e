"""Faults injected into a trainer through its loader (the production loop has no test hook).

    tr.run.data.loader = Interrupt(tr.run.data.loader, 5, crash)          # dies before batch 5 is handed out
    tr.run.data.loader = Interrupt(tr.run.data.loader, 2, nan_into("x"))  # batch 2 (step 3) holds a NaN latent

Run as a script (under torchrun), it trains with a NaN put into one rank's batch, or with one
rank killed by SIGKILL before a batch on the group's first start (torchrun's restart then runs
clean), for the multi-rank fault tests; each rank prints `[rank R] <error>` on stdout before it
exits with it:

    torchrun --nproc_per_node=2 tests/interrupts.py --nan_rank 1 --nan_at 2 --nan_key x [config overrides]
    torchrun --max-restarts 1 ... tests/interrupts.py --kill_rank 1 --kill_at 3 [config overrides]
"""
from __future__ import annotations

import os
import signal

from irepa.recipes import DEFAULT_PRESET


class Interrupt:
    """A trainer's loader, with `action()` run before batch `at` (0-based) is handed out; an action
    made by `nan_into` (edits_batch) instead returns the batch that is handed out in its place."""

    def __init__(self, loader, at: int, action):
        self.loader, self.at, self.action = loader, at, action

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.at:
                if getattr(self.action, "edits_batch", False):
                    batch = self.action(batch)
                else:
                    self.action()
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


class Crash(Exception):
    """A process killed mid-step, as a test can catch it."""


def crash():
    raise Crash("killed")


def nan_into(key: str):
    """An action that hands out the batch with a NaN in the first element of batch[key] (a copy)."""
    def edit(batch: dict) -> dict:
        t = batch[key].clone()
        t.view(-1)[0] = float("nan")
        return {**batch, key: t}

    edit.edits_batch = True
    return edit


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _train_with_fault(nan_rank: int = -1, nan_at: int = 0, nan_key: str = "x", kill_rank: int = -1, kill_at: int = 0,
                      preset: str = DEFAULT_PRESET, **overrides):
    from irepa.recipes import resolve
    from irepa.train.trainer import Trainer
    trainer = Trainer(resolve(preset, overrides))
    if trainer.run.rank == nan_rank:
        trainer.run.data.loader = Interrupt(trainer.run.data.loader, nan_at, nan_into(nan_key))
    first_start = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if trainer.run.rank == kill_rank and first_start:
        trainer.run.data.loader = Interrupt(trainer.run.data.loader, kill_at - trainer.step, kill_self)
    try:
        trainer.train()
    except Exception as e:
        line = f"[rank {trainer.run.rank}] {type(e).__name__}: {e}\n"
        os.write(1, line.encode())  # one write: the ranks share stdout, and a pipe keeps a short write whole
        raise


if __name__ == "__main__":
    from irepa.cli import run
    from irepa.dist import teardown
    try:
        run(_train_with_fault, "interrupts.py")
    finally:
        teardown()
