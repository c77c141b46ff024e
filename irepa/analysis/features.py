"""Image sets, foreground masks, per-image spatial metrics of encoder features, linear probe.

Encoders are callables (images [B, 3, H, W] in [0, 1] -> tokens [B, (H/16)^2, E]), so
everything here runs on any feature function, trained, random-init or hand-made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from irepa.analysis.spatial import grid_mask, mask_filter, nan_mean, spatial_metrics
from irepa.errors import InputError, InputNotFound

EncoderFn = Callable[[torch.Tensor], torch.Tensor]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------
# images

@dataclass
class ImageSet:
    """Images loaded batch by batch (a few thousand 256 px images would not fit at once)."""

    count: int
    load: Callable[[Sequence[int]], torch.Tensor]  # indices -> [b, 3, R, R] in [0, 1]
    labels: torch.Tensor | None = None  # [count] int64
    load_masks: Callable[[Sequence[int], torch.Tensor], torch.Tensor] | None = None  # -> [b, R, R] bool
    names: Sequence[str] | None = None  # [count] what each image is (file path relative to the folder)
    mask_source: str | None = None  # where the foreground masks come from (None: no masks, no SRSS)


def ink_masks(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Foreground of a digits image: its ink, gray value > threshold. [B, 3, R, R] -> [B, R, R] bool."""
    return images.mean(1) > threshold


def digits_set(resolution: int = 256, limit: int | None = None, ink: float = 0.5) -> ImageSet:
    """The embedded digits (scikit-learn), upsampled per batch as data.digits does it."""
    from irepa.data.digits import load_digits_images

    base, labels = load_digits_images(8)  # native 8x8: upsample lazily below
    n = len(base) if limit is None else min(limit, len(base))

    def load(idx):
        x = base[list(idx), :1]
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp(0, 1)
        return x.expand(-1, 3, -1, -1)

    return ImageSet(n, load, labels[:n], lambda idx, images: ink_masks(images, ink),
                    mask_source=f"digits ink (gray value > {ink})")


def _open_rgb(path: Path):
    """PIL image in RGB; a file PIL cannot read is an error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # forces the full decode inside the try
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt / truncated / unknown files
        raise InputError(f"{path}: cannot read image ({e})") from e
    return im


def _center_square(im, resolution: int):
    from PIL import Image

    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)


def read_rgb(path: Path, resolution: int) -> torch.Tensor:
    """One image, center-cropped to a square and resized: [3, R, R] in [0, 1]."""
    im = _center_square(_open_rgb(path), resolution)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0


def read_mask(path: Path, resolution: int) -> torch.Tensor:
    """A foreground mask, center-cropped and resized like its image: [R, R] bool.

    Foreground: a palette (index) image's non-zero indices; otherwise values above half
    the range, where the range is 0..1 for a mask whose values are all 0 or 1 (masks saved
    as 0/1 bytes) and the full range of its type else (0/255 bytes, 16-bit, RGB gray)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                a = np.asarray(im) != 0
            else:
                if im.mode not in ("1", "L", "I", "I;16", "F"):
                    im = im.convert("L")
                a = np.asarray(im).astype(np.float64)
                top = 1.0 if a.max() <= 1 else 65535.0 if a.max() > 255 else 255.0
                a = a > top / 2
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: cannot read mask ({e})") from e
    m = _center_square(Image.fromarray(a.astype(np.uint8) * 255), resolution)
    return torch.from_numpy(np.asarray(m).copy()) > 127


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: cannot read image ({e})") from e


def _spread(n: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(n) (all of them when limit is None or >= n).

    The files are sorted by class folder, so the first `limit` would cover only the first
    classes (and leave the linear probe a handful of them)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit).round()})


