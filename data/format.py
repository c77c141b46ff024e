"""The prepared-dataset format: manifest, field layout, feature codecs, integrity checks.

A prepared dataset is a folder:

    manifest.json        written last; its presence means the folder is complete
    data.beton           FFCV file (formats "ffcv")
    memmap/<field>.npy   one numpy array per field, rows = records (formats "memmap")

Records are views: record 2*i + v holds sample i seen as is (v = 0) or mirrored
left-right (v = 1). Each view has its own latent (the SD-VAE is not flip-equivariant, so
the latent of the mirrored image is encoded, not approximated by flipping the latent),
its own encoder tokens and, optionally, its own uint8 image. A loader picks one view per
sample per epoch and reads only that record.

Fields (names are the same in both backends):
    label      int64 []                class index
    latent     float32 [2, C, h, w]    posterior mean and std (kind "latent")
    pixels     uint8 [3, R, R]         the crop itself (kind "pixels", for JiT)
    images     uint8 [3, R, R]         optional crop beside latents (online-encoder mode)
    feat_<k>   int16 [T, E]            encoder k, bf16 bit patterns (storage "bf16")
               uint8 [T, E]            encoder k, fp8 e4m3 bit patterns (storage "fp8")
    scale_<k>  float32 [T]             per-token fp8 scale (storage "fp8" only)
FFCV's NDArrayField refuses float16/bfloat16, hence the integer bit patterns.

What became of the source's files (data/prepare.py): "source" {"count": files listed, "used",
"moved": [sample, listing position] of samples out of listing order}, "skipped" [{"path",
"reason"}], "converted_to_rgb" {mode: count}, "small_images" {"policy", "upscaled" or "skipped",
"smallest"}. "files" holds each data file's size and sampled digest, and its full digest
("full_digest") when prepared with full_checksum.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from irepa.errors import InputError, InputNotFound

FORMAT = "irepa-prepared"
VERSION = 1
MANIFEST = "manifest.json"
FFCV_FILE = "data.beton"
MEMMAP_DIR = "memmap"
NUM_VIEWS = 2
TOOL = "irepa.data.prepare"  # the manifest's "tool": only a folder it names may be replaced (--overwrite)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
STORAGES = ("bf16", "fp8")


# ---------------------------------------------------------------------------------------
# feature codecs

def encode_bf16(y: torch.Tensor) -> np.ndarray:
    """[..., E] float -> int16 array of bf16 bit patterns."""
    return y.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy()


def decode_bf16(bits: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns -> bf16 tensor (a reinterpretation, no copy)."""
    return bits.view(torch.bfloat16)


