"""Prepare a dataset once: crop -> VAE posterior (or pixels) -> encoder tokens, both flips.

Layout and field meanings: data/format.py. What OUT may be (and what --overwrite may
replace): data/out_folder.py, checked with every option before any work. The run survives
interruption and bad image files:

- everything is written under `<out>.partial/`: `config.json` (what is being prepared, so a
  rerun with other settings or another source listing is refused instead of mixing data),
  `plan.json` (the files left out, and why), preallocated .npy memmaps (one per field, all
  records), `progress-<rank>.json`;
- before anything is encoded, every listed file is checked (data/scan.py: about one open per
  file). Under torchrun each rank checks a block of the listing and the results are gathered,
  so every rank holds the same plan. Unusable files are left out of it: the samples are the
  other files in listing order, and the memmaps have exactly their rows. strict=True stops at
  the first unusable file instead, before anything is written. A plan is fixed once written: a
  rerun resumes it (a file repaired meanwhile stays out until --overwrite starts over);
- rank r of W owns a contiguous block of the samples and writes its rows in place. A file
  that passed the check and still fails to decode (rare: a corrupt JPEG body) is skipped there:
  its rank writes the next sample in its row, so its block ends with one empty row per such
  file. After each batch the memmaps are flushed and then the progress file (samples done,
  rows written, files skipped) is replaced atomically, so a killed run loses at most the batch
  in flight and a rerun continues from there;
- when every rank is done, rank 0 moves the last samples into the empty rows and cuts the
  memmaps there (data/finalize.py: a few rows move, nothing is rewritten), computes the latent
  channel statistics, writes the FFCV file (from the memmaps), records sizes and digests, writes
  manifest.json last and renames `<out>.partial` to `<out>`. A folder named `<out>` is
  therefore complete, and each of its records is an image's.

The manifest lists each skipped file with its reason ("skipped"), counts the images converted
to RGB ("converted_to_rgb") and those smaller than the crop ("small_images": upscaled as ADM's
center crop does, or skipped); rank 0 prints the same in short.

Under torchrun each rank is one process (`torch.distributed` initialized by the caller); an
error on one rank ends every rank with its message (irepa.dist.on_every_rank): the failing rank
leaves a `failed-<rank>` marker, the others stop at their next batch (their rows kept for the
rerun). Without torchrun, ranks may also be separate invocations with rank/world_size given:
rank 0 then checks the files alone, and waits for the others' progress files before it finalizes.
"""
from __future__ import annotations

import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from irepa.codec import DIGITS_CODEC, open_codec
from irepa.dist import all_gather_object, on_every_rank, pick_device, rank_world
from irepa.errors import InputError

from . import format as fmt
from . import scan as file_scan
from .finalize import finalize, rank_block, summary
from .out_folder import CONFIG, check_out
from .sources import open_source

FORMATS = ("ffcv", "memmap")
PLAN = "plan.json"
FAILED = "failed-*"  # a rank's encoding pass failed (torchrun): the others stop at their next batch
BOOKKEEPING = ("progress-*.json", CONFIG, PLAN)  # deleted once the dataset is renamed into place


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
    return json.loads(p.read_text()) if p.exists() else {"done": 0, "written": 0, "skipped": [], "finished": False}


