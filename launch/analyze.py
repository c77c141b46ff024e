"""Analyse encoders: spatial metrics, their correlation with gFID, spatial-norm pictures.

  python launch/analyze.py metrics --encoders=hog,sift,mocov3-vit-b:tiny --out=runs/analysis  # digits, 256 px
  python launch/analyze.py metrics --encoders=dinov2-vit-b --images=/data/val --limit=2000
  python launch/analyze.py correlate --table=encoders.csv [--gfid=gfid.csv] --out=runs/analysis
  python launch/analyze.py spatialnorm --image=0 --encoders=hog,sift --gamma=0.6 --out=runs/analysis

`metrics` writes metrics.json / metrics.csv (one row per encoder: the NaN-aware mean over
images of LDS (release-code and paper variants), CDS, SRSS, RMSC, and the linear-probe
accuracy when labels exist) and per_image.csv. Without --images it measures the embedded
digits with ink (pixel > --ink) as the foreground mask. SRSS keeps only images with >= 64
foreground and >= 64 background tokens: at 128 px a digit has 8x8 = 64 tokens in all, so
every image is dropped; the default 256 px (16x16 tokens) is the one to use for SRSS.
An --images folder in ImageFolder layout (class sub-folders) gives probe labels; --masks
is a folder of foreground masks with the same relative paths (any image extension).

`correlate` reads a CSV with an `encoder` column, metric columns and a gFID column (or
joins --gfid, a CSV of encoder,gfid) and writes correlation.csv (Pearson and Spearman r
per metric) and correlation.png (metric vs gFID, fit line, r in the title; the paper's
Figure 4). `spatialnorm` writes spatialnorm.png: cosine-similarity maps from anchor
patches before and after irepa.align.spatial_norm, per encoder.

The functions below take encoders as callables (images [B, 3, H, W] in [0, 1] ->
tokens [B, (H/16)^2, E]), so they run on any feature function; the CLI builds them with
irepa.encoders.build(name) (name:tiny -> build(name, tiny=True), a random-init small
model of that architecture, which needs no weights).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from irepa.align import spatial_norm, token_grid
from irepa.metrics.spatial import correlation, cosine_gram, nan_mean, spatial_metrics

EncoderFn = Callable[[torch.Tensor], torch.Tensor]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
METRIC_COLUMNS = ("lds", "lds_paper", "cds", "srss", "rmsc", "probe_acc")


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


def _read_rgb(path: Path, resolution: int) -> torch.Tensor:
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
        return torch.stack([_read_rgb(files[i], resolution) for i in idx])

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
                out.append(_read_rgb(found[0], resolution).mean(0) > 0.5)
            return torch.stack(out)

    return ImageSet(len(files), load, labels, load_masks)


# ---------------------------------------------------------------------------------------
# metrics

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


def write_rows(rows: Sequence[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------
# correlation with gFID

def read_rows(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def correlate_rows(rows: Sequence[dict], target: str = "gfid",
                   metrics: Sequence[str] | None = None) -> list[dict]:
    """Pearson and Spearman r of each metric column against `target`, across rows (encoders)."""
    if not rows or target not in rows[0]:
        raise ValueError(f"the table has no {target!r} column (columns: {list(rows[0]) if rows else []})")
    metrics = [m for m in (metrics or METRIC_COLUMNS) if m in rows[0]]
    if not metrics:
        raise ValueError(f"none of the metric columns {list(METRIC_COLUMNS)} is in the table")
    y = [_as_float(r[target]) for r in rows]
    return [{"metric": m, **correlation([_as_float(r[m]) for r in rows], y)} for m in metrics]


def _as_float(v) -> float:
    return v if isinstance(v, float) else math.nan


def plot_correlation(rows: Sequence[dict], stats: Sequence[dict], path: Path, target: str = "gfid") -> None:
    """One panel per metric: metric vs target, least-squares line, Pearson/Spearman r in the title."""
    plt = _pyplot()
    ncols = min(3, len(stats))
    nrows = math.ceil(len(stats) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(stats):]:
        ax.axis("off")
    y = np.array([_as_float(r[target]) for r in rows])
    for ax, s in zip(axes.flat, stats):
        x = np.array([_as_float(r[s["metric"]]) for r in rows])
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=18)
        for xi, yi, r in zip(x[ok], y[ok], [r for r, o in zip(rows, ok) if o]):
            ax.annotate(str(r.get("encoder", "")), (xi, yi), fontsize=6, alpha=0.7)
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            a, b = np.polyfit(x[ok], y[ok], 1)
            xs = np.linspace(x[ok].min(), x[ok].max(), 2)
            ax.plot(xs, a * xs + b, "r-", lw=1)
        ax.set_title(f"{s['metric']}: r={s['pearson_r']:.2f}, rho={s['spearman_r']:.2f}", fontsize=9)
        ax.set_xlabel(s["metric"])
        ax.set_ylabel(target)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# spatial-norm pictures

def anchor_maps(feats_1TE: torch.Tensor, anchors: Sequence[tuple[int, int]],
                gamma: float | None) -> torch.Tensor:
    """Cosine similarity of each anchor token to every token -> [A, side, side];
    gamma None uses the features as they are, a float applies spatial_norm first."""
    side = token_grid(feats_1TE.shape[1], "anchor_maps")
    f = spatial_norm(feats_1TE, gamma) if gamma is not None else feats_1TE.float()
    K = cosine_gram(f)[0]
    for r, c in anchors:
        if not (0 <= r < side and 0 <= c < side):
            raise ValueError(f"anchor ({r}, {c}) is outside the {side}x{side} token grid")
    return torch.stack([K[r * side + c].view(side, side) for r, c in anchors])


def plot_spatialnorm(image: torch.Tensor, maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     anchors: Sequence[tuple[int, int]], gamma: float, path: Path) -> None:
    """Grid: per encoder a row before and a row after spatial norm; the image with anchors first."""
    plt = _pyplot()
    A = len(anchors)
    nrows = 2 * len(maps)
    fig, axes = plt.subplots(nrows, A + 1, figsize=(2.2 * (A + 1), 2.2 * nrows), squeeze=False)
    px = image.shape[-1]
    for i, (name, (before, after)) in enumerate(maps.items()):
        side = before.shape[-1]
        for j, (label, m) in enumerate((("before", before), (f"spatial norm g={gamma}", after))):
            row = axes[2 * i + j]
            row[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            scale = px / side
            for k, (r, c) in enumerate(anchors):
                row[0].plot((c + 0.5) * scale, (r + 0.5) * scale, "o", ms=5, mfc=f"C{k}", mec="w")
            row[0].set_title(f"{name}: {label}", fontsize=8)
            for k, (r, c) in enumerate(anchors):
                ax = row[k + 1]
                ax.imshow(m[k].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
                ax.plot(c, r, "o", ms=4, mfc=f"C{k}", mec="k")
                ax.set_title(f"anchor ({r},{c}) mean {m[k].mean():.2f}", fontsize=7)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------
# CLI

def _names(v) -> list[str]:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return [str(s) for s in v]


def _build_encoders(names, device: str) -> dict[str, EncoderFn]:
    """"hog,sift,mocov3-vit-b:tiny": a ":tiny" suffix builds the random-init small variant."""
    from irepa.encoders import build

    out = {}
    for n in _names(names):
        base, _, opt = n.partition(":")
        if opt not in ("", "tiny"):
            raise ValueError(f"encoder {n!r}: the only option after ':' is 'tiny'")
        out[n] = build(base, tiny=opt == "tiny", device=device)
    return out


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _image_set(images, resolution, limit, masks, ink) -> ImageSet:
    if images is None:
        return digits_set(resolution, limit, ink)
    return folder_set(images, resolution, limit, masks)


def metrics(encoders="hog,sift", images: str | None = None, out: str = "runs/analysis",
            resolution: int = 256, limit: int | None = None, masks: str | None = None,
            ink: float = 0.5, batch_size: int = 64, device: str | None = None, min_tokens: int = 64):
    """Spatial metrics (+ linear probe when labels exist) of each encoder -> metrics.json/csv, per_image.csv."""
    dev = _device(device)
    data = _image_set(images, resolution, limit, masks, ink)
    rows, per_image = measure_encoders(_build_encoders(encoders, dev), data, batch_size, dev, min_tokens)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    source = images or f"digits (scikit-learn), ink > {ink} as foreground"
    with open(outdir / "metrics.json", "w") as f:
        json.dump({"images": str(source), "resolution": resolution, "count": data.count,
                   "srss_min_tokens": min_tokens, "encoders": rows}, f, indent=2, allow_nan=True)
    write_rows(rows, outdir / "metrics.csv")
    write_rows([{"encoder": e, "image": i, **{k: float(v[i]) for k, v in vals.items()}}
                for e, vals in per_image.items() for i in range(data.count)], outdir / "per_image.csv")
    for r in rows:
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return str(outdir / "metrics.json")


def correlate(table: str, gfid: str | None = None, target: str = "gfid", metrics=None,
              out: str = "runs/analysis"):
    """Correlation of metrics with gFID across encoders -> correlation.csv and correlation.png."""
    rows = read_rows(table)
    if gfid is not None:
        by_name = {r["encoder"]: r for r in read_rows(gfid)}
        missing = [r["encoder"] for r in rows if r["encoder"] not in by_name]
        if missing:
            raise ValueError(f"{gfid} has no {target} for encoders {missing}")
        rows = [{**r, target: by_name[r["encoder"]][target]} for r in rows]
    stats = correlate_rows(rows, target, _names(metrics) if metrics else None)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    write_rows(stats, outdir / "correlation.csv")
    plot_correlation(rows, stats, outdir / "correlation.png", target)
    for s in stats:
        print(f"{s['metric']:>10}: pearson {s['pearson_r']:+.3f}  spearman {s['spearman_r']:+.3f}  (n={s['n']})")
    return str(outdir / "correlation.png")


def _anchors(v, side: int) -> list[tuple[int, int]]:
    if v is None:  # center and an off-center patch
        return [(side // 2, side // 2), (side // 4, side // 4), (side // 4, 3 * side // 4)]
    if isinstance(v, str):
        v = [tuple(int(s) for s in a.split(",")) for a in v.split(";")]
    return [(int(r), int(c)) for r, c in v]


def spatialnorm(image="0", encoders="hog,sift", gamma: float = 0.6, anchors=None,
                resolution: int = 256, out: str = "runs/analysis", device: str | None = None):
    """Cosine-similarity maps from anchor patches before/after spatial norm -> spatialnorm.png.

    image: an image path or an index into the embedded digits; anchors: "r,c;r,c" token
    coordinates (default: the center and two off-center patches).
    """
    dev = _device(device)
    if Path(str(image)).is_file():
        x = _read_rgb(Path(str(image)), resolution)[None]
    else:
        x = digits_set(resolution).load([int(image)])
    side = resolution // 16
    pts = _anchors(anchors, side)
    maps = {}
    for name, enc in _build_encoders(encoders, dev).items():
        f = enc(x.to(dev)).float().cpu()
        maps[name] = (anchor_maps(f, pts, None), anchor_maps(f, pts, gamma))
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    plot_spatialnorm(x[0], maps, pts, gamma, outdir / "spatialnorm.png")
    return str(outdir / "spatialnorm.png")


if __name__ == "__main__":
    import fire

    fire.Fire({"metrics": metrics, "correlate": correlate, "spatialnorm": spatialnorm})
