"""Prepare a dataset once: crop -> VAE posterior (or pixels) -> encoder tokens, both flips.

Layout and field meanings: data/format.py. The run is built to survive interruption:

- everything is written under `<out>.partial/`: preallocated .npy memmaps (one per field,
  all records), `config.json` (what is being prepared, so a rerun with other settings or
  another source listing is refused instead of mixing data), `progress-<rank>.json`;
- rank r of W owns a contiguous block of samples and writes its rows in place; after
  each batch its memmaps are flushed and then its progress file is replaced atomically,
  so a killed run loses at most the batch in flight and a rerun continues from there;
- when every rank is done, rank 0 computes the latent channel statistics, writes the
  FFCV file (from the memmaps), records sizes and digests, writes manifest.json last and
  renames `<out>.partial` to `<out>`. A folder named `<out>` is therefore always complete.

Under torchrun each rank is one process (`torch.distributed` initialized by the caller);
without it, ranks may also be separate invocations with rank/world_size given: rank 0
then waits for the others' progress files before it finalizes.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from irepa.codec import DIGITS_CODEC, open_codec
from irepa.dist import barrier, pick_device, rank_world

from . import format as fmt
from .sources import open_source

def build_encoder(enc: str | nn.Module) -> nn.Module:
    if isinstance(enc, nn.Module):
        return enc
    from irepa.encoders import build

    return build(enc)


# ---------------------------------------------------------------------------------------
# coordination helpers

def _collective() -> bool:
    """Ranks are processes of one torch.distributed group (torchrun), not separate invocations."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _wait_for(pred, what: str, timeout: float, poll: float = 2.0) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(min(poll, timeout))


def _progress(partial: Path, r: int) -> dict:
    p = partial / f"progress-{r}.json"
    return json.loads(p.read_text()) if p.exists() else {"done": 0, "finished": False}


def rank_block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Samples [lo, hi) owned by `rank`: contiguous, sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


# ---------------------------------------------------------------------------------------
# the run

