"""Image sources for preparation: ImageFolder / ImageNet-train layouts and the built-in digits.

A source lists its samples once (sorted, so every rank and every rerun agree), hashes the
listing (the manifest records it; a resumed run refuses a changed listing) and loads
sample i as the square uint8 crop [R, R, 3] the whole pipeline sees.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from irepa.errors import InputError, InputNotFound

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_adm(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: halve with a box filter while the short side is >= 2*size, resize
    the short side to `size` with bicubic, then crop the center. -> uint8 [size, size, 3]."""
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


class ImageFolderSource:
    """root/<class>/<...>/<image>: classes are the sorted sub-folder names (ImageNet's
    train/n01440764/*.JPEG is this layout)."""

    def __init__(self, root: str | os.PathLike, resolution: int):
        self.root, self.resolution = Path(root), resolution
        if not self.root.is_dir():
            raise InputNotFound(f"{self.root}: image folder not found")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise InputError(f"{self.root}: no class sub-folders (expected root/<class>/<image>)")
        self.paths: list[str] = []
        labels = []
        for c, name in enumerate(self.classes):
            found = sorted(str(p.relative_to(self.root)) for p in (self.root / name).rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.paths += found
            labels += [c] * len(found)
        if not self.paths:
            raise InputError(f"{self.root}: no images with extensions {IMAGE_EXTENSIONS}")
        self.labels = np.asarray(labels, dtype=np.int64)
        h = hashlib.sha256()
        for p, y in zip(self.paths, labels):
            h.update(f"{p}\t{y}\n".encode())
        self.listing_hash = h.hexdigest()
        self.description = str(self.root.resolve())

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as img:
                return center_crop_adm(img, self.resolution)
        except Exception as e:  # say which file, not only what PIL disliked
            raise InputError(f"{path}: cannot read image ({e})") from e


class DigitsSource:
    """scikit-learn's digits upsampled to `resolution` (see data/digits.py), as uint8 RGB."""

    def __init__(self, resolution: int):
        from .digits import NUM_CLASSES, load_digits_images

        images, labels = load_digits_images(resolution)
        self.images = (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()
        self.labels = labels.numpy().astype(np.int64)
        self.classes = [str(c) for c in range(NUM_CLASSES)]
        self.resolution = resolution
        self.listing_hash = hashlib.sha256(self.images.tobytes() + self.labels.tobytes()).hexdigest()
        self.description = "digits"

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]


def open_source(source: str, resolution: int):
    """"digits" or a folder path."""
    return DigitsSource(resolution) if source == "digits" else ImageFolderSource(source, resolution)
