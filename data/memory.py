"""In-memory loader over tensors, with the loader interface the trainer uses.

Loader interface (every loader in irepa.data follows it):
- iterating yields dicts: "x" [B, C, H, W] float (latent mean or pixels, already scaled),
  optional "x_std" [B, C, H, W] (posterior std: the step draws x + x_std * eps), "y" [B]
  int64, "feats" list of [B, T, E] tensors (one per encoder, in config order), optional
  "images" [B, 3, H, W] float in [0, 1] (the same view, for encoders run online), all on
  `device`;
- `state_dict()` / `load_state_dict()` give the exact position (epoch, batch index), so a
  resumed run sees the same batches as an uninterrupted one;
- `batches_per_epoch`.
Order is a permutation per epoch from (seed, epoch); each rank takes a strided share.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


def epoch_order(seed: int, epoch: int, n: int, rank: int, world_size: int, count: int) -> torch.Tensor:
    """Sample ids rank `rank` visits in `epoch`: a permutation from (seed, epoch), strided
    over ranks, the first `count` kept. Shared by every loader so they agree batch for batch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[rank::world_size][:count]


def epoch_flips(seed: int, epoch: int, n: int) -> torch.Tensor:
    """[n] bool: which samples are seen mirrored in `epoch` (fixed by seed, epoch, sample)."""
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    return torch.rand(n, generator=g) < 0.5


class TensorLoader:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, feats: Sequence[torch.Tensor], batch_size: int,
                 *, seed: int = 0, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 x_std: torch.Tensor | None = None, flip_feats: Sequence[torch.Tensor] | None = None):
        n = x.shape[0]
        for name, t in [("y", y), *[(f"feats[{i}]", f) for i, f in enumerate(feats)]]:
            if t.shape[0] != n:
                raise ValueError(f"TensorLoader: {name} has {t.shape[0]} rows, x has {n}")
        per_rank = n // world_size
        if batch_size > per_rank:
            raise ValueError(f"batch_size {batch_size} is larger than the {per_rank} samples of one rank")
        self.x, self.y, self.feats, self.x_std = x, y, list(feats), x_std
        self.flip_feats = list(flip_feats) if flip_feats is not None else None
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = torch.device(device)
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.index = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])

    def _order(self, epoch: int) -> torch.Tensor:
        return epoch_order(self.seed, epoch, self.x.shape[0], self.rank, self.world_size,
                           self.batches_per_epoch * self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        while True:
            order = self._order(self.epoch)
            while self.index < self.batches_per_epoch:
                idx = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
                self.index += 1
                yield self._batch(idx)
            self.epoch, self.index = self.epoch + 1, 0

    def _batch(self, idx: torch.Tensor) -> dict:
        dev = self.device
        x, feats = self.x[idx], [f[idx] for f in self.feats]
        if self.flip_feats is not None:
            # one of the two flips per sample, fixed by (seed, epoch, sample): x is mirrored
            # with it and the features of the mirrored image are taken
            pick = epoch_flips(self.seed, self.epoch, self.x.shape[0])[idx]
            x = torch.where(pick[:, None, None, None], x.flip(-1), x)
            feats = [torch.where(pick[:, None, None], ff[idx], f) for f, ff in zip(feats, self.flip_feats)]
        out = {"x": x.to(dev, non_blocking=True), "y": self.y[idx].to(dev, non_blocking=True),
               "feats": [f.to(dev, non_blocking=True) for f in feats]}
        if self.x_std is not None:
            out["x_std"] = self.x_std[idx].to(dev, non_blocking=True)
        return out
