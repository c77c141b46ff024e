"""Loaders over a prepared dataset (data/format.py): FFCV, or numpy memmaps without FFCV.

Both follow the loader interface in data/memory.py and agree batch for batch: the same
(seed, epoch) permutation, strided over ranks, and the same per-sample flip as
TensorLoader. A flip selects the stored record of the mirrored view (its own latent,
tokens and image), so each step reads exactly one view's bytes; hflip=False reads the
unmirrored view only (data whose mirror image is another thing, like digits).

Raw fields travel host -> device as stored (int16 bf16 bits, uint8 fp8 bits + scales,
uint8 images) in pinned memory with non-blocking copies, and are decoded on the device:
the wire carries the fewest bytes. Batches are prepared ahead (`prefetch`) by worker
threads (memmap) or FFCV's compiled pipeline.

Exact resume: state_dict() is (epoch, batches consumed); after load_state_dict() a new
iter() continues with the next unseen batch.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import format as fmt
from .memory import epoch_flips, epoch_order

from irepa.errors import InputError, UserError


@contextlib.contextmanager
def keep_torch_threads():
    """FFCV sets torch's intra-op thread count (to 1 at import, to its worker count when a
    Loader is built or an epoch starts); the training process keeps its own."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


class FFCVMissing(UserError, ImportError):
    """FFCV asked for on a machine where it does not import (a choice of the user's, not a bug)."""


def ffcv_available() -> bool:
    try:
        with keep_torch_threads():
            import ffcv.loader  # noqa: F401
    except Exception:
        return False
    return True


