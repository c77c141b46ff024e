"""Sample batches in the ADM format: a .npz with uint8 images [N, H, W, 3] under 'arr_0'.

Generated batches also carry the labels under 'arr_1' (as ADM's image_sample.py writes
them). 50K images at 256 px are ~10 GB, so both directions stream: `NpzArrayWriter`
appends rows to an .npy member of an uncompressed zip, `iter_npz_array` reads one batch
of rows at a time. Plain `np.load` reads the result too.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from irepa.errors import InputError, InputKeyError, InputNotFound


class NpzArrayWriter:
    """Write arrays to an .npz row block by row block; the file appears only on close (atomic)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        self.zf = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def write_array(self, name: str, shape: tuple[int, ...], dtype, blocks) -> None:
        """Write `name` ([shape], dtype) from an iterable of row blocks; rows must add up to shape[0]."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        rows = 0
        with self.zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                if block.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{self.path}:{name}: block rows of shape {block.shape[1:]}, expected {shape[1:]}")
                rows += block.shape[0]
                f.write(block.tobytes())
        if rows != shape[0]:
            raise ValueError(f"{self.path}:{name}: wrote {rows} rows, header says {shape[0]}")

    def close(self) -> Path:
        self.zf.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.zf.close()
        self.tmp.unlink(missing_ok=True)


def _open_zip(path: str | Path) -> zipfile.ZipFile:
    """The .npz as a zip file, or an error naming the file (not only what zipfile disliked)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"sample batch not found: {path}")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise InputError(f"{path}: not a readable .npz ({e}; truncated, or still being written?)") from None


def npz_keys(path: str | Path) -> list[str]:
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def npz_array_info(path: str | Path, name: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    with _open_zip(path) as zf:
        if f"{name}.npy" not in zf.namelist():
            raise InputKeyError(f"{path}: no array {name!r} (has {[n[:-4] for n in zf.namelist()]})")
        with zf.open(f"{name}.npy") as f:
            shape, _, dtype = _read_header(f, path, name)
    return shape, dtype


def _read_header(f, path, name):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{path}:{name}: unsupported .npy version {version}")
    if fortran:
        raise ValueError(f"{path}:{name}: Fortran-ordered arrays are not supported")
    return shape, fortran, dtype


def iter_npz_array(path: str | Path, name: str = "arr_0", batch: int = 1000) -> Iterator[np.ndarray]:
    """Yield `name` from an .npz in blocks of `batch` rows without loading it whole."""
    path = Path(path)
    with _open_zip(path) as zf:
        if f"{name}.npy" not in zf.namelist():
            raise InputKeyError(f"{path}: no array {name!r} (has {npz_keys(path)})")
        with zf.open(f"{name}.npy") as f:
            shape, _, dtype = _read_header(f, path, name)
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch):
                n = min(batch, shape[0] - start)
                try:
                    buf = f.read(n * row)
                except zipfile.BadZipFile as e:  # e.g. a CRC mismatch: the bytes on disk changed
                    raise InputError(f"{path}:{name}: corrupt at row {start} ({e})") from None
                if len(buf) != n * row:
                    raise InputError(f"{path}:{name}: truncated at row {start}")
                yield np.frombuffer(buf, dtype=dtype).reshape((n, *shape[1:]))
