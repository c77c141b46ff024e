"""Non-finite forensics: which step first made a NaN or inf, in what, and whether its data was bad.

Every step notes on the device whether its loss and each part's gradient norm are finite (a
handful of scalar ops, no host sync); the trainer reads the note on log and checkpoint steps
(`check`, collective), and the first non-finite step is reported by number with what was
non-finite on any rank and a check of that step's batch in the dataset files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from irepa.dist import all_gather_object
from irepa.train import checkpoint


class FiniteWatch:
    def __init__(self, device: torch.device, world: int):
        self.world = world
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        """first step (1-based, as metrics.jsonl counts) whose loss or a gradient norm was non-finite; -1: none"""
        self.bad_what: torch.Tensor | None = None
        self.bad_names: list[str] = []

    def note(self, loss: torch.Tensor, grad_norms: dict[str, torch.Tensor], step: int) -> None:
        """Device-side note of `step` (1-based) if its loss or the gradient norm of a part (the fused norm
        over all its gradients) is non-finite and no earlier step was."""
        self.bad_names = ["loss", *(f"gradient of {n}" for n in grad_norms)]
        vals = torch.stack([loss.detach().float().reshape(()),
                            *(v.detach().float().reshape(()) for v in grad_norms.values())])
        bad = ~torch.isfinite(vals)
        new = bad.any() & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_what = bad if self.bad_what is None or self.bad_what.shape != bad.shape else \
            torch.where(new, bad, self.bad_what)

    def check(self, run_dir: Path, loader, step: int) -> None:
        """Raise NonFiniteError naming the first non-finite step (collective: every rank agrees).
        `step`: the steps run so far; `loader`: where the batch of the bad step is found again."""
        first = int(self.first_bad)
        what = [n for n, b in zip(self.bad_names, self.bad_what.tolist()) if b] if first > 0 else []
        if self.world > 1:  # the earliest step of any rank, and what any rank found non-finite at it
            seen = [(f, w) for f, w in all_gather_object((first, what)) if f > 0]
            first = min(f for f, _ in seen) if seen else -1
            found = {n for f, w in seen if f == first for n in w}
            what = [n for n in self.bad_names if n in found]
        if first <= 0:
            return
        data = check_batch(loader, first, step)
        if self.world > 1:  # each rank read its own share of the batch
            found = all_gather_object(data)
            data = next((d for d in found if "data is bad" in d), found[0])
        raise checkpoint.NonFiniteError(
            f"non-finite {' and '.join(what) or 'value'} at step {first} in {run_dir} "
            f"(metrics.jsonl numbering){data}; no checkpoint was written after it. "
            f"Last good checkpoint: {checkpoint.latest_checkpoint(run_dir)}")


def check_batch(loader, step: int, current: int) -> str:
    """The dataset records of step `step`'s batch (this rank's; `current` steps have run), checked for
    non-finite values in the files: '; the data is bad: FILE record R ...' or '; its batch's data is finite'."""
    check = getattr(loader, "check_batch", None)
    if check is None:
        return ""
    pos = loader.state_dict()
    consumed = pos["epoch"] * loader.batches_per_epoch + pos["index"]
    number = consumed - 1 - (current - step)  # batches are consumed one per step
    if number < 0:
        return ""
    epoch, index = divmod(number, loader.batches_per_epoch)
    try:
        bad = check(epoch, index)
    except Exception as e:  # the check is a diagnosis; it must not hide the error it explains
        return f"; its batch could not be checked ({type(e).__name__}: {e})"
    if bad is None:
        return f"; its batch (epoch {epoch}, batch {index}) holds finite data"
    return f"; the data is bad: {bad}"
