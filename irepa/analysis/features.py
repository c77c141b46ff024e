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

from irepa.metrics.spatial import nan_mean, spatial_metrics

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

    return ImageSet(n, load, labels[:n], lambda idx, images: ink_masks(images, ink))


def read_rgb(path: Path, resolution: int) -> torch.Tensor:
    """One image, center-cropped to a square and resized: [3, R, R] in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0


def folder_set(root: str | Path, resolution: int = 256, limit: int | None = None,
               masks: str | Path | None = None) -> ImageSet:
    """Images under `root` (recursive, sorted), center-cropped and resized; class sub-folders -> labels."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    labels = None
    if len(classes) > 1 and all(len(p.relative_to(root).parts) > 1 for p in files):
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.relative_to(root).parts[0]] for p in files])

    def load(idx):
        return torch.stack([read_rgb(files[i], resolution) for i in idx])

    load_masks = None
    if masks is not None:
        mroot = Path(masks)

        def load_masks(idx, images):
            out = []
            for i in idx:
                rel = files[i].relative_to(root).with_suffix("")
                found = [p for p in mroot.glob(f"{rel}.*") if p.suffix.lower() in IMAGE_EXTS]
                if not found:
                    raise FileNotFoundError(f"no mask for {files[i]} (expected {mroot / rel}.png)")
                out.append(read_rgb(found[0], resolution).mean(0) > 0.5)
            return torch.stack(out)

    return ImageSet(len(files), load, labels, load_masks)


# ---------------------------------------------------------------------------------------
# metrics of encoder features

@torch.no_grad()
def measure(encoder: EncoderFn, images: ImageSet, batch_size: int = 64, device: str = "cpu",
            min_tokens: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Per-image metrics {name: [N]}, mean-pooled tokens [N, E] and the token count T."""
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
        for k, v in spatial_metrics(feats, masks, min_tokens).items():
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
                     device: str = "cpu", min_tokens: int = 64) -> tuple[list[dict], dict[str, dict]]:
    """One summary row per encoder and the per-image values {encoder: {metric: [N]}}."""
    rows, per_image = [], {}
    for name, enc in encoders.items():
        values, pooled, T = measure(enc, images, batch_size, device, min_tokens)
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