def _say(msg: str, rank: int) -> None:
    if rank == 0:
        print(f"prepare: {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# options, checked before any work

def _check_formats(formats) -> None:
    if formats is None:
        return
    formats = [formats] if isinstance(formats, str) else list(formats)
    if not formats or set(formats) - set(FORMATS):
        raise InputError(f"--formats {','.join(map(str, formats)) or '(none)'}: choose from ffcv, memmap "
                         f"(one or both)")


def resolve_formats(formats: str | Sequence[str] | None, rank: int = 0) -> tuple[str, ...]:
    """The formats to write: as asked, or with None what this machine can write: FFCV and memmap
    where ffcv imports, memmap alone otherwise (said in one line)."""
    from .loader import ffcv_available

    if formats is None:
        if ffcv_available():
            return FORMATS
        _say("FFCV is not installed here, so only the memmap format is written (the loaders read it "
             "everywhere; IREPA_WITH_FFCV=1 bash launch/install.sh adds FFCV)", rank)
        return ("memmap",)
    _check_formats(formats)
    formats = tuple([formats] if isinstance(formats, str) else formats)
    if "ffcv" in formats and not ffcv_available():  # now, not when the FFCV file is due after all the encoding
        raise InputError("--formats includes ffcv but ffcv cannot be imported here (IREPA_WITH_FFCV=1 bash "
                         "launch/install.sh builds it); prepare with --formats memmap")
    return formats


def _check_options(kind: str, resolution, batch_size, storages: list, small_images: str) -> None:
    if kind not in ("latent", "pixels"):
        raise InputError(f"--kind {kind}: choose latent or pixels")
    if not isinstance(resolution, int) or resolution < 1:
        raise InputError(f"--resolution {resolution}: a positive number of pixels")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch_size {batch_size}: at least 1 image per batch")
    bad = [s for s in storages if s not in fmt.STORAGES]
    if bad:
        raise InputError(f"--storage {bad[0]}: choose from {', '.join(fmt.STORAGES)} (one for all encoders, "
                         f"or one each)")
    if small_images not in file_scan.SMALL_IMAGES:
        raise InputError(f"--small_images {small_images}: choose from {', '.join(file_scan.SMALL_IMAGES)}")


def _probe(codec, encs, storages, resolution: int, dev) -> tuple[list | None, list[dict]]:
    """Latent shape and encoder entries from one dry run at `resolution` (so the memmaps can be
    preallocated); a resolution the VAE or an encoder cannot take is refused with the smallest
    one that works."""
    try:
        return _probe_at(codec, encs, storages, resolution, dev)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, RuntimeError) as e:
        if isinstance(e, InputError):
            raise
        err = e
    works = next((r for r in range(8, 513, 8) if r != resolution and _probe_works(codec, encs, storages, r, dev)),
                 None)
    if works is None:  # no size works: not the resolution's fault
        raise err
    raise InputError(f"--resolution {resolution}: {err}; the smallest resolution these encoders and VAE take "
                     f"is {works}") from None


def _probe_works(codec, encs, storages, resolution: int, dev) -> bool:
    try:
        _probe_at(codec, encs, storages, resolution, dev)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, RuntimeError):
        return False
    return True


def _probe_at(codec, encs, storages, resolution: int, dev) -> tuple[list | None, list[dict]]:
    probe = torch.zeros(1, 3, resolution, resolution, device=dev)
    latent_shape = list(codec.encode(probe)[0].shape[1:]) if codec is not None else None
    enc_info = []
    for e, s in zip(encs, storages):
        y = e(probe)
        enc_info.append({"name": e.name, "family": _encoder_family(e.name), "dim": int(y.shape[-1]),
                         "tokens": int(y.shape[1]), "storage": s})
        if y.shape[-1] != getattr(e, "dim", y.shape[-1]):
            raise TypeError(f"encoder {e.name}: .dim {e.dim} but it returned {y.shape[-1]} channels")
    return latent_shape, enc_info


# ---------------------------------------------------------------------------------------
# the run

