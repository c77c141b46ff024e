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

The library is irepa.analysis; its functions take encoders as callables (images
[B, 3, H, W] in [0, 1] -> tokens [B, (H/16)^2, E]), so they run on any feature function.
This CLI builds them with irepa.encoders.build(name) (name:tiny -> build(name, tiny=True),
a random-init small model of that architecture, which needs no weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from irepa.analysis import (
    EncoderFn, ImageSet, correlate_rows, default_anchors, digits_set,
    encoder_anchor_maps, folder_set, join_column, measure_encoders, plot_correlation,
    plot_spatialnorm, read_rgb, read_rows, write_rows,
)


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
        rows = join_column(rows, read_rows(gfid), target, source=gfid)
    stats = correlate_rows(rows, target, _names(metrics) if metrics else None)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    write_rows(stats, outdir / "correlation.csv")
    plot_correlation(rows, stats, outdir / "correlation.png", target)
    for s in stats:
        print(f"{s['metric']:>10}: pearson {s['pearson_r']:+.3f}  spearman {s['spearman_r']:+.3f}  (n={s['n']})")
    return str(outdir / "correlation.png")


def _anchors(v, side: int) -> list[tuple[int, int]]:
    if v is None:
        return default_anchors(side)
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
        x = read_rgb(Path(str(image)), resolution)[None]
    else:
        x = digits_set(resolution).load([int(image)])
    side = resolution // 16
    pts = _anchors(anchors, side)
    maps = encoder_anchor_maps(_build_encoders(encoders, dev), x, pts, gamma, dev)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    plot_spatialnorm(x[0], maps, pts, gamma, outdir / "spatialnorm.png")
    return str(outdir / "spatialnorm.png")


if __name__ == "__main__":
    import fire

    fire.Fire({"metrics": metrics, "correlate": correlate, "spatialnorm": spatialnorm})