def folder_set(root: str | Path, resolution: int = 256, limit: int | None = None,
               masks: str | Path | None = None) -> ImageSet:
    """Images under `root` (recursive, sorted), center-cropped and resized; class sub-folders -> labels.

    limit: use that many images spread evenly over the sorted list (so over the classes).
    masks: a folder of foreground masks with the same relative paths as the images (any
    image extension; gray value > 0.5 is foreground), cropped like their images. Every
    mask is looked up here, before any encoder runs: a missing folder or missing masks are
    an error naming them.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputNotFound(f"image folder {root} does not exist")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 (or None for all images), got {limit}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise InputNotFound(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    files = [files[i] for i in _spread(len(files), limit)]
    rel = [p.relative_to(root) for p in files]
    classes = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
    labels = None
    if len(classes) > 1 and all(len(r.parts) > 1 for r in rel):
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[r.parts[0]] for r in rel])

    def load(idx):
        return torch.stack([read_rgb(files[i], resolution) for i in idx])

    load_masks = None
    if masks is not None:
        mask_files = _find_masks(root, rel, Path(masks))

        def load_masks(idx, images):
            out = []
            for i in idx:
                im, m = _image_size(files[i]), _image_size(mask_files[i])
                # the mask is cropped like its image; only a different aspect ratio would misalign them
                if abs(im[0] * m[1] - im[1] * m[0]) > max(im[0] * m[1], im[1] * m[0]) * 0.01:
                    raise InputError(f"mask {mask_files[i]} is {m[0]}x{m[1]} but its image {files[i]} is "
                                     f"{im[0]}x{im[1]}: a mask must have its image's aspect ratio")
                out.append(read_mask(mask_files[i], resolution))
            return torch.stack(out)

    return ImageSet(len(files), load, labels, load_masks, names=[str(r) for r in rel],
                    mask_source=None if masks is None else str(masks))


def _find_masks(root: Path, rel: Sequence[Path], mroot: Path) -> list[Path]:
    """The mask file of each image (same relative path, any image extension), or an error listing what is missing."""
    if not mroot.is_dir():
        raise InputNotFound(f"mask folder {mroot} does not exist")
    index: dict[Path, Path] = {}
    for p in sorted(mroot.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            index.setdefault(p.relative_to(mroot).with_suffix(""), p)
    found = [index.get(r.with_suffix("")) for r in rel]
    missing = [str(root / r) for r, f in zip(rel, found) if f is None]
    if missing:
        raise InputNotFound(
            f"{len(missing)} of {len(rel)} images have no mask in {mroot} (same relative path, any image "
            f"extension), e.g. {missing[0]} needs {mroot / rel[found.index(None)].with_suffix('.png')}; "
            f"missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return found


# ---------------------------------------------------------------------------------------
# metrics of encoder features

def subset(images: ImageSet, keep: Sequence[int]) -> ImageSet:
    """The images at indices `keep` (in that order), as an ImageSet; names keep the originals'
    (their index when the set had no names)."""
    keep = [int(i) for i in keep]
    names = [images.names[i] for i in keep] if images.names is not None else [str(i) for i in keep]
    load_masks = None
    if images.load_masks is not None:
        def load_masks(idx, x):
            return images.load_masks([keep[i] for i in idx], x)
    return ImageSet(len(keep), lambda idx: images.load([keep[i] for i in idx]),
                    images.labels[keep] if images.labels is not None else None, load_masks, names,
                    images.mask_source)


@torch.no_grad()
def filter_by_mask(images: ImageSet, side: int, min_tokens: int, batch_size: int = 64) -> tuple[ImageSet, int]:
    """Dataset-level mask filter: keep the images whose mask, max-pooled to the side x side token
    grid, has >= min_tokens foreground and >= min_tokens background tokens (the release's
    comparison script: 64 on 16x16). Returns (the kept images, how many were dropped)."""
    if images.load_masks is None:
        raise ValueError("the mask filter needs a foreground mask per image")
    keep = []
    for start in range(0, images.count, batch_size):
        idx = list(range(start, min(start + batch_size, images.count)))
        fg = grid_mask(images.load_masks(idx, images.load(idx)), side)
        keep += [i for i, ok in zip(idx, mask_filter(fg, min_tokens).tolist()) if ok]
    if not keep:
        raise InputError(f"no image passes the mask filter: none of {images.count} masks has >= {min_tokens} "
                         f"foreground and >= {min_tokens} background tokens on the {side}x{side} token grid "
                         f"({side * side} tokens)")
    return subset(images, keep), images.count - len(keep)


@torch.no_grad()
def measure(encoder: EncoderFn, images: ImageSet, batch_size: int = 64,
            device: str = "cpu") -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Per-image metrics {name: [N]}, mean-pooled tokens [N, E] and the token count T."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.count < 1:
        raise ValueError("the image set is empty")
    per_image: dict[str, list[torch.Tensor]] = {}
    pooled, tokens = [], 0
    for start in range(0, images.count, batch_size):
        idx = range(start, min(start + batch_size, images.count))
        x = images.load(idx)
        feats = encoder(x.to(device)).float()
        if feats.dim() != 3 or feats.shape[0] != len(idx):
            raise ValueError(f"encoder returned {tuple(feats.shape)} for {len(idx)} images; expected [B, T, E]")
        tokens = feats.shape[1]
        masks = images.load_masks(idx, x) if images.load_masks is not None else None
        for k, v in spatial_metrics(feats, masks).items():
            per_image.setdefault(k, []).append(v.cpu())
        pooled.append(feats.mean(1).cpu())
    return ({k: torch.cat(v).numpy() for k, v in per_image.items()},
            torch.cat(pooled).numpy(), tokens)


def linear_probe(pooled: np.ndarray, labels: np.ndarray, test_fraction: float = 0.25,
                 seed: int = 0) -> float:
    """Test accuracy of logistic regression on mean-pooled tokens (standardized features).

    The split is stratified when every class has two images or more; NaN when the
    training part holds a single class (nothing to fit).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, counts = np.unique(labels, return_counts=True)
    n_test = math.ceil(test_fraction * len(labels))
    stratify = labels if counts.min() >= 2 and n_test >= len(counts) else None
    xtr, xte, ytr, yte = train_test_split(pooled, labels, test_size=test_fraction,
                                          random_state=seed, stratify=stratify)
    if len(np.unique(ytr)) < 2:
        return math.nan
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(clf.fit(xtr, ytr).score(xte, yte))


def measure_encoders(encoders: Mapping[str, EncoderFn], images: ImageSet, batch_size: int = 64,
                     device: str = "cpu") -> tuple[list[dict], dict[str, dict]]:
    """One summary row per encoder and the per-image values {encoder: {metric: [N]}}."""
    if not encoders:
        raise ValueError("no encoders to measure")
    rows, per_image = [], {}
    for name, enc in encoders.items():
        values, pooled, T = measure(enc, images, batch_size, device)
        row = {"encoder": name, "dim": int(pooled.shape[1]), "tokens": T, "images": images.count}
        for k, v in values.items():
            row[k], n = nan_mean(v)
            if k == "srss":
                row["srss_images"] = n
        if images.labels is not None:
            row["probe_acc"] = linear_probe(pooled, images.labels.numpy())
        rows.append(row)
        per_image[name] = values
    return rows, per_image
