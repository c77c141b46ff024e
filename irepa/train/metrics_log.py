"""A run's scalars: per-step sums on the device, and on log steps their means over the interval
(over all ranks) with the learning rate, img/s, TFLOP/s, MFU and data-wait fraction, written to
metrics.jsonl and the run's TensorBoard / W&B log (irepa.train.run_log, rank 0), with the
progress bar. Only log steps read the device."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from irepa.config import Config
from irepa.train.flops import peak_tflops

KNOWN = {"loss", "denoise", "align", "grad_norm", "step", "lr", "img_per_s", "tflops", "data_wait", "mfu"}
"""the trainer's own columns; a recipe's loss adds more (Loss.logs), logged beside the losses"""


class MetricsLog:
    def __init__(self, cfg: Config, run_dir: Path, *, is_main: bool, world: int, device: torch.device,
                 flops_per_image: float, lr: Callable[[int], float], before_write: Callable[[], None]):
        """lr(step index) -> the learning rate of that step; before_write(): called on every rank
        before a row is written (the non-finite check: a bad step is reported, not logged)."""
        self.cfg, self.run_dir, self.is_main, self.world, self.device = cfg, run_dir, is_main, world, device
        self.flops_per_image, self.lr, self.before_write = flops_per_image, lr, before_write
        self.writer = None
        """TensorBoard (+ W&B): irepa.train.run_log.RunLog on rank 0, None elsewhere"""
        self._bar = None
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._n, self._t0, self._wait = 0, time.perf_counter(), 0.0

    def open(self, step: int) -> None:
        """The log and the progress bar, continuing at `step` (a resumed run hides later events)."""
        from tqdm import tqdm
        if self.is_main:
            from irepa.train.run_log import open_run_log
            self.writer = open_run_log(self.cfg, self.run_dir, step)
        self._bar = tqdm(total=self.cfg.train.steps, initial=step, disable=not self.is_main, desc="train",
                         dynamic_ncols=True, file=sys.stderr)
        self._reset()

    def waited(self, seconds: float) -> None:
        """Time the step waited for its batch."""
        self._wait += seconds

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """One step's scalars (device tensors; no sync)."""
        for k, v in out.items():
            self._sums[k] = self._sums.get(k, 0) + v.float()
        self._n += 1
        self._bar.update(1)

    def write(self, step: int) -> dict:
        """The means since the last write, written as the row of `step` (collective)."""
        sums, n, dt = self._sums, self._n, time.perf_counter() - self._t0
        if self.world > 1:
            keys = sorted(sums)
            vec = torch.stack([sums[k] for k in keys])
            dist.all_reduce(vec)
            sums = {k: v / self.world for k, v in zip(keys, vec)}
        self.before_write()
        vals = {k: float(v) / n for k, v in sums.items()}
        img_s = n * self.cfg.train.batch_size / max(dt, 1e-9)
        vals.update(step=step, lr=self.lr(step - 1), img_per_s=img_s, tflops=img_s * self.flops_per_image / 1e12,
                    data_wait=self._wait / max(dt, 1e-9))
        peak = peak_tflops(self.device)
        if peak:
            vals["mfu"] = vals["tflops"] / (peak * self.world)
        self.row(vals)
        if self.writer is not None:
            for k in ("loss", "denoise", "align", *(k for k in vals if k not in KNOWN)):
                self.writer.add_scalar(f"loss/{k}", vals[k], step)
            self.writer.add_scalar("optim/grad_norm", vals["grad_norm"], step)
            self.writer.add_scalar("optim/lr", vals["lr"], step)
            for k in ("img_per_s", "tflops", "data_wait", "mfu"):
                if k in vals:
                    self.writer.add_scalar(f"perf/{k}", vals[k], step)
        self._bar.set_postfix(loss=f"{vals['loss']:.4f}", align=f"{vals['align']:.4f}")
        self._reset()
        return vals

    def row(self, vals: dict) -> None:
        """A row of metrics.jsonl (rank 0)."""
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(vals) + "\n")

    def close_bar(self) -> None:
        self._bar.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def summary(last: dict) -> str:
    """The end-of-run line's numbers from the last row."""
    out = (f", last loss {last['loss']:.4f}, {last['img_per_s']:.1f} img/s, {last['tflops']:.3g} TFLOP/s"
           f", data wait {100 * last['data_wait']:.1f}%")
    return out + (f", MFU {100 * last['mfu']:.1f}%" if "mfu" in last else ", MFU n/a (no peak for this device)")
