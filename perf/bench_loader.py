"""Benchmark: prepared-data loaders (FFCV, memmap) vs a per-file .npy + PIL DataLoader.

Synthetic data at SiT-B/2 + DINOv2-B shapes, both flips stored: latent mean+std
[2, 4, 32, 32] float32, tokens [256, 768] bf16, label; per step one view per sample.
The baseline is how the reference release trains: a torch DataLoader over one .npy per
sample (latents, tokens of both flips) plus, with --png, the 256 px image decoded by PIL.
All loaders read the same bytes per sample in the same run on the same machine; files
sit in the page cache (created just before), so this measures the loader, not the disk.
Samples/s and MB/s (payload delivered to the step) per loader; one CSV row each with host,
cores, commit and date.

  python -m perf.bench_loader                     # N=4096, batch 256, all cores
  python -m perf.bench_loader --n 256 --batch 32  # small (2-core dev box)
  python -m perf.bench_loader --loaders memmap    # only ours (the GPU suite's quick figure)

Each loader's row is appended to the CSV as soon as it is measured.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from perf.common import commit, write_rows
from perf.common.provenance import utc_now
from irepa.data import build_loader, ffcv_available
from irepa.data import format as fmt

HERE = Path(__file__).resolve().parent
LATENT, TOKENS, DIM, RES = (4, 32, 32), 256, 768, 256


def make_prepared(root: Path, n: int, with_ffcv: bool) -> None:
    """A prepared folder (manifest + memmaps [+ FFCV]) of random data, as prepare writes it."""
    enc = [{"name": "dinov2-b", "dim": DIM, "tokens": TOKENS, "storage": "bf16"}]
    fields = fmt.build_fields("latent", RES, LATENT, enc, store_images=False)
    mm = root / fmt.MEMMAP_DIR
    mm.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (dt, sh) in fmt.field_specs({"fields": fields}).items():
        a = np.lib.format.open_memmap(mm / f"{name}.npy", mode="w+", dtype=dt, shape=(2 * n, *sh))
        # one random chunk written over and over: the loader moves the same bytes as with fresh
        # values, and the GPU call's loader part starts timing within seconds instead of minutes
        k = min(256, 2 * n)
        if name == "label":
            chunk = rng.integers(0, 1000, k)
        elif name == "latent":
            chunk = rng.standard_normal((k, *sh), dtype=np.float32)
        else:
            chunk = fmt.encode_bf16(torch.randn(k, *sh))
        for i in range(0, 2 * n, k):  # bounded memory at any n
            a[i:i + k] = chunk[:min(k, 2 * n - i)]
        a.flush()
        del a
    formats = ["memmap"]
    files = [f"{fmt.MEMMAP_DIR}/{f}.npy" for f in fields]
    if with_ffcv:
        from irepa.data.finalize import write_ffcv

        write_ffcv(mm, fields, root / fmt.FFCV_FILE)
        formats.append("ffcv")
        files.append(fmt.FFCV_FILE)
    m = {"format": fmt.FORMAT, "version": fmt.VERSION, "kind": "latent", "num_samples": n, "num_views": 2,
         "num_records": 2 * n, "resolution": RES, "fields": fields, "encoders": enc, "formats": formats,
         "latent": {"shape": list(LATENT), "channel_mean": [0.0] * 4, "channel_std": [1.0] * 4},
         "files": fmt.record_files(root, files)}
    fmt.write_json_atomic(root / fmt.MANIFEST, m)


def make_per_file(root: Path, prepared: Path, n: int, png: bool) -> None:
    lat = np.load(prepared / fmt.MEMMAP_DIR / "latent.npy", mmap_mode="r")
    feat = np.load(prepared / fmt.MEMMAP_DIR / "feat_0.npy", mmap_mode="r")
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        np.save(root / f"{i}-vae.npy", np.asarray(lat[2 * i:2 * i + 2]))
        np.save(root / f"{i}-feat.npy", np.asarray(feat[2 * i:2 * i + 2]))
        if png:
            Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(root / f"{i}.png")


class PerFileDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, n: int, png: bool):
        self.root, self.n, self.png = root, n, png

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        flip = np.random.randint(2)
        lat = np.load(self.root / f"{i}-vae.npy")[flip]
        feat = np.load(self.root / f"{i}-feat.npy")[flip]
        out = {"latent": torch.from_numpy(lat), "feat": torch.from_numpy(feat).view(torch.bfloat16), "y": i % 1000}
        if self.png:
            img = np.asarray(Image.open(self.root / f"{i}.png").convert("RGB"))
            out["image"] = torch.from_numpy(img.copy()).permute(2, 0, 1)
        return out


def timed(batches, steps: int, warmup: int, batch: int) -> tuple[float, float]:
    """-> (samples/s, seconds) over `steps` batches after `warmup`."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        _ = b["x"].sum() if "x" in b else b["latent"].sum()  # touch the batch
    dt = time.perf_counter() - t0
    return steps * batch / dt, dt