def prepare(source: str, out: str, *, resolution: int = 256, vae: str | None = None,
            encoders: Sequence[str | nn.Module] = ("hog-patch",), storage: str | Sequence[str] = "bf16",
            kind: str = "latent", store_images: bool = False, formats: Sequence[str] = ("ffcv", "memmap"),
            batch_size: int = 32, device: str = "auto", rank: int | None = None, world_size: int | None = None,
            num_threads: int = 4, full_checksum: bool = False, overwrite: bool = False,
            max_batches: int | None = None, wait_timeout: float = 24 * 3600.0, progress: bool = True) -> str | None:
    """Prepare `source` ("digits" or an image folder) into the folder `out`.

    vae: a local diffusers AutoencoderKL folder, or "digits-codec" (default for digits);
    unused for kind "pixels". encoders: names for `irepa.encoders.build` or modules with
    .name/.dim. storage: "bf16" or "fp8", one for all encoders or one each.
    formats: any of "ffcv", "memmap". max_batches: stop after that many batches in this
    call, leaving a resumable partial run (used to test resumption).
    Returns `out` once the dataset is complete, else None (stopped early, or a rank other
    than 0 outside torch.distributed). A complete `out` is left as it is when it was made
    from the same request, and refused (naming what differs) otherwise, unless overwrite=True.
    """
    d = _collective()
    group_rank, group_world = rank_world()
    rank = group_rank if (rank is None and d) else (rank or 0)
    world_size = group_world if (world_size is None and d) else (world_size or 1)
    formats = tuple([formats] if isinstance(formats, str) else formats)
    if not formats or set(formats) - {"ffcv", "memmap"}:
        raise ValueError(f"formats must be a non-empty subset of ('ffcv', 'memmap'), got {formats}")
    if "ffcv" in formats:  # checked now, not when the FFCV file is written after the whole encoding pass
        from .loader import ffcv_available

        if not ffcv_available():
            raise ImportError("formats include 'ffcv' but ffcv cannot be imported here (see README: "
                              "IREPA_WITH_FFCV=1 bash launch/install.sh); prepare with --formats memmap")
    out_p, partial = Path(out), Path(str(out) + ".partial")
    package = Path(__file__).resolve().parent
    if package == out_p.resolve() or package in out_p.resolve().parents:
        raise ValueError(f"{out}: inside the irepa.data source package ({package}); prepared datasets live outside "
                         f"the source tree (e.g. /data/<name>)")
    if kind not in ("latent", "pixels"):
        raise ValueError(f"kind must be 'latent' or 'pixels', got {kind!r}")
    vae = (vae or (DIGITS_CODEC if source == "digits" else None)) if kind == "latent" else None
    if kind == "latent" and not vae:
        raise ValueError("kind 'latent' needs vae= (a local AutoencoderKL folder, or 'digits-codec')")
    storages = [storage] * len(encoders) if isinstance(storage, str) else list(storage)
    if len(storages) != len(encoders):
        raise ValueError(f"{len(storages)} storage entries for {len(encoders)} encoders")
    src = open_source(source, resolution)
    if (out_p / fmt.MANIFEST).exists() and not overwrite:
        # already complete: preparing again is a no-op, but only for the same request
        diff = _settings_diff(fmt.read_manifest(out_p), src, resolution, kind, vae, encoders, storages,
                              store_images, formats)
        if diff:
            raise ValueError(f"{out_p} already holds a prepared dataset with other settings ({'; '.join(diff)}); "
                             f"choose another output folder, or pass --overwrite (overwrite=True) to replace it")
        return str(out_p)
    dev = pick_device(device)

    codec = None if kind == "pixels" else open_codec(vae, dev, resolution)
    encs = [build_encoder(e).to(dev).eval() for e in encoders]

    # shapes from one dry run, so the memmaps can be preallocated
    probe = torch.zeros(1, 3, resolution, resolution, device=dev)
    latent_shape = list(codec.encode(probe)[0].shape[1:]) if codec is not None else None
    enc_info = []
    for e, s in zip(encs, storages):
        y = e(probe)
        enc_info.append({"name": e.name, "family": _encoder_family(e.name), "dim": int(y.shape[-1]),
                         "tokens": int(y.shape[1]), "storage": s})
        if y.shape[-1] != getattr(e, "dim", y.shape[-1]):
            raise ValueError(f"encoder {e.name}: .dim {e.dim} but it returned {y.shape[-1]} channels")
    fields = fmt.build_fields(kind, resolution, latent_shape, enc_info, store_images)
    n = len(src)
    config = {"source": src.description, "listing_sha256": src.listing_hash, "num_samples": n,
              "resolution": resolution, "kind": kind, "vae": codec.name if codec is not None else None,
              "encoders": enc_info, "fields": fields, "formats": list(formats), "world_size": world_size}

    _setup_partial(partial, config, fields, n, rank, overwrite, d, wait_timeout)
    finished = _run_rank(partial, src, codec, encs, enc_info, fields, rank, world_size, batch_size, dev,
                         num_threads, max_batches, progress)
    all_done = lambda: all(_progress(partial, r)["finished"] for r in range(world_size))  # noqa: E731
    if d:
        barrier()
        if not all_done():  # every rank reads the same files after the barrier, so all agree
            return None
    elif not finished or rank != 0:
        return None
    else:
        _wait_for(all_done, "the other ranks' progress files", wait_timeout)
    if rank == 0:
        _finalize(partial, out_p, config, src, full_checksum, overwrite)
    if d:
        barrier()
    return str(out_p)


def _encoder_name(e) -> str:
    if not isinstance(e, str):
        return e.name
    try:
        from irepa.encoders import get_spec

        return get_spec(e).name
    except Exception:  # unknown name: compared as given (and refused when it is built)
        return e


def _encoder_family(name: str) -> str | None:
    """The registry family of a registered encoder name (None for a module given directly)."""
    from irepa.encoders import REGISTRY

    return REGISTRY[name].family if name in REGISTRY else None