def encode_fp8(y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[..., T, E] float -> (uint8 fp8-e4m3 bits [..., T, E], float32 scales [..., T]).

    One scale per token maps its largest magnitude to the top of the e4m3 range, so the
    3-bit mantissa keeps ~6% relative error per element whatever the token's norm.
    """
    y32 = y.detach().float()
    scale = (y32.abs().amax(dim=-1) / FP8_MAX).clamp_min(1e-30)
    q = (y32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).cpu().numpy(), scale.cpu().numpy().astype(np.float32)


def decode_fp8(bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 bits [..., T, E] + scales [..., T] -> features [..., T, E] in `dtype`."""
    return (bits.view(torch.float8_e4m3fn).float() * scale.float()[..., None]).to(dtype)


def fp8_cosine_fidelity(y: torch.Tensor) -> dict:
    """Per-token cosine between bf16-stored and fp8-stored features [..., T, E].

    Returns {"mean", "min", "p001"} over tokens (p001 = 0.1% quantile); tokens that are
    all zero in bf16 are skipped (their cosine is undefined, and both codecs give zero).
    """
    ref = y.detach().to(torch.bfloat16).float()
    bits, scale = encode_fp8(y)
    rec = decode_fp8(torch.from_numpy(bits), torch.from_numpy(scale), torch.float32)
    ref, rec = ref.reshape(-1, ref.shape[-1]), rec.reshape(-1, rec.shape[-1])
    keep = ref.norm(dim=-1) > 0
    cos = torch.nn.functional.cosine_similarity(ref[keep].double(), rec[keep].double(), dim=-1)
    return {"mean": cos.mean().item(), "min": cos.min().item(),
            "p001": torch.quantile(cos, 0.001).item(), "tokens": int(keep.sum())}


# ---------------------------------------------------------------------------------------
# field layout

def field_specs(manifest: Mapping) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Field name -> (numpy dtype, per-record shape), from a manifest."""
    return {k: (np.dtype(v["dtype"]), tuple(v["shape"])) for k, v in manifest["fields"].items()}


def build_fields(kind: str, resolution: int, latent_shape: Sequence[int] | None,
                 encoders: Sequence[Mapping], store_images: bool) -> dict:
    """Manifest "fields" entry: name -> {"dtype", "shape"} (json-ready)."""
    f: dict = {"label": {"dtype": "int64", "shape": []}}
    if kind == "latent":
        f["latent"] = {"dtype": "float32", "shape": [2, *latent_shape]}
        if store_images:
            f["images"] = {"dtype": "uint8", "shape": [3, resolution, resolution]}
    elif kind == "pixels":
        f["pixels"] = {"dtype": "uint8", "shape": [3, resolution, resolution]}
    else:
        raise ValueError(f"kind must be 'latent' or 'pixels', got {kind!r}")
    for k, e in enumerate(encoders):
        T, E = e["tokens"], e["dim"]
        if e["storage"] == "bf16":
            f[f"feat_{k}"] = {"dtype": "int16", "shape": [T, E]}
        elif e["storage"] == "fp8":
            f[f"feat_{k}"] = {"dtype": "uint8", "shape": [T, E]}
            f[f"scale_{k}"] = {"dtype": "float32", "shape": [T]}
        else:
            raise ValueError(f"feature storage must be one of {STORAGES}, got {e['storage']!r}")
    return f


# ---------------------------------------------------------------------------------------
# integrity

def file_digest(path: str | os.PathLike, full: bool = False, blocks: int = 64, block: int = 1 << 16) -> str:
    """Content digest: blake2b of the size and of 64 evenly spaced 64 KiB blocks (head and
    tail included), or of every byte with full=True.

    The sampled digest is cheap enough to verify at every open of a terabyte file and
    catches truncation, a foreign file and most partial overwrites; use full=True (and
    `verify="full"` in the loaders) to rule out corruption inside unsampled bytes.
    """
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if full or size <= blocks * block:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        else:
            for off in np.linspace(0, size - block, blocks).astype(np.int64):
                f.seek(int(off))
                h.update(f.read(block))
    return ("full:" if full else "sampled:") + h.hexdigest()


def record_files(root: Path, names: Sequence[str], full: bool = False) -> dict:
    """Manifest "files" entries: size and sampled digest of each file, and with full=True also the
    digest of every byte ("full_digest"), so either check of verify_files can run."""
    out = {}
    for n in names:
        out[n] = {"bytes": os.path.getsize(root / n), "digest": file_digest(root / n)}
        if full:
            out[n]["full_digest"] = file_digest(root / n, full=True)
    return out


def _expected_digest(rec: Mapping, verify: str) -> tuple[str, bool]:
    """(recorded digest, computed over every byte?) for a verify mode. Manifests written before
    "full_digest" existed hold the full digest under "digest"; it is checked in full whatever the mode."""
    if rec["digest"].startswith("full:"):
        return rec["digest"], True
    if verify == "full" and "full_digest" in rec:
        return rec["full_digest"], True
    return rec["digest"], False


def has_full_digests(manifest: Mapping) -> bool:
    return all(_expected_digest(r, "full")[1] for r in manifest["files"].values())


def verify_files(root: str | os.PathLike, manifest: Mapping, names: Sequence[str], verify: str = "sampled") -> None:
    """Refuse a truncated, extended or foreign data file before any batch is read."""
    if verify == "none":
        return
    root = Path(root)
    for n in names:
        rec = manifest["files"].get(n)
        if rec is None:
            raise InputError(f"{root / MANIFEST}: no size/digest recorded for {n}")
        p = root / n
        if not p.exists():
            raise InputNotFound(f"{p}: listed in the manifest but missing")
        size = os.path.getsize(p)
        if size != rec["bytes"]:
            raise InputError(f"{p}: {size} bytes on disk, the manifest records {rec['bytes']} "
                             f"(truncated or not the file this manifest describes)")
        digest, full = _expected_digest(rec, verify)
        if file_digest(p, full=full) != digest:
            raise InputError(f"{p}: content digest does not match the manifest "
                             f"(corrupt, or a file from another preparation)")


def open_memmap(path: Path) -> np.ndarray:
    """A stored field's .npy file, memory-mapped read-only; a truncated or non-.npy file is an InputError naming it."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise InputNotFound(f"{path}: missing from the prepared dataset") from None
    except (ValueError, OSError, EOFError) as e:  # numpy's header parser and mmap report damage so
        raise InputError(f"{path}: not a readable .npy array ({e}); truncated or not this dataset's file") from None


def _bad_rows(field: str, rows: np.ndarray, num_classes: int) -> np.ndarray:
    """Per record: does this field hold a non-finite value (or, for labels, one outside the classes)?"""
    flat = rows.reshape(len(rows), -1)
    if field == "label":
        return ((flat < 0) | (flat >= num_classes)).any(1) if num_classes else (flat < 0).any(1)
    if flat.dtype == np.int16:  # bf16 bits: exponent all ones is inf or NaN
        return ((flat & 0x7F80) == 0x7F80).any(1)
    if flat.dtype == np.uint8:
        if field.startswith("feat_"):  # fp8 e4m3fn bits: S.1111.111 is NaN (no inf)
            return ((flat & 0x7F) == 0x7F).any(1)
        return np.zeros(len(rows), dtype=bool)  # pixels / images: every byte is a value
    if flat.dtype.kind == "f":
        return ~np.isfinite(flat).all(1)
    return np.zeros(len(rows), dtype=bool)


def bad_records(root: str | os.PathLike, manifest: Mapping, records: Sequence[int] | None = None,
                fields: Sequence[str] | None = None, chunk: int = 4096, limit: int = 5) -> list[str] | None:
    """Records whose stored values are non-finite (or labels outside the classes), read from the
    memmap copy: up to `limit` lines naming the file and record (record = 2 * sample + mirrored).
    records None: every record, in chunks. None when the dataset has no memmap copy to read."""
    if "memmap" not in manifest.get("formats", []):
        return None
    root = Path(root)
    fields = list(fields) if fields is not None else list(manifest["fields"])
    ncls = int(manifest.get("num_classes", 0) or 0)
    out: list[str] = []
    for f in fields:
        path = root / MEMMAP_DIR / f"{f}.npy"
        a = open_memmap(path)
        ids = np.arange(len(a)) if records is None else np.unique(np.asarray(records, dtype=np.int64))
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            rows = a[part] if records is not None else a[part[0]:part[-1] + 1]
            for r in part[_bad_rows(f, np.asarray(rows), ncls)]:
                what = "label outside the classes" if f == "label" else "non-finite value"
                out.append(f"{path} record {int(r)} (sample {int(r) // 2}{', mirrored' if r % 2 else ''}): {what} "
                           f"in {f!r}")
                if len(out) >= limit:
                    return out
    return out


def scan_dataset(root: str | os.PathLike, manifest: Mapping, fields: Sequence[str] | None = None) -> str:
    """Full content check of a prepared dataset (data.verify full): every record's values; raises
    ValueError naming the file and the first bad records. Returns what was checked, for the log."""
    digests = ("every byte against the manifest's full digests" if has_full_digests(manifest) else
               "sizes and sampled digests only (prepare with --full_checksum to record full digests)")
    bad = bad_records(root, manifest, fields=fields)
    if bad is None:
        return f"{digests}; no memmap copy, so the records' values were not scanned (prepare with --formats memmap)"
    if bad:
        raise InputError(f"{Path(root)}: bad data (data.verify full): " + "; ".join(bad))
    return f"{digests}; all {manifest['num_records']} records scanned, every value finite and every label valid"


# ---------------------------------------------------------------------------------------
# manifest

def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def made_by_prepare(folder: str | os.PathLike) -> bool:
    """Does `folder` hold a complete dataset written by irepa.data.prepare (its manifest says so)?"""
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT and m.get("tool") == TOOL


def shrink_npy(path: str | os.PathLike, rows: int) -> None:
    """Cut an .npy file to its first `rows` rows in place: the header is rewritten at its old
    length (numpy pads it so the first dimension can change) and the file truncated."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
        if fortran or rows > shape[0]:
            raise ValueError(f"{path}: cannot shrink a {shape} array to {rows} rows")
        header = io.BytesIO()
        write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
        write(header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                       "shape": (rows, *shape[1:])})
        if header.tell() != offset:
            raise ValueError(f"{path}: the new header takes {header.tell()} bytes, the old {offset}")
        f.seek(0)
        f.write(header.getvalue())
        f.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


class Manifest(dict):
    """A manifest as read from disk; `.path` is the manifest file, so errors can name it."""

    path: Path | None = None


def _where(manifest: Mapping) -> str:
    """The prepared dataset a manifest belongs to, for error messages."""
    path = getattr(manifest, "path", None)
    if path is not None:
        return str(path.parent)
    return f"prepared data from {manifest.get('source', {}).get('root', '?')}"


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Manifest of a prepared dataset folder (or of the manifest file itself), validated."""
    p = Path(path)
    mp = p / MANIFEST if p.is_dir() or not p.suffix == ".json" else p
    if not mp.exists():
        partial = p.with_name(p.name + ".partial")
        hint = f"; an unfinished preparation is in {partial}, rerun prepare to finish it" if partial.exists() else ""
        raise InputNotFound(f"{mp}: no manifest, so not a complete prepared dataset{hint}")
    try:
        m = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{mp}: manifest is not valid json ({e})") from None
    if m.get("format") != FORMAT:
        raise InputError(f"{mp}: format {m.get('format')!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise InputError(f"{mp}: format version {m.get('version')}, this code reads version {VERSION}")
    for key in ("kind", "num_samples", "num_views", "resolution", "fields", "encoders", "files"):
        if key not in m:
            raise InputError(f"{mp}: manifest lacks {key!r}")
    _rename_old_hog(m)
    m = Manifest(m)
    m.path = mp
    return m


def _rename_old_hog(m: dict) -> None:
    """Before the encoder names followed the iREPA release, "hog" was our patch HOG (now
    "hog-patch"; "hog" is the release's dense HOG). Entries written since carry their
    registry family; an entry named "hog" without one holds patch-HOG features."""
    for e in m["encoders"]:
        if e.get("name") == "hog" and "family" not in e:
            e["name"], e["family"] = "hog-patch", "hog-patch"


def check_manifest(manifest: Mapping, latent_shape: Sequence[int] | None = None, num_tokens: int | None = None,
                   encoder_dims: Mapping[str, int] | None = None) -> None:
    """Raise ValueError unless the prepared data fits the model config.

    latent_shape: the model's input (C, H, W): latent shape for kind "latent", (3, R, R)
    for kind "pixels". num_tokens: the model's token count at the alignment depth, which
    every stored encoder used must match. encoder_dims: name -> projector output dim for
    each encoder the config aligns to; each must be stored with that dim.
    """
    src = _where(manifest)
    if latent_shape is not None:
        R = manifest["resolution"]
        have = manifest["latent"]["shape"] if manifest["kind"] == "latent" else [3, R, R]
        if list(latent_shape) != list(have):
            raise InputError(f"{src}: stored {manifest['kind']} shape {tuple(have)} (prepared at {R} px) != model "
                             f"input shape {tuple(latent_shape)} (prepare at the model's resolution / VAE, or "
                             f"change the model's input_size / in_channels)")
    stored = {e["name"]: e for e in manifest["encoders"]}
    for name, dim in (encoder_dims or {}).items():
        if name not in stored:
            raise InputError(f"{src}: encoder {name!r} is not stored (stored: {sorted(stored) or 'none'}); "
                             f"prepare with it or run it online")
        if stored[name]["dim"] != dim:
            raise InputError(f"{src}: encoder {name!r} stored with dim {stored[name]['dim']}, config expects {dim}")
        if num_tokens is not None and stored[name]["tokens"] != num_tokens:
            raise InputError(f"{src}: encoder {name!r} stored with {stored[name]['tokens']} tokens per image, "
                             f"the model has {num_tokens}")