class _PreparedLoader:
    backend = "?"

    def __init__(self, path: str | os.PathLike, batch_size: int, encoders: Sequence[str] = (), *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", images: bool = False,
                 latent_norm: str | tuple = "stats", feats_dtype: torch.dtype = torch.bfloat16,
                 num_workers: int | None = None, prefetch: int = 3, verify: str = "sampled", hflip: bool = True):
        self.root = Path(path)
        self.hflip = bool(hflip)
        m = self.manifest = fmt.read_manifest(self.root)
        self.n = m["num_samples"]
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        per_rank = self.n // world_size
        if batch_size > per_rank:
            raise InputError(f"batch_size {batch_size} is larger than the {per_rank} samples of one rank "
                             f"({self.n} samples / {world_size} ranks)")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.batches_per_epoch = per_rank // batch_size
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.feats_dtype, self.prefetch = feats_dtype, max(1, prefetch)
        self.num_workers = num_workers or max(1, (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        self.epoch, self.index, self._generation = 0, 0, 0

        stored = [e["name"] for e in m["encoders"]]
        self.enc_ids = []
        for name in encoders:
            if name not in stored:
                raise InputError(f"{self.root}: encoder {name!r} is not stored (stored: {stored or 'none'}); "
                                 f"prepare with it (--encoders), or run it online (--data.online_encoders true, "
                                 f"on data prepared with --store_images true)")
            self.enc_ids.append(stored.index(name))
        self.enc_storage = [m["encoders"][k]["storage"] for k in self.enc_ids]
        self.kind, self.want_images = m["kind"], images
        need = {"label", "latent" if self.kind == "latent" else "pixels"}
        if images and self.kind == "latent":
            if "images" not in m["fields"]:
                raise InputError(f"{self.root}: the images are asked for (online encoders) but none were stored "
                                 f"(prepare with --store_images true)")
            need.add("images")
        for k, s in zip(self.enc_ids, self.enc_storage):
            need |= {f"feat_{k}"} | ({f"scale_{k}"} if s == "fp8" else set())
        self.fields = [f for f in m["fields"] if f in need]  # file order: FFCV yields in this order
        self.specs = fmt.field_specs(m)
        if self.kind == "latent":
            C = m["latent"]["shape"][0]
            if latent_norm == "stats":
                shift, scale = m["latent"]["channel_mean"], m["latent"]["channel_std"]
            elif latent_norm == "none":
                shift, scale = [0.0] * C, [1.0] * C
            else:
                shift, scale = latent_norm
                shift = [float(shift)] * C if np.isscalar(shift) else list(shift)
                scale = [float(scale)] * C if np.isscalar(scale) else list(scale)
            scale = [s if s > 0 else 1.0 for s in scale]  # a constant channel: shift only
            self.shift = torch.tensor(shift, dtype=torch.float32, device=self.device).view(1, C, 1, 1)
            self.scale = torch.tensor(scale, dtype=torch.float32, device=self.device).view(1, C, 1, 1)
        self._verify = verify

    # -- position ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])
        self._generation += 1  # an iterator from before the reload stops instead of going on

    def records(self, epoch: int, start_batch: int = 0) -> np.ndarray:
        """Record ids this rank reads in `epoch` from batch `start_batch` on (2*sample + flip; flip 0
        throughout without hflip)."""
        count = self.batches_per_epoch * self.batch_size
        order = epoch_order(self.seed, epoch, self.n, self.rank, self.world_size, count)
        flips = epoch_flips(self.seed, epoch, self.n)[order].long() * int(self.hflip)
        return (2 * order + flips).numpy()[start_batch * self.batch_size:]

    def check_batch(self, epoch: int, index: int) -> str | None:
        """The stored data of batch `index` of `epoch` (this rank's), read again from the dataset
        files: '<file> record R ...: non-finite value in <field>' for each bad record, or None when it
        is finite (or cannot be read: no memmap copy)."""
        rec = self.records(epoch, index)[:self.batch_size]
        bad = fmt.bad_records(self.root, self.manifest, rec, fields=self.fields)
        return "; ".join(bad) if bad else None

    def __iter__(self) -> Iterator[dict]:
        gen = self._generation
        while True:
            for raw in self._epoch(self.epoch, self.index):
                if gen != self._generation:
                    return
                self.index += 1
                yield self._finish(raw)
            if gen != self._generation:
                return
            self.epoch, self.index = self.epoch + 1, 0

    def _epoch(self, epoch: int, start: int) -> Iterator[dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- device side ---------------------------------------------------------------------
    def _finish(self, raw: dict, owned: bool = True) -> dict:
        """Raw host (or device) tensors -> the interface's batch on `device`.
        owned=False: raw buffers are reused by the producer, so every output is a copy."""
        dev = self.device
        t = {k: v.to(dev, non_blocking=True) for k, v in raw.items()}
        out = {"y": t["label"].reshape(-1).long()}
        if not owned:
            out["y"] = out["y"].clone()
        if self.kind == "latent":
            lat = t["latent"]
            out["x"] = (lat[:, 0] - self.shift) / self.scale
            out["x_std"] = lat[:, 1] / self.scale
            if self.want_images:
                out["images"] = t["images"].float().div_(255)
        else:
            px = t["pixels"].float()
            out["x"] = px / 127.5 - 1
            if self.want_images:
                out["images"] = px.div_(255)
        feats = []
        for k, s in zip(self.enc_ids, self.enc_storage):
            if s == "bf16":
                f = fmt.decode_bf16(t[f"feat_{k}"]).to(self.feats_dtype)
                if not owned and f.dtype == torch.bfloat16:
                    f = f.clone()
            else:
                f = fmt.decode_fp8(t[f"feat_{k}"], t[f"scale_{k}"], self.feats_dtype)
            feats.append(f)
        out["feats"] = feats
        return out


class MemmapLoader(_PreparedLoader):
    """numpy memmaps + worker threads; needs nothing beyond numpy and torch."""

    backend = "memmap"

    def __init__(self, path, batch_size, encoders=(), **kw):
        super().__init__(path, batch_size, encoders, **kw)
        if "memmap" not in self.manifest["formats"]:
            raise InputError(f"{self.root}: prepared without the memmap format (formats {self.manifest['formats']}); "
                             f"load it with backend 'ffcv' or 'auto' (--data.backend), or prepare with "
                             f"--formats memmap")
        files = [f"{fmt.MEMMAP_DIR}/{f}.npy" for f in self.fields]
        fmt.verify_files(self.root, self.manifest, files, self._verify)
        self.arrays = {}
        for f, name in zip(self.fields, files):
            a = fmt.open_memmap(self.root / name)
            dt, sh = self.specs[f]
            if a.dtype != dt or a.shape != (self.manifest["num_records"], *sh):
                raise InputError(f"{self.root / name}: array {a.dtype} {a.shape} != manifest {dt} "
                                 f"{(self.manifest['num_records'], *sh)} (not the file this manifest describes)")
            self.arrays[f] = a

    def _gather(self, rec: np.ndarray) -> dict:
        out = {}
        for f, a in self.arrays.items():
            # fancy indexing (GIL released, several times faster than np.take on memmaps)
            rows = torch.from_numpy(a[rec])
            out[f] = rows.pin_memory() if self.pin else rows
        return out

    def _epoch(self, epoch, start):
        rec, B = self.records(epoch, start), self.batch_size
        nb = len(rec) // B
        pool = ThreadPoolExecutor(self.num_workers)
        ahead = deque(pool.submit(self._gather, rec[b * B:(b + 1) * B]) for b in range(min(nb, self.prefetch)))
        try:
            for b in range(nb):
                raw = ahead.popleft().result()
                if b + self.prefetch < nb:
                    nxt = b + self.prefetch
                    ahead.append(pool.submit(self._gather, rec[nxt * B:(nxt + 1) * B]))
                yield raw
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class FFCVLoader(_PreparedLoader):
    """FFCV's compiled, multi-threaded reader over data.beton, with our own traversal order."""

    backend = "ffcv"

    def __init__(self, path, batch_size, encoders=(), os_cache: bool = True, **kw):
        super().__init__(path, batch_size, encoders, **kw)
        self.os_cache = os_cache
        if "ffcv" not in self.manifest["formats"]:
            raise InputError(f"{self.root}: prepared without the ffcv format (formats {self.manifest['formats']}); "
                             f"load it with backend 'memmap' or 'auto' (--data.backend), or prepare with "
                             f"--formats ffcv")
        fmt.verify_files(self.root, self.manifest, [fmt.FFCV_FILE], self._verify)
        _check_ffcv_header(self.root / fmt.FFCV_FILE, self.manifest["num_records"])
        with keep_torch_threads():
            self._build_ffcv()

    def _build_ffcv(self):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor

        tail = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        pipelines = {f: (([IntDecoder()] if f == "label" else [NDArrayDecoder()]) + [ToTensor()] + tail
                         if f in self.fields else None) for f in self.manifest["fields"]}
        self._order = _fixed_order_class()(self.records(0))  # full-epoch length: FFCV sizes len() from it
        self._ffcv = Loader(str(self.root / fmt.FFCV_FILE), batch_size=self.batch_size, num_workers=self.num_workers,
                            os_cache=self.os_cache, order=self._order, pipelines=pipelines, drop_last=True,
                            batches_ahead=self.prefetch, seed=self.seed)
        # On the host FFCV decodes into a ring of batches_ahead + 2 slot buffers that it
        # allocates anew at every epoch (torch memory, no huge pages) and overwrites while
        # the caller still holds a yielded batch, so every batch had to be copied again.
        # Instead each batch is decoded into new numpy arrays that the batch then owns: one
        # copy per byte, done by FFCV's worker threads. (On CUDA FFCV's own device slots are
        # kept and copied on the device.)
        self._fresh = None
        if self.device.type != "cuda":
            self._fresh = _FreshAllocator(self._ffcv.graph)
            self._ffcv.graph.allocate_memory = self._fresh.allocate_memory

    def _epoch(self, epoch, start):
        self._order.set(self.records(epoch, start))
        with keep_torch_threads():
            it = iter(self._ffcv)
        try:
            for batch in it:
                yield dict(zip(self.fields, batch))
        finally:
            it.close()

    def _finish(self, raw, owned=True):
        # a batch owns its arrays only if they are ones _FreshAllocator handed out (FFCV's
        # own buffers are reused for later batches)
        owned = self._fresh is not None and all(self._fresh.issued(v) for v in raw.values())
        return super()._finish(raw, owned=owned)


def _check_ffcv_header(path: Path, num_records: int) -> None:
    """Refuse an FFCV file that is not one, is of another FFCV version, holds another record count or
    ends before its allocation table (truncated): what data.verify none lets through, and FFCV's
    reader reports only as an assertion or a negative array size."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    size = path.stat().st_size
    head = np.fromfile(path, dtype=HeaderType, count=1) if size >= HeaderType.itemsize else None
    what = None
    if head is None or head[0]["version"] != CURRENT_VERSION:
        what = f"not an FFCV file (version {CURRENT_VERSION})"
    elif int(head[0]["num_samples"]) != num_records:
        what = f"{int(head[0]['num_samples'])} records, the manifest says {num_records}"
    elif not 0 < int(head[0]["alloc_table_ptr"]) <= size or (size - int(head[0]["alloc_table_ptr"])) % \
            ALLOC_TABLE_TYPE.itemsize:
        what = f"{size} bytes end inside its allocation table (truncated)"
    if what:
        raise InputError(f"{path}: {what}; not the FFCV file of this prepared dataset")


class _FreshAllocator:
    """Stands in for ffcv.pipeline.graph.Graph.allocate_memory (ffcv 1.0.2), which
    EpochIterator calls once per epoch: the per-slot buffers it returns are looked up once
    per batch (buffer[slot][:count] in EpochIterator.run_pipeline), and each lookup gives a
    new numpy array (large ones get huge pages from numpy, unlike FFCV's torch.empty
    ring). Live arrays handed out are tracked (weakly) so the loader can tell a batch it
    owns from one in reused buffers, should FFCV ever bypass this."""

    def __init__(self, graph):
        self.graph = graph
        self._live = weakref.WeakValueDictionary()  # data pointer -> array handed out
        self._lock = threading.Lock()

    def allocate_memory(self, batch_size: int, slots: int) -> dict:
        from ffcv.pipeline.allocation_query import AllocationQuery, allocate_query

        queries, _ = self.graph.collect_requirements()

        def fresh(q):
            if q is None:
                return None
            if not isinstance(q, AllocationQuery):  # a sequence of queries
                return tuple(fresh(x) for x in q)
            if isinstance(q.dtype, torch.dtype) or (q.device is not None and torch.device(q.device).type != "cpu"):
                return allocate_query(q, batch_size, slots)  # FFCV's own ring (not owned: copied)
            return _FreshSlots(self, (batch_size, *q.shape), np.dtype(q.dtype))

        return {kind: {node: fresh(q) for node, q in reqs.items()} for kind, reqs in queries.items()}

    def new(self, shape, dtype) -> np.ndarray:
        a = np.empty(shape, dtype)
        with self._lock:
            self._live[a.ctypes.data] = a
        return a

    def issued(self, t) -> bool:
        """True if `t` starts at an array handed out by new() that is still alive."""
        ptr = t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data
        with self._lock:
            return ptr in self._live


class _FreshSlots:
    def __init__(self, alloc: _FreshAllocator, shape, dtype):
        self.alloc, self.shape, self.dtype = alloc, shape, dtype

    def __getitem__(self, slot: int) -> np.ndarray:
        return self.alloc.new(self.shape, self.dtype)


@functools.cache
def _fixed_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class FixedOrder(TraversalOrder):
        """The record ids we computed, in our order (FFCV's own Random order needs an
        initialized process group for distributed runs and cannot start mid-epoch)."""

        def __init__(self, records: np.ndarray):
            self.records = records

        def __call__(self, loader):  # ffcv calls order(loader) on TraversalOrder instances
            super().__init__(loader)
            return self

        def set(self, records: np.ndarray) -> None:
            self.records = records

        def sample_order(self, epoch: int):
            return self.records

    return FixedOrder


def build_loader(path: str | os.PathLike, batch_size: int, encoders: Sequence[str] = (), seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", backend: str = "auto", **kw):
    """Loader over a prepared dataset folder. backend "auto": FFCV when the folder has an
    FFCV file and ffcv imports, else memmap. Extra keywords: images, latent_norm
    ("stats" | "none" | (shift, scale)), feats_dtype, num_workers, prefetch,
    verify ("sampled" | "full" | "none"), hflip (False: never the mirrored view)."""
    m = fmt.read_manifest(path)
    if backend == "auto":
        backend = "ffcv" if "ffcv" in m["formats"] and ffcv_available() else "memmap"
    if backend not in ("ffcv", "memmap"):
        raise ValueError(f"backend must be 'auto', 'ffcv' or 'memmap', got {backend!r}")
    if backend == "ffcv" and not ffcv_available():
        raise FFCVMissing("backend='ffcv' but ffcv cannot be imported here (IREPA_WITH_FFCV=1 bash "
                          "launch/install.sh; see README); use backend 'memmap' (--data.backend memmap)")
    cls = FFCVLoader if backend == "ffcv" else MemmapLoader
    return cls(path, batch_size, encoders, seed=seed, rank=rank, world_size=world_size, device=device, **kw)
