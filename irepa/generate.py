"""Sample generation for evaluation: N images in shards over ranks, resumable, ADM .npz out.

Plan: N labels drawn once from the seed (uniform random or class-balanced), split into
shards of `shard_size`; shard i goes to rank i % world_size, its noise comes from a
generator seeded by (seed, i), so the output does not depend on the number of ranks and
a killed job resumes by skipping the shards already on disk. Every shard is one atomic
.npz (uint8 images, labels). `merge_shards` streams them into the final ADM batch
(arr_0 images [N, H, W, 3] uint8, arr_1 labels) and a PNG grid. plan.json in the output
folder records the settings; resuming with different settings is refused.

`sample_batch` (the caller's: launch/sample.py runs the recipe's sampler and decodes with
irepa.codec) turns noise and labels into images in [0, 1].
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from irepa.errors import InputError
from irepa.grid import QUANTIZE, save_grid, to_uint8_nhwc
from irepa.metrics.npz import NpzArrayWriter


@dataclass
class SamplePlan:
    num_samples: int = 50_000
    num_classes: int = 1000
    labels: str = "random"
    """random (uniform, ADM/REPA practice) or balanced (N / C per class, shuffled)"""
    seed: int = 0
    shard_size: int = 1000
    batch_size: int = 64
    """images per model call per rank (CFG doubles it inside the sampler)"""
    method: str = "sde"
    steps: int = 250
    cfg: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    """CFG interval in SiT time (t = 1 noise)"""
    latent_shape: tuple[int, ...] = (4, 32, 32)
    quantize: str = "round"
    """float images -> uint8: "round" or "truncate" (irepa.grid.QUANTIZE; the recipe's sample_quantize)"""
    extra: dict = field(default_factory=dict)
    """anything else that changes the output (checkpoint, decoder); compared on resume"""

    def __post_init__(self):
        self.interval = tuple(float(v) for v in self.interval)
        self.latent_shape = tuple(int(v) for v in self.latent_shape)
        if self.num_samples <= 0 or self.shard_size <= 0 or self.batch_size <= 0:
            raise InputError("num_samples, shard_size and batch_size must be positive")
        if self.quantize not in QUANTIZE:
            raise InputError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.labels not in ("random", "balanced"):
            raise InputError(f"labels must be 'random' or 'balanced', got {self.labels!r}")
        from irepa.sampling import check_settings
        check_settings(self.method, self.steps, self.interval)  # before plan.json claims the output folder

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min((i + 1) * self.shard_size, self.num_samples)

    def all_labels(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        if self.labels == "random":
            return torch.randint(self.num_classes, (self.num_samples,), generator=g)
        return (torch.arange(self.num_samples) % self.num_classes)[torch.randperm(self.num_samples, generator=g)]

    def shard_seed(self, i: int) -> int:
        return int(np.random.SeedSequence([self.seed, i]).generate_state(1, np.uint64)[0] >> 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def check_plan(out_dir: Path, plan: SamplePlan) -> None:
    """Write plan.json, or compare with the one a previous run left (resume)."""
    path = out_dir / "plan.json"
    new = json.loads(plan.to_json())
    made = (out_dir / "samples.npz").is_file() or any((out_dir / "shards").glob("shard-*.npz"))
    if path.is_file() and made:  # without any samples yet (a run that failed early) the plan is replaced
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise InputError(f"{path}: this folder holds samples made with other settings ({diff}); "
                             f"use a new output folder or the same settings")
        return
    tmp = path.with_name(f"plan.json.tmp-{os.getpid()}")
    tmp.write_text(plan.to_json())
    os.replace(tmp, path)


def shard_path(out_dir: Path, i: int) -> Path:
    return out_dir / "shards" / f"shard-{i:06d}.npz"


def _save_npz_atomic(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


SampleBatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""(noise [b, *latent_shape], labels [b], sde generator) -> images [b, 3, H, W] in [0, 1]"""


def show_bar(progress: str, rank: int, stream=None) -> bool:
    """Whether this rank draws a progress bar: rank 0 only (N bars under torchrun help no one);
    progress "bar" always, "off" never, "auto" when `stream` (stderr) is a terminal, so logs
    redirected to a file get the per-shard lines instead of a stream of carriage returns."""
    stream = stream if stream is not None else sys.stderr
    if progress not in ("auto", "bar", "off"):
        raise InputError(f"progress must be auto, bar or off, got {progress!r}")
    return rank == 0 and (progress == "bar" or (progress == "auto" and stream.isatty()))


class _Progress:
    """Images done, images/s and time left over one rank's shards: a tqdm bar updated per batch
    (when shown) and the numbers for each finished shard's log line."""

    def __init__(self, total: int, done: int, rank: int, world_size: int, bar: bool):
        from tqdm import tqdm
        self.total, self.done, self.start_done, self.t0 = total, done, done, time.monotonic()
        self.bar = tqdm(total=total, initial=done, unit="img", desc=f"sample rank {rank}/{world_size}",
                        dynamic_ncols=True, file=sys.stderr, disable=not bar)

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)

    def summary(self) -> str:
        from tqdm import tqdm
        rate = (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-9)
        left = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
        return f"{self.done}/{self.total} images of this rank, {rate:.3g} img/s, {left} left"

    def write(self, line: str, log: Callable[[str], None]) -> None:
        """`log(line)`, or above the bar while it is drawn (a plain print would split it)."""
        if self.bar.disable:
            log(line)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def generate_shards(plan: SamplePlan, out_dir: str | Path, sample_batch: SampleBatchFn, rank: int = 0,
                    world_size: int = 1, device="cpu", log: Callable[[str], None] = print,
                    bar: bool = False) -> list[int]:
    """Make this rank's missing shards; returns the shard indices written by this call.
    bar: draw a progress bar (show_bar decides); each shard's log line says the same."""
    out_dir = Path(out_dir)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    labels = plan.all_labels()
    written = []
    mine = range(rank, plan.num_shards, world_size)
    todo = [i for i in mine if not shard_path(out_dir, i).is_file()]
    if len(todo) < len(mine):
        log(f"[rank {rank}] resuming: {len(mine) - len(todo)} of {len(mine)} shards already done")
    size = lambda i: plan.shard_range(i)[1] - plan.shard_range(i)[0]  # noqa: E731
    progress = _Progress(sum(map(size, mine)), sum(size(i) for i in mine if i not in todo), rank, world_size, bar)
    try:
        for i in todo:
            lo, hi = plan.shard_range(i)
            seed = plan.shard_seed(i)
            g_noise = torch.Generator().manual_seed(seed)
            g_sde = torch.Generator(device=device).manual_seed(seed + 1)
            images = []
            for b0 in range(lo, hi, plan.batch_size):
                b1 = min(b0 + plan.batch_size, hi)
                noise = torch.randn((b1 - b0, *plan.latent_shape), generator=g_noise).to(device)
                images.append(to_uint8_nhwc(sample_batch(noise, labels[b0:b1].to(device), g_sde).cpu(),
                                            plan.quantize))
                progress.update(b1 - b0)
            _save_npz_atomic(shard_path(out_dir, i), images=np.concatenate(images), labels=labels[lo:hi].numpy())
            written.append(i)
            progress.write(f"[rank {rank}] shard {i} of {plan.num_shards} done ({hi - lo} images; "
                           f"{progress.summary()})", log)
    finally:
        progress.close()
    return written


def merge_shards(plan: SamplePlan, out_dir: str | Path, name: str = "samples.npz", grid: int = 64,
                 keep_shards: bool = False) -> Path:
    """All shards -> out_dir/name (ADM: arr_0 uint8 [N, H, W, 3], arr_1 labels) + out_dir/grid.png."""
    out_dir = Path(out_dir)
    paths = [shard_path(out_dir, i) for i in range(plan.num_shards)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}/shards: {len(missing)} shard(s) missing ({missing[:4]}...); "
                                f"run sample.py again to finish them")
    with np.load(paths[0]) as z:
        hwc = z["images"].shape[1:]
    writer = NpzArrayWriter(out_dir / name)

    def blocks(key):
        for i, p in enumerate(paths):
            with np.load(p) as z:
                arr = z[key]
            lo, hi = plan.shard_range(i)
            if arr.shape[0] != hi - lo:
                raise ValueError(f"{p}: {arr.shape[0]} rows, expected {hi - lo}")
            yield arr
    try:
        writer.write_array("arr_0", (plan.num_samples, *hwc), np.uint8, blocks("images"))
        writer.write_array("arr_1", (plan.num_samples,), np.int64, blocks("labels"))
    except BaseException:
        writer.abort()
        raise
    final = writer.close()
    if grid:
        with np.load(paths[0]) as z:
            first = z["images"][:grid]
        save_grid(first, out_dir / "grid.png")
    if not keep_shards:
        for p in paths:
            p.unlink()
        (out_dir / "shards").rmdir()
    return final