def forever(make):
    while True:
        yield from make()


def env() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "commit": commit(), "date": utc_now()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="samples (2 views each)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=0, help="timed batches per loader (default: 2 epochs)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=True,
                   help="baseline also decodes a 256 px PNG per sample, as the reference does")
    p.add_argument("--loaders", default="ffcv,memmap,per-file-npy+png,per-file-npy",
                   help="which to measure, in this order (ffcv only where it is installed; the per-file "
                        "ones are the reference-style baselines)")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--csv", type=Path, default=HERE / "results" / "bench_loader.csv")
    a = p.parse_args()
    a.loaders = [x for x in a.loaders.split(",") if x]
    unknown = sorted(set(a.loaders) - set(LOADERS))
    if unknown or not a.loaders:
        raise SystemExit(f"--loaders: unknown {unknown or 'empty list'}; choose from {LOADERS}")
    if "per-file-npy+png" in a.loaders and not a.png:
        a.loaders.remove("per-file-npy+png")
    scratch = Path(tempfile.mkdtemp(dir=a.dir))
    try:
        rows = run(a, scratch)
    finally:
        shutil.rmtree(scratch)
    base = {r["loader"]: r["samples_per_s"] for r in rows}
    ref = base.get("per-file-npy+png", base.get("per-file-npy"))
    for r in rows:
        vs = f" ({r['samples_per_s'] / ref:5.1f}x per-file)" if ref else ""
        print(f"{r['loader']:>18}: {r['samples_per_s']:9.0f} samples/s {r['mb_per_s']:8.0f} MB/s{vs}")
    print(f"rows appended to {a.csv}")


LOADERS = ("ffcv", "memmap", "per-file-npy+png", "per-file-npy")


def run(a, scratch: Path) -> list[dict]:
    use_ffcv = ffcv_available() and "ffcv" in a.loaders
    if "ffcv" in a.loaders and not use_ffcv:
        print("ffcv is not installed here: its row is skipped", flush=True)
    per_file = [x for x in a.loaders if x.startswith("per-file")]
    t0 = time.time()
    make_prepared(scratch / "prepared", a.n, use_ffcv)
    if per_file:
        make_per_file(scratch / "perfile", scratch / "prepared", a.n, "per-file-npy+png" in per_file)
    build_s = time.time() - t0
    print(f"synthetic data: {a.n} samples x 2 views in {build_s:.1f}s")
    bytes_per_sample = 4 * 2 * int(np.prod(LATENT)) + 2 * TOKENS * DIM + 8  # what the step receives
    bpe = a.n // a.batch
    steps = a.steps or 2 * bpe
    warmup = min(3, bpe)
    info = env()
    rows = []

    def record(name, sps, dt, extra=""):
        r = {**info, "loader": name, "n": a.n, "batch": a.batch, "workers": a.workers, "steps": steps,
             "samples_per_s": round(sps, 1), "mb_per_s": round(sps * bytes_per_sample / 1e6, 1),
             "seconds": round(dt, 2), "build_s": round(build_s, 1), "note": extra}
        rows.append(r)
        write_rows(a.csv, [r])  # on disk now: a run cut off later keeps it
        print(f"{name:>18}: {sps:9.0f} samples/s", flush=True)

    backends = [be for be in ("ffcv", "memmap") if be in a.loaders and (be != "ffcv" or use_ffcv)]
    for be in backends:
        ld = build_loader(scratch / "prepared", a.batch, ["dinov2-b"], seed=0, backend=be, num_workers=a.workers,
                          latent_norm="none")
        record(be, *timed(ld, steps, warmup, a.batch))
    variants = [(name, name.endswith("+png")) for name in per_file]
    for name, png in variants:
        ds = PerFileDataset(scratch / "perfile", a.n, png)
        dl = torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True,
                                         persistent_workers=True, prefetch_factor=2)
        record(name, *timed(forever(lambda: iter(dl)), steps, warmup, a.batch), "torch DataLoader")
    return rows


if __name__ == "__main__":
    main()