def prepare(source: str, out: str, *, resolution: int = 256, vae: str | None = None,
            encoders: Sequence[str | nn.Module] = ("hog-patch",), storage: str | Sequence[str] = "bf16",
            kind: str = "latent", store_images: bool = False, formats: Sequence[str] | None = None,
            batch_size: int = 32, device: str = "auto", rank: int | None = None, world_size: int | None = None,
            num_threads: int = 4, full_checksum: bool = False, overwrite: bool = False,
            small_images: str = "upscale", strict: bool = False, max_batches: int | None = None,
            wait_timeout: float = 24 * 3600.0, progress: bool = True) -> str | None:
    """Prepare `source` ("digits" or an image folder) into the folder `out`.

    vae: a local diffusers AutoencoderKL folder, or "digits-codec" (default for digits);
    unused for kind "pixels". encoders: names for `irepa.encoders.build` or modules with
    .name/.dim. storage: "bf16" or "fp8", one for all encoders or one each.
    formats: any of "ffcv", "memmap"; None: both where ffcv imports, else memmap.
    small_images: "upscale" (ADM's crop) or "skip" images whose short side is below `resolution`.
    strict: stop at the first unusable image file instead of skipping it.
    max_batches: stop after that many batches in this call, leaving a resumable partial run
    (used to test resumption).
    Returns `out` once the dataset is complete, else None (stopped early, or a rank other
    than 0 outside torch.distributed). A complete `out` is left as it is when it was made
    from the same request, and refused (naming what differs) otherwise, unless overwrite=True.
    """
    d = _collective()
    group_rank, group_world = rank_world()
    rank = group_rank if (rank is None and d) else (rank or 0)
    world_size = group_world if (world_size is None and d) else (world_size or 1)
    encoders = list(encoders)
    storages = [storage] * len(encoders) if isinstance(storage, str) else list(storage)
    if len(storages) != len(encoders):
        raise InputError(f"--storage: {len(storages)} entries for {len(encoders)} encoders (give one, or one each)")
    _check_options(kind, resolution, batch_size, [storage] if isinstance(storage, str) else storages, small_images)
    _check_formats(formats)
    vae = (vae or (DIGITS_CODEC if source == "digits" else None)) if kind == "latent" else None
    if kind == "latent" and not vae:
        raise InputError("--kind latent needs --vae (a local diffusers AutoencoderKL folder, or digits-codec)")
    asked_formats = formats
    src = open_source(source, resolution)
    out_p, partial = Path(out), Path(str(out) + ".partial")
    complete = check_out(out_p, partial, src.root, overwrite)
    if complete and not overwrite:
        # already complete: preparing again is a no-op, but only for the same request
        diff = _settings_diff(fmt.read_manifest(out_p), src, resolution, kind, vae, encoders, storages,
                              store_images, asked_formats, small_images)
        if diff:
            raise InputError(f"{out_p} already holds a prepared dataset with other settings ({'; '.join(diff)}); "
                             f"choose another output folder, or pass --overwrite to replace it")
        return str(out_p)
    formats = resolve_formats(formats, rank)
    dev = pick_device(device)

    codec = None if kind == "pixels" else open_codec(vae, dev, resolution)
    encs = [build_encoder(e).to(dev).eval() for e in encoders]
    with torch.no_grad():
        latent_shape, enc_info = _probe(codec, encs, storages, resolution, dev)
    fields = fmt.build_fields(kind, resolution, latent_shape, enc_info, store_images)
    config = {"source": src.description, "listing_sha256": src.listing_hash, "num_listed": len(src),
              "small_images": small_images, "resolution": resolution, "kind": kind,
              "vae": codec.name if codec is not None else None, "encoders": enc_info, "fields": fields,
              "formats": list(formats), "world_size": world_size}

    plan = _setup_partial(partial, config, src, rank, world_size, overwrite, strict, num_threads, progress, d,
                          wait_timeout)
    encode = functools.partial(_run_rank, partial, src, plan["kept"], codec, encs, enc_info, fields, rank, world_size,
                               batch_size, dev, num_threads, max_batches, progress, strict)
    finished = _encode_on_every_rank(encode, partial, rank, d)
    ranks = lambda: [_progress(partial, r) for r in range(world_size)]  # noqa: E731
    all_done = lambda: all(p["finished"] for p in ranks())  # noqa: E731
    if d:
        # one decision for all ranks, taken before rank 0's finalize moves the progress files into the
        # dataset: a rank that read them after that move would see none, think the work unfinished and
        # exit while rank 0 waits for it in finalize's gather
        if not all(all_gather_object(all_done())):
            return None
    elif not finished or rank != 0:
        return None
    else:
        _wait_for(all_done, "the other ranks' progress files", wait_timeout)
    manifest = on_every_rank(lambda: finalize(partial, out_p, config, plan, ranks(), src, full_checksum, overwrite,
                                              BOOKKEEPING) if rank == 0 else None)
    if manifest is not None:
        for line in summary(manifest):
            _say(line, rank)
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
    """The registry family of an encoder name, a control's ("control") included (None for a module given
    directly)."""
    from irepa.encoders import get_spec

    try:
        return get_spec(name).family
    except InputError:
        return None