def _settings_diff(manifest: dict, src, resolution: int, kind: str, vae: str | None, encoders, storages,
                   store_images: bool, formats) -> list[str]:
    """What a request changes against a complete dataset's manifest, as 'key: stored -> asked'."""
    vae_name = None if vae is None else vae if vae == DIGITS_CODEC else str(Path(vae).resolve())
    have = {"source": manifest.get("source", {}).get("root"),
            "source listing": manifest.get("source", {}).get("listing_sha256"),
            "resolution": manifest["resolution"], "kind": manifest["kind"],
            "vae": (manifest.get("latent") or {}).get("vae"),
            "encoders": [(e["name"], e["storage"]) for e in manifest["encoders"]],
            "store_images": "images" in manifest["fields"], "formats": sorted(manifest.get("formats", []))}
    want = {"source": src.description, "source listing": src.listing_hash, "resolution": resolution, "kind": kind,
            "vae": vae_name, "encoders": [(_encoder_name(e), s) for e, s in zip(encoders, storages)],
            "store_images": bool(store_images) and kind == "latent", "formats": sorted(formats)}
    out = []
    for k in have:
        if have[k] != want[k]:
            out.append(f"{k}: {have[k]!r} -> {want[k]!r}" if k != "source listing" else
                       "source listing: the image files differ")
    return out


def _setup_partial(partial: Path, config: dict, fields: dict, n: int, rank: int, overwrite: bool, d: bool,
                   wait_timeout: float) -> None:
    cfg_path = partial / "config.json"
    if rank == 0:
        if partial.exists() and overwrite:
            shutil.rmtree(partial)
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            if old != config:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ValueError(f"{partial}: an unfinished preparation with different settings ({', '.join(diff)}) "
                                 f"is in the way; delete it, or pass --overwrite (overwrite=True) to start over")
        else:
            shutil.rmtree(partial, ignore_errors=True)  # a setup that died before config.json
            tmp = Path(str(partial) + f".setup{os.getpid()}")
            (tmp / fmt.MEMMAP_DIR).mkdir(parents=True)
            for name, (dtype, shape) in fmt.field_specs(config).items():
                # sparse preallocation: pages appear as ranks write them
                np.lib.format.open_memmap(tmp / fmt.MEMMAP_DIR / f"{name}.npy", mode="w+", dtype=dtype,
                                          shape=(n * fmt.NUM_VIEWS, *shape)).flush()
            fmt.write_json_atomic(tmp / "config.json", config)
            os.rename(tmp, partial)
    if d:
        barrier()
    else:
        _wait_for(cfg_path.exists, f"{cfg_path} (rank 0 creates it)", wait_timeout)
    if json.loads(cfg_path.read_text()) != config:
        raise ValueError(f"rank {rank}: settings differ from {cfg_path} written by rank 0")


def _run_rank(partial, src, codec, encs, enc_info, fields, rank, world_size, batch_size, dev, num_threads,
              max_batches, progress) -> bool:
    lo, hi = rank_block(len(src), rank, world_size)
    state = _progress(partial, rank)
    start = lo + state["done"]
    arrays = {name: np.load(partial / fmt.MEMMAP_DIR / f"{name}.npy", mmap_mode="r+") for name in fields}
    starts = list(range(start, hi, batch_size))
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=hi - lo, initial=start - lo, unit="img", desc=f"prepare rank {rank}/{world_size}")
    # decoders in one pool, the next batch assembled by another (never waits on its own pool)
    pool, ahead = ThreadPoolExecutor(max(1, num_threads)), ThreadPoolExecutor(1)
    load_one = functools.partial(_load_sample, src)
    load = lambda s: list(pool.map(load_one, range(s, min(s + batch_size, hi))))  # noqa: E731
    nxt = ahead.submit(load, starts[0]) if starts else None
    try:
        for b, s in enumerate(starts):
            if max_batches is not None and b >= max_batches:
                return False
            crops = nxt.result()
            nxt = ahead.submit(load, starts[b + 1]) if b + 1 < len(starts) else None
            e = s + len(crops)
            rows = _encode_batch(np.stack(crops), src.labels[s:e], codec, encs, enc_info, dev)
            for name, arr in arrays.items():
                arr[2 * s:2 * e] = rows[name]
                arr.flush()
            fmt.write_json_atomic(partial / f"progress-{rank}.json", {"done": e - lo, "finished": e == hi})
            if bar:
                bar.update(e - s)
        if not starts:  # an empty block, or a block finished before an interruption was recorded
            fmt.write_json_atomic(partial / f"progress-{rank}.json", {"done": hi - lo, "finished": True})
        return True
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        if bar:
            bar.close()


