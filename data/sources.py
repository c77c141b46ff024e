"""Image sources for preparation: ImageFolder / ImageNet-train layouts and the built-in digits.

A source lists its samples once (sorted, so every rank and every rerun agree), hashes the
listing (the manifest records it; a resumed run refuses a changed listing) and loads
sample i as the square uint8 crop [R, R, 3] the whole pipeline sees. Which listed files are
usable is decided by data/scan.py before any is encoded.

A class folder without a single image file is refused: leaving it out would shift the class
indices of every later folder, keeping it would make a class with no images.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from irepa.errors import InputError, InputNotFound

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# modes Image.convert("RGB") maps faithfully (8 bits per channel; alpha is dropped, CMYK and
# palettes converted); 16-bit gray is scaled to 8 bits first (convert would clip it at 255)
EIGHT_BIT_MODES = ("RGB", "1", "L", "LA", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any 8-bit mode, or 16-bit gray, as 8-bit RGB (data/scan.py skips the other modes)."""
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.uint32)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    return img.convert("RGB")


def center_crop_adm(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop: halve with a box filter while the short side is >= 2*size, resize
    the short side to `size` with bicubic, then crop the center. -> uint8 [size, size, 3]."""
    img = to_rgb(img)
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
            # broken symbolic links stay listed: the scan reports them instead of hiding them
            found = sorted(str(p.relative_to(self.root)) for p in (self.root / name).rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
            if not found:
                raise InputError(f"{self.root / name}: class folder without image files "
                                 f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images (every class "
                                 f"folder becomes a class)")
            self.paths += found
            labels += [c] * len(found)
        self.labels = np.asarray(labels, dtype=np.int64)
        h = hashlib.sha256()
        for p, y in zip(self.paths, labels):
            h.update(f"{p}\t{y}\n".encode())
        self.listing_hash = h.hexdigest()
        self.description = str(self.root.resolve())

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def load(self, i: int) -> np.ndarray:
        path = self.path(i)
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
        self.resolution, self.root = resolution, None  # no folder: nothing to check or keep apart from
        self.listing_hash = hashlib.sha256(self.images.tobytes() + self.labels.tobytes()).hexdigest()
        self.description = "digits"

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]


def open_source(source: str, resolution: int):
    """"digits" or a folder path."""
    return DigitsSource(resolution) if source == "digits" else ImageFolderSource(source, resolution)
