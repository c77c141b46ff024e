"""The real images a sample batch is scored against (evaluate.py's REF).

REF is an ADM batch (.npz: uint8 images [N, H, W, 3] under arr_0, labels under arr_1 when
it has them, or only precomputed mu/sigma statistics), the built-in "digits", or an image
folder with one sub-folder per class. The last two are read as prepare.py reads them
(irepa.data.sources: the same sorted class list, so label c is the class a model prepared
from that folder learned as c, and ADM's center crop), at the samples' resolution.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from irepa.errors import InputError, InputNotFound

from .npz import iter_npz_array, npz_array_info, npz_keys


def is_batch(ref: str | Path) -> bool:
    """An ADM .npz batch (as opposed to "digits" or an image folder)."""
    return str(ref) != "digits" and not Path(ref).is_dir()


class RealImages:
    """REF as uint8 [B, H, W, 3] batches and (when known) its labels."""

    def __init__(self, ref: str | Path, resolution: int):
        self.ref = str(ref)
        if is_batch(ref):
            if not Path(ref).is_file():
                raise InputNotFound(f"reference batch not found: {ref} (expected an ADM .npz batch, digits or an image "
                                    f"folder with one sub-folder per class)")
            self.source = None
            self.keys = set(npz_keys(ref))
            if "arr_0" in self.keys:
                shape, _ = npz_array_info(ref, "arr_0")
                self.count, self.side = shape[0], min(shape[1:3])
            else:
                self.count, self.side = 0, None
        else:
            from irepa.data.sources import open_source
            self.source = open_source(str(ref), resolution)
            self.keys = {"arr_0", "arr_1"}
            self.count, self.side = len(self.source), resolution

    def batches(self, batch: int) -> Iterator[np.ndarray]:
        if self.source is None:
            yield from iter_npz_array(self.ref, "arr_0", batch)
            return
        for lo in range(0, self.count, batch):
            yield np.stack([self.source.load(i) for i in range(lo, min(lo + batch, self.count))])

    def labels(self) -> np.ndarray | None:
        if self.source is not None:
            return np.asarray(self.source.labels, dtype=np.int64)
        if "arr_1" not in self.keys:
            return None
        with np.load(self.ref) as z:
            return np.asarray(z["arr_1"], dtype=np.int64)

    def require_labelled_images(self, why: str) -> np.ndarray:
        """The labels, or an InputError saying that REF lacks images or labels, which `why` needs."""
        if "arr_0" not in self.keys:
            raise InputError(f"{self.ref}: no images under 'arr_0' (has {sorted(self.keys)}); {why} needs the "
                             f"real images")
        labels = self.labels()
        if labels is None or labels.shape != (self.count,):
            raise InputError(f"{self.ref}: no labels under 'arr_1' for its {self.count} images; {why} trains on "
                             f"labelled real images (an ADM batch with arr_1, digits, or an image folder with one "
                             f"sub-folder per class)")
        return labels