def _load_sample(src, i: int) -> np.ndarray:
    try:
        return src.load(i)
    except Exception as e:  # an unreadable file stops the run: say how to go on without losing work
        raise ValueError(f"{e}\nSamples finished so far are kept in the .partial folder. Replace the file with a "
                         f"readable image and run the same command again to continue, or delete it and rerun "
                         f"with --overwrite (the file listing changes, so the run starts over)") from e


@torch.no_grad()
def _encode_batch(crops: np.ndarray, labels: np.ndarray, codec, encs, enc_info, dev) -> dict:
    """crops uint8 [B, R, R, 3] -> field rows for records (2i, 2i+1) = (as is, mirrored)."""
    u8 = torch.from_numpy(crops).permute(0, 3, 1, 2)  # [B, 3, R, R]
    u8 = torch.stack([u8, u8.flip(-1)], dim=1).flatten(0, 1).contiguous()  # [2B, 3, R, R]
    x01 = u8.to(dev).float().div_(255)
    rows = {"label": np.repeat(labels, 2)}
    if codec is not None:
        mean, std = codec.encode(x01)
        rows["latent"] = torch.stack([mean, std], dim=1).cpu().numpy().astype(np.float32)
        rows["images"] = u8.numpy()
    else:
        rows["pixels"] = u8.numpy()
    for k, (e, info) in enumerate(zip(encs, enc_info)):
        y = e(x01)
        if info["storage"] == "bf16":
            rows[f"feat_{k}"] = fmt.encode_bf16(y)
        else:
            rows[f"feat_{k}"], rows[f"scale_{k}"] = fmt.encode_fp8(y)
    return rows


# ---------------------------------------------------------------------------------------
# finalize: stats, FFCV file, digests, manifest, rename

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


def _finalize(partial: Path, out: Path, config: dict, src, full_checksum: bool, overwrite: bool) -> None:
    mm = partial / fmt.MEMMAP_DIR
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
        shutil.rmtree(mm)
    manifest = {
        "format": fmt.FORMAT, "version": fmt.VERSION, "kind": config["kind"],
        "num_samples": config["num_samples"], "num_views": fmt.NUM_VIEWS,
        "num_records": config["num_samples"] * fmt.NUM_VIEWS, "resolution": config["resolution"],
        "num_classes": len(src.classes), "classes": src.classes,
        "flips": "stored: record 2i+v is sample i as is (v=0) or mirrored (v=1), latent and tokens each encoded",
        "latent": latent, "encoders": config["encoders"],
        # the scaling loaders apply by default; launch/sample.py reads it to unscale samples
        "latent_stats": {"mean": latent["channel_mean"], "std": latent["channel_std"]} if latent else None, "fields": config["fields"],
        "formats": config["formats"], "files": fmt.record_files(partial, files, full=full_checksum),
        "source": {"root": config["source"], "listing_sha256": config["listing_sha256"], "count": config["num_samples"]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tool": "irepa.data.prepare",
    }
    fmt.write_json_atomic(partial / fmt.MANIFEST, manifest)  # last: marks the folder complete
    old = None
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
        old = Path(str(out) + f".old{os.getpid()}")
        os.rename(out, old)
    os.rename(partial, out)
    # bookkeeping goes only now: a crash before the rename must still find it in .partial
    for p in [*out.glob("progress-*.json"), out / "config.json"]:
        p.unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old)
