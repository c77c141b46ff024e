"""The last step of a preparation (data/prepare.py), run by rank 0 once every rank is done:
close the gaps left by files that failed to decode, latent statistics, FFCV file, digests,
manifest, the rename to OUT, and the summary printed for the user."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from irepa.codec import DIGITS_CODEC

from . import format as fmt
from .out_folder import replace_out

EXAMPLES = 3  # files named on screen per kind of event; the manifest lists them all


def rank_block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Samples [lo, hi) owned by `rank`: contiguous, sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def close_gaps(mm: Path, names: Sequence[str], gaps: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Samples [0, n) with empty rows at `gaps` -> samples [0, n - len(gaps)), all written: the last
    written samples move into the gaps below the cut, every memmap is cut there. Safe to rerun after
    a crash (a file already cut is not moved again). -> the moves [(to, from)]."""
    keep, gap_set = n - len(gaps), set(gaps)
    moves = list(zip([g for g in sorted(gaps) if g < keep], [s for s in range(keep, n) if s not in gap_set]))
    v = fmt.NUM_VIEWS
    for name in names:
        path = mm / f"{name}.npy"
        a = np.load(path, mmap_mode="r+")
        if len(a) > keep * v:
            for to, frm in moves:
                a[v * to:v * to + v] = a[v * frm:v * frm + v]
            a.flush()
        del a
        fmt.shrink_npy(path, keep * v)
    return moves


def _fixed_latent_stats(vae: str | None) -> dict | None:
    """latent_stats.json of an exported end-to-end VAE folder (irepa.autoencoder.export), if any."""
    if not vae or vae == DIGITS_CODEC or not Path(vae).is_dir():
        return None
    from irepa.autoencoder.export import read_latent_stats
    return read_latent_stats(vae)