def _settings_diff(manifest: dict, src, resolution: int, kind: str, vae: str | None, encoders, storages,
                   store_images: bool, formats, small_images: str) -> list[str]:
    """What a request changes against a complete dataset's manifest, as 'key: stored -> asked'.
    formats None (the default) accepts the formats stored."""
    vae_name = None if vae is None else vae if vae == DIGITS_CODEC else str(Path(vae).resolve())
    have = {"source": manifest.get("source", {}).get("root"),
            "source listing": manifest.get("source", {}).get("listing_sha256"),
            "resolution": manifest["resolution"], "kind": manifest["kind"],
            "vae": (manifest.get("latent") or {}).get("vae"),
            "encoders": [(e["name"], e["storage"]) for e in manifest["encoders"]],
            "store_images": "images" in manifest["fields"], "formats": sorted(manifest.get("formats", [])),
            "small_images": manifest.get("small_images", {}).get("policy", "upscale")}  # before the option: upscaled
    want = {"source": src.description, "source listing": src.listing_hash, "resolution": resolution, "kind": kind,
            "vae": vae_name, "encoders": [(_encoder_name(e), s) for e, s in zip(encoders, storages)],
            "store_images": bool(store_images) and kind == "latent",
            "formats": have["formats"] if formats is None else sorted([formats] if isinstance(formats, str)
                                                                      else formats),
            "small_images": small_images}
    out = []
    for k in have:
        if have[k] != want[k]:
            out.append(f"{k}: {have[k]!r} -> {want[k]!r}" if k != "source listing" else
                       "source listing: the image files differ")
    return out


# ---------------------------------------------------------------------------------------
# setup: the plan of files and the preallocated partial folder

def _setup_partial(partial: Path, config: dict, src, rank: int, world_size: int, overwrite: bool, strict: bool,
                   num_threads: int, progress: bool, d: bool, wait_timeout: float) -> dict:
    """Create `partial` (rank 0), or check the one there against `config`; -> the plan every rank follows."""
    cfg_path = partial / CONFIG
    on_every_rank(lambda: _check_partial(partial, config, overwrite) if rank == 0 else None)
    if d or rank == 0:
        if not cfg_path.exists():  # every rank sees the same after on_every_rank's gather
            plan = _plan(src, config, rank, world_size, strict, num_threads, progress, d)
            on_every_rank(lambda: _create_partial(partial, config, plan) if rank == 0 else None)
    else:
        _wait_for(cfg_path.exists, f"{cfg_path} (rank 0 creates it)", wait_timeout)
    if json.loads(cfg_path.read_text()) != config:
        raise ValueError(f"rank {rank}: settings differ from {cfg_path} written by rank 0")
    plan = json.loads((partial / PLAN).read_text())
    if strict and plan["skipped"]:  # resuming a run that skipped files
        raise _strict_error(src, plan["skipped"][0], f"the unfinished run in {partial} skips it; --overwrite "
                                                     f"starts over")
    dropped = np.asarray(sorted(s["index"] for s in plan["skipped"]), dtype=np.int64)
    plan["kept"] = np.setdiff1d(np.arange(config["num_listed"]), dropped)
    return plan


def _check_partial(partial: Path, config: dict, overwrite: bool) -> None:
    """An unfinished preparation is resumed only for the same request; overwrite starts it over."""
    import shutil

    if not partial.exists():
        return
    if overwrite:
        shutil.rmtree(partial)
        return
    for marker in partial.glob(FAILED):  # from a failed run: this one starts without failures
        marker.unlink()
    old = json.loads((partial / CONFIG).read_text())
    if old != config:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise InputError(f"{partial}: an unfinished preparation with different settings ({', '.join(diff)}) "
                         f"is in the way; delete it, or pass --overwrite to start over")


def _plan(src, config: dict, rank: int, world_size: int, strict: bool, num_threads: int, progress: bool,
          d: bool) -> dict:
    """Check the listed files (each rank a block under torchrun, rank 0 all of them otherwise) -> the plan."""
    n = len(src)
    if src.root is None:  # the built-in digits: no files to check
        return {"skipped": [], "converted": {}, "small": [], "small_images": config["small_images"]}
    lo, hi = rank_block(n, rank, world_size) if d else (0, n)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=hi - lo, unit="file", desc=f"check files rank {rank}/{world_size if d else 1}")
    try:
        mine = on_every_rank(lambda: file_scan.scan(src, lo, hi, config["small_images"], strict, num_threads, bar))
    finally:
        if bar:
            bar.close()
    plan = {**file_scan.merge(all_gather_object(mine)), "small_images": config["small_images"]}
    if strict and plan["skipped"]:
        raise _strict_error(src, plan["skipped"][0], "without it such files are skipped and listed in the manifest")
    used = np.bincount(np.delete(src.labels, [s["index"] for s in plan["skipped"]]), minlength=len(src.classes))
    if (used == 0).any():
        c = int(np.flatnonzero(used == 0)[0])
        first = next(s for s in plan["skipped"] if src.labels[s["index"]] == c)
        raise InputError(f"{src.root / src.classes[c]}: no usable image in this class folder (first: {first['path']}: "
                         f"{first['reason']}); fix or remove its files, or remove the folder")
    return plan