def latent_channel_stats(latent: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of posterior samples z = mean + std * eps over the as-is
    views (records 0, 2, 4, ...): var(z) = var(mean) + E[std^2]."""
    s1 = s2 = sv = 0.0
    count = 0
    for a in range(0, latent.shape[0], 2 * chunk):
        block = np.asarray(latent[a:a + 2 * chunk:2], dtype=np.float64)  # [b, 2, C, h, w]
        m, sd = block[:, 0], block[:, 1]
        s1 = s1 + m.sum(axis=(0, 2, 3))
        s2 = s2 + (m * m).sum(axis=(0, 2, 3))
        sv = sv + (sd * sd).sum(axis=(0, 2, 3))
        count += m.shape[0] * m.shape[2] * m.shape[3]
    mu = s1 / count
    var = s2 / count - mu * mu + sv / count
    return [float(v) for v in mu], [float(v) for v in np.sqrt(np.maximum(var, 0.0))]


class _Records:
    """Indexed view of the memmaps for ffcv's DatasetWriter (one tuple per record)."""

    def __init__(self, root: Path, names: Sequence[str]):
        self.root, self.names = root, list(names)
        self.arrays = None

    def __len__(self):
        return len(np.load(self.root / f"{self.names[0]}.npy", mmap_mode="r"))

    def __getitem__(self, i):
        if self.arrays is None:  # opened lazily in each writer process
            self.arrays = [np.load(self.root / f"{n}.npy", mmap_mode="r") for n in self.names]
        return tuple(int(a[i]) if n == "label" else np.ascontiguousarray(a[i]) for n, a in zip(self.names, self.arrays))


def write_ffcv(memmap_root: Path, fields: dict, path: Path, num_workers: int = 0) -> None:
    from .loader import keep_torch_threads

    with keep_torch_threads():
        _write_ffcv(memmap_root, fields, path, num_workers)


def _write_ffcv(memmap_root: Path, fields: dict, path: Path, num_workers: int) -> None:
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    specs = {k: (np.dtype(v["dtype"]), tuple(v["shape"])) for k, v in fields.items()}
    ff = {k: IntField() if k == "label" else NDArrayField(dtype=dt, shape=sh) for k, (dt, sh) in specs.items()}
    record_bytes = sum(dt.itemsize * int(np.prod(sh)) for dt, sh in specs.values())
    page = 1 << 23
    while page < 4 * record_bytes:
        page *= 2
    tmp = path.with_name(path.name + ".tmp")
    writer = DatasetWriter(str(tmp), ff, page_size=page, num_workers=num_workers or min(8, os.cpu_count() or 1))
    writer.from_indexed_dataset(_Records(memmap_root, list(ff)), chunksize=64)
    os.replace(tmp, path)


def finalize(partial: Path, out: Path, config: dict, plan: dict, progress: list[dict], src, full_checksum: bool,
             overwrite: bool, bookkeeping: tuple[str, ...]) -> dict:
    """Turn the finished `partial` into the dataset `out`; -> its manifest. progress: each rank's
    final progress record ({"written", "skipped", ...}), in rank order."""
    mm = partial / fmt.MEMMAP_DIR
    n = len(plan["kept"])
    gaps, late = [], []
    for r, p in enumerate(progress):
        lo, hi = rank_block(n, r, len(progress))
        gaps += range(lo + p["written"], hi)
        late += p["skipped"]
    moves = close_gaps(mm, list(config["fields"]), gaps, n)
    num_samples = n - len(gaps)
    latent = None
    if config["kind"] == "latent":
        fixed = _fixed_latent_stats(config["vae"])
        if fixed is not None:  # an end-to-end (REPA-E) VAE: its SiT's BatchNorm statistics, held fixed
            mean, std, stats_from = fixed["mean"], fixed["std"], "vae latent_stats.json (fixed BatchNorm)"
        else:
            mean, std = latent_channel_stats(np.load(mm / "latent.npy", mmap_mode="r"))
            stats_from = "data"
        latent = {"shape": config["fields"]["latent"]["shape"][1:], "dtype": "float32", "vae": config["vae"],
                  "channel_mean": mean, "channel_std": std, "stats_from": stats_from}
    files = []
    if "ffcv" in config["formats"]:
        if not (partial / fmt.FFCV_FILE).exists():
            write_ffcv(mm, config["fields"], partial / fmt.FFCV_FILE)
        files.append(fmt.FFCV_FILE)
    if "memmap" in config["formats"]:
        files += [f"{fmt.MEMMAP_DIR}/{name}.npy" for name in config["fields"]]
    else:
        import shutil
        shutil.rmtree(mm)
    late_idx = {s["index"] for s in late}
    manifest = {
        "format": fmt.FORMAT, "version": fmt.VERSION, "kind": config["kind"],
        "num_samples": num_samples, "num_views": fmt.NUM_VIEWS,
        "num_records": num_samples * fmt.NUM_VIEWS, "resolution": config["resolution"],
        "num_classes": len(src.classes), "classes": src.classes,
        "flips": "stored: record 2i+v is sample i as is (v=0) or mirrored (v=1), latent and tokens each encoded",
        "latent": latent, "encoders": config["encoders"],
        # the scaling loaders apply by default; launch/sample.py reads it to unscale samples
        "latent_stats": {"mean": latent["channel_mean"], "std": latent["channel_std"]} if latent else None,
        "fields": config["fields"], "formats": config["formats"],
        "files": fmt.record_files(partial, files, full=full_checksum),
        "source": {"root": config["source"], "listing_sha256": config["listing_sha256"],
                   "count": config["num_listed"], "used": num_samples,
                   "order": "listing order of the used files; 'moved': [sample, listing position] of the samples "
                            "moved into the places of files that failed to decode",
                   "moved": [[to, int(plan["kept"][frm])] for to, frm in moves]},
        "skipped": sorted(plan["skipped"] + late, key=lambda s: s["index"]),
        "converted_to_rgb": {mode: sum(i not in late_idx for i in idx) for mode, idx in plan["converted"].items()},
        "small_images": {"policy": plan["small_images"], "resolution": config["resolution"],
                         **_small_summary(plan, late_idx, src)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tool": fmt.TOOL,
    }
    fmt.write_json_atomic(partial / fmt.MANIFEST, manifest)  # last: marks the folder complete
    replace_out(partial, out, overwrite, bookkeeping)
    return manifest


def _small_summary(plan: dict, late_idx: set, src) -> dict:
    """Images below the crop size: how many were upscaled (or skipped, by the policy), the smallest."""
    small = [s for s in plan["small"] if s[0] not in late_idx]
    out = {"skipped" if plan["small_images"] == "skip" else "upscaled": len(small)}
    if small:
        i, w, h = min(small, key=lambda s: min(s[1], s[2]))
        out["smallest"] = {"path": src.paths[i], "size": [w, h]}
    return out


def summary(manifest: dict) -> list[str]:
    """What the user should know about the files of a finished preparation, as lines for the screen."""
    lines = []
    src, skipped = manifest["source"], manifest["skipped"]
    if skipped:
        shown = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:EXAMPLES])
        more = f"; and {len(skipped) - EXAMPLES} more" if len(skipped) > EXAMPLES else ""
        lines.append(f"skipped {len(skipped)} of {src['count']} files ({shown}{more}); all listed in "
                     f"{fmt.MANIFEST} \"skipped\"")
    conv = {m: c for m, c in manifest["converted_to_rgb"].items() if c}
    if conv:
        lines.append(f"converted to RGB: {_count(sum(conv.values()), 'image')} ("
                     + ", ".join(f"{c} {m}" for m, c in sorted(conv.items())) + ")")
    small = manifest["small_images"]
    if small.get("upscaled"):
        s = small["smallest"]
        lines.append(f"upscaled {_count(small['upscaled'], 'image')} smaller than {small['resolution']} px (smallest "
                     f"{s['size'][0]}x{s['size'][1]}: {s['path']}); --small_images skip leaves them out")
    elif small.get("skipped"):
        lines.append(f"{_count(small['skipped'], 'skipped image')} smaller than {small['resolution']} px "
                     f"(--small_images upscale keeps them, upscaled)")
    return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