def _strict_error(src, skipped: dict, how_on: str) -> InputError:
    return InputError(f"{src.path(skipped['index'])}: {skipped['reason']} (--strict stops at the first unusable "
                      f"file; {how_on})")


def _create_partial(partial: Path, config: dict, plan: dict) -> None:
    """Preallocate the memmaps for the plan's samples and write plan + config, all in a temporary
    folder renamed into place: a setup killed half-way leaves no `partial` to resume."""
    n = config["num_listed"] - len(plan["skipped"])
    tmp = Path(str(partial) + f".setup{os.getpid()}")
    (tmp / fmt.MEMMAP_DIR).mkdir(parents=True)
    for name, (dtype, shape) in fmt.field_specs(config).items():
        # sparse preallocation: pages appear as ranks write them
        np.lib.format.open_memmap(tmp / fmt.MEMMAP_DIR / f"{name}.npy", mode="w+", dtype=dtype,
                                  shape=(n * fmt.NUM_VIEWS, *shape)).flush()
    fmt.write_json_atomic(tmp / PLAN, plan)
    fmt.write_json_atomic(tmp / CONFIG, config)
    os.rename(tmp, partial)


# ---------------------------------------------------------------------------------------
# the encoding pass of one rank

def _encode_on_every_rank(encode, partial: Path, rank: int, d: bool) -> bool:
    """encode(stop=...) (a _run_rank) under on_every_rank. Under torchrun a failing rank leaves a marker
    that stops the others at their next batch, rather than when their blocks are done."""
    stop = (lambda: any(partial.glob(FAILED))) if d else (lambda: False)  # noqa: E731

    def run():
        try:
            return encode(stop=stop)
        except Exception:
            if d:
                (partial / FAILED.replace("*", str(rank))).touch()
            raise
    return on_every_rank(run)


def _run_rank(partial, src, kept, codec, encs, enc_info, fields, rank, world_size, batch_size, dev, num_threads,
              max_batches, progress, strict, stop) -> bool:
    """Encode this rank's block from where its progress file says; -> finished (False: stopped early,
    by max_batches or because `stop()`, another rank having failed)."""
    lo, hi = rank_block(len(kept), rank, world_size)
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
    load = lambda s: list(pool.map(load_one, kept[s:min(s + batch_size, hi)]))  # noqa: E731
    nxt = ahead.submit(load, starts[0]) if starts else None
    try:
        for b, s in enumerate(starts):
            if (max_batches is not None and b >= max_batches) or stop():
                return False
            loaded = nxt.result()
            nxt = ahead.submit(load, starts[b + 1]) if b + 1 < len(starts) else None
            e = s + len(loaded)
            failed = [{"index": int(i), "path": src.paths[i], "reason": why}
                      for i, (crop, why) in zip(kept[s:e], loaded) if crop is None]
            if failed and strict:
                raise _strict_error(src, failed[0], f"samples done so far are kept in {partial} for the rerun")
            good = [j for j, (crop, _) in enumerate(loaded) if crop is not None]
            w = lo + state["written"]
            if good:
                rows = _encode_batch(np.stack([loaded[j][0] for j in good]), src.labels[kept[s:e][good]], codec,
                                     encs, enc_info, dev)
                for name, arr in arrays.items():
                    arr[2 * w:2 * (w + len(good))] = rows[name]
                    arr.flush()
            state = {"done": e - lo, "written": state["written"] + len(good), "skipped": state["skipped"] + failed,
                     "finished": e == hi}
            fmt.write_json_atomic(partial / f"progress-{rank}.json", state)
            if bar:
                bar.update(e - s)
        if not starts:  # an empty block, or a block finished before an interruption was recorded
            fmt.write_json_atomic(partial / f"progress-{rank}.json", {**state, "done": hi - lo, "finished": True})
        return True
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        if bar:
            bar.close()


def _load_sample(src, i: int) -> tuple[np.ndarray | None, str | None]:
    """(crop, None), or (None, why) for a file that passed the check and still cannot be decoded."""
    try:
        return src.load(int(i)), None
    except InputError as e:
        return None, f"failed when decoded ({e.__cause__ or e})"


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
