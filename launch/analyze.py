"""Analyse encoders: spatial metrics, their correlation with gFID, spatial-norm pictures.

  python launch/analyze.py metrics --encoders=hog,sift,mocov3-vit-b:tiny --out=runs/analysis  # digits, 256 px
  python launch/analyze.py metrics --encoders=dinov2-vit-b --images=/data/val --limit=2000
  python launch/analyze.py correlate --table=encoders.csv [--gfid=gfid.csv] --out=runs/analysis
  python launch/analyze.py spatialnorm --image=0 --encoders=hog,sift --gamma=0.6 --out=runs/analysis
  torchrun --nproc_per_node=2 launch/analyze.py study --out=runs/study/digits   # the whole study, resumable

`metrics` writes metrics.json / metrics.csv (one row per encoder: the NaN-aware mean over
images of LDS (release-code and paper variants), CDS, SRSS, RMSC, the global share (the
tokens' energy in their per-image mean), and the linear-probe
accuracy when labels exist) and per_image.csv. Without --images it measures the embedded
digits with ink (pixel > --ink) as the foreground mask. Masks become token masks by max
pooling (a token is foreground if any of its pixels is) and SRSS is NaN only for an image
with < 2 foreground or < 1 background token, as the release's metric. --mask_min_tokens N
drops, before any metric, the images whose token mask has < N foreground or < N background
tokens: the release's comparison script (the paper's Figure 4) uses 64 at 256 px; the
default 0 keeps every image. Dropped images are left out of every metric and of
per_image.csv; metrics.json counts them.
An --images folder in ImageFolder layout (class sub-folders) gives probe labels; --masks
is a folder of foreground masks with the same relative paths (any image extension; 0/255
or 0/1 gray, or palette indices with 0 = background), checked before anything runs.
Without masks a folder gets no SRSS (metrics.json says why). --limit N takes N images
spread over the sorted files (so over the classes). per_image.csv names each image's file.
A misspelt command or option is refused before anything is computed or written.

`correlate` reads a CSV with an `encoder` column, metric columns and a gFID column (or
joins --gfid, a CSV of encoder,gfid) and writes correlation.csv (Pearson and Spearman r
per metric) and correlation.png (metric vs gFID, fit line, r in the title; the paper's
Figure 4). `spatialnorm` writes spatialnorm.png: cosine-similarity maps from anchor
patches before and after irepa.align.spatial_norm, per encoder. `study` answers the paper's
question on the digits in one command: for each target it measures the spatial metrics and the
probe, trains the same SiT with REPA and with iREPA aligned to it (several seeds), scores
generation at fixed steps and writes the correlation table (Pearson and Spearman with bootstrap
intervals and permutation p-values) and the scatter plots (irepa.study).

The library is irepa.analysis; its functions take encoders as callables (images
[B, 3, H, W] in [0, 1] -> tokens [B, (H/16)^2, E]), so they run on any feature function.
This CLI builds them with irepa.encoders.build(name) (name:tiny -> build(name, tiny=True),
a random-init small model of that architecture, which needs no weights).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from irepa.cli import UsageError  # a command line that names something wrong
from irepa.dist import pick_device
from irepa.errors import InputError, InputNotFound
from irepa.analysis import (
    EncoderFn, ImageSet, correlate_rows, default_anchors, digits_set,
    encoder_anchor_maps, filter_by_mask, folder_set, join_column, measure_encoders, plot_correlation,
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
            raise InputError(f"encoder {n!r}: the only option after ':' is 'tiny'")
        out[n] = build(base, tiny=opt == "tiny", device=device)
    return out


def _device(device: str | None) -> str:
    return str(pick_device(device or "auto"))




def _check_sizes(resolution: int, limit: int | None = None, batch_size: int = 1) -> None:
    if resolution <= 0 or resolution % 16:
        raise UsageError(f"--resolution must be a positive multiple of 16 (the encoders' 16 px patches), "
                         f"got {resolution}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {batch_size}")


def _image_set(images, resolution, limit, masks, ink) -> ImageSet:
    if images is None:
        if masks is not None:
            raise UsageError(f"--masks {masks} needs --images: the embedded digits use their ink "
                             f"(--ink) as the foreground")
        return digits_set(resolution, limit, ink)
    return folder_set(images, resolution, limit, masks)


def _srss_note(data: ImageSet, rows: list[dict], resolution: int) -> str | None:
    """Why SRSS is missing or empty, or None when it was measured."""
    if data.load_masks is None:
        return ("SRSS not computed: it needs a foreground mask per image; pass --masks DIR "
                "(masks with the same relative paths as the images)")
    if rows and all(r.get("srss_images", 0) == 0 for r in rows):
        side = resolution // 16
        if 2 * (side - 1) < 6:
            why = f"the {side}x{side} token grid at {resolution} px has no token pairs at distance >= 6"
        else:
            why = ("no mask has >= 2 foreground and >= 1 background tokens with a foreground token whose "
                   "4-neighbours include foreground and whose distance-6 ring includes background")
        return f"SRSS is NaN for every image: {why}"
    return None


def metrics(encoders="hog,sift", images: str | None = None, out: str = "runs/analysis",
            resolution: int = 256, limit: int | None = None, masks: str | None = None,
            ink: float = 0.5, batch_size: int = 64, device: str | None = None, mask_min_tokens: int = 0):
    """Spatial metrics (+ linear probe when labels exist) of each encoder -> metrics.json/csv, per_image.csv.

    SRSS needs foreground masks: the digits' ink (--ink), or --masks DIR for --images.
    --mask_min_tokens N: measure only images whose token mask has >= N foreground and >= N
    background tokens (the release's comparison script: 64); 0 keeps every image."""
    _check_sizes(resolution, limit, batch_size)
    if not _names(encoders):
        raise UsageError("--encoders is empty; name at least one (e.g. hog,sift)")
    if isinstance(mask_min_tokens, bool) or not isinstance(mask_min_tokens, int) or mask_min_tokens < 0:
        raise UsageError(f"--mask_min_tokens must be an integer >= 0, got {mask_min_tokens!r}")
    dev = _device(device)
    data = _image_set(images, resolution, limit, masks, ink)
    dropped = 0
    if mask_min_tokens > 0:
        if data.load_masks is None:
            raise UsageError(f"--mask_min_tokens {mask_min_tokens} filters by foreground mask; pass --masks DIR")
        try:
            data, dropped = filter_by_mask(data, resolution // 16, mask_min_tokens, batch_size)
        except ValueError as e:
            raise UsageError(f"--mask_min_tokens {mask_min_tokens}: {e}") from None
    rows, per_image = measure_encoders(_build_encoders(encoders, dev), data, batch_size, dev)
    note = _srss_note(data, rows, resolution)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    source = images or f"digits (scikit-learn), ink > {ink} as foreground"
    with open(outdir / "metrics.json", "w") as f:
        json.dump({"images": str(source), "resolution": resolution, "count": data.count,
                   "masks": data.mask_source, "mask_pooling": "max", "mask_min_tokens": mask_min_tokens,
                   "images_dropped_by_mask_filter": dropped, "srss_note": note,
                   "encoders": rows}, f, indent=2, allow_nan=True)
    write_rows(rows, outdir / "metrics.csv")
    names = data.names or [str(i) for i in range(data.count)]
    write_rows([{"encoder": e, "image": i, "file": names[i], **{k: float(v[i]) for k, v in vals.items()}}
                for e, vals in per_image.items() for i in range(data.count)], outdir / "per_image.csv")
    for r in rows:
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if dropped:
        print(f"note: --mask_min_tokens {mask_min_tokens} dropped {dropped} of {data.count + dropped} images",
              file=sys.stderr)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return str(outdir / "metrics.json")


def correlate(table: str, gfid: str | None = None, target: str = "gfid", metrics=None,
              out: str = "runs/analysis"):
    """Correlation of metrics with gFID across encoders -> correlation.csv and correlation.png."""
    rows = read_rows(table)
    if gfid is not None:
        rows = join_column(rows, read_rows(gfid), target, source=str(gfid))
    stats = correlate_rows(rows, target, _names(metrics) if metrics else None,
                           source=str(table) if gfid is None else f"{table} joined with {gfid}")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    write_rows(stats, outdir / "correlation.csv")
    plot_correlation(rows, stats, outdir / "correlation.png", target)
    for s in stats:
        print(f"{s['metric']:>10}: pearson {s['pearson_r']:+.3f}  spearman {s['spearman_r']:+.3f}  (n={s['n']})")
    if any(s["n"] < 3 for s in stats):
        print("note: r is NaN where fewer than 3 encoders have both the metric and the target", file=sys.stderr)
    return str(outdir / "correlation.png")


def _anchors(v, side: int) -> list[tuple[int, int]]:
    """None -> the defaults; "r,c;r,c" or a list of (r, c); one (r, c) pair is one anchor."""
    if v is None:
        return default_anchors(side)
    text = v if isinstance(v, str) else repr(v)
    try:
        if isinstance(v, str):
            v = [tuple(int(s) for s in a.split(",")) for a in v.split(";") if a.strip()]
        elif isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) for x in v):
            v = [v]  # --anchors 4,5 reaches here as the tuple (4, 5)
        pts = [(int(r), int(c)) for r, c in v]
    except (TypeError, ValueError):
        raise UsageError(f"--anchors {text!r}: expected token coordinates 'row,col;row,col'") from None
    if not pts:
        raise UsageError(f"--anchors {text!r} names no anchor")
    for r, c in pts:
        if not (0 <= r < side and 0 <= c < side):
            raise UsageError(f"--anchors: ({r}, {c}) is outside the {side}x{side} token grid")
    return pts


def _spatialnorm_image(image, resolution: int) -> torch.Tensor:
    """An image file, or an index into the embedded digits -> [1, 3, R, R]."""
    path = Path(str(image))
    if path.is_file():
        return read_rgb(path, resolution)[None]
    try:
        index = int(str(image))
    except ValueError:
        raise UsageError(f"--image {image}: no such file (and not an index into the embedded digits)") from None
    digits = digits_set(resolution)
    if not 0 <= index < digits.count:
        raise UsageError(f"--image {index}: the embedded digits have images 0..{digits.count - 1}")
    return digits.load([index])


def spatialnorm(image="0", encoders="hog,sift", gamma: float = 0.6, anchors=None,
                resolution: int = 256, out: str = "runs/analysis", device: str | None = None):
    """Cosine-similarity maps from anchor patches before/after spatial norm -> spatialnorm.png.

    image: an image path or an index into the embedded digits; anchors: "r,c;r,c" token
    coordinates (default: the center and two off-center patches).
    """
    _check_sizes(resolution)
    if not _names(encoders):
        raise UsageError("--encoders is empty; name at least one (e.g. hog,sift)")
    dev = _device(device)
    side = resolution // 16
    pts = _anchors(anchors, side)
    x = _spatialnorm_image(image, resolution)
    maps = encoder_anchor_maps(_build_encoders(encoders, dev), x, pts, gamma, dev)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    plot_spatialnorm(x[0], maps, pts, gamma, outdir / "spatialnorm.png")
    return str(outdir / "spatialnorm.png")


def study(spec: str | None = None, out: str = "runs/study/digits", targets=None, seeds: list[int] | None = None,
          eval_steps: list[int] | None = None, cache_dir: str | None = None, device: str = "auto",
          report_only: bool = False, print_spec: bool = False):
    """Spatial structure vs global information, end to end on the digits -> OUT/summary.md, targets.csv,
    correlation.csv, scatter.png. Rerunning the same command continues an interrupted study.

    --spec: a study spec (.json; default: the embedded one, --print_spec shows it).
    --targets: encoder names A,B,... (replaces the spec's; NAME+global / NAME+perm are controls).
    --seeds, --eval_steps: A,B or [A, B] (replace the spec's).
    --cache_dir: prepared data and the metric classifier (default: OUT/datasets).
    --report_only: rewrite the report from what OUT holds."""
    from irepa.study import StudySpec, digits_default

    try:
        s = StudySpec.load_or_default(spec, digits_default, targets=_names(targets) if targets is not None else None,
                                      seeds=seeds, eval_steps=eval_steps)
    except ValueError as e:
        raise InputError(str(e)) from None
    if print_spec:
        print(json.dumps(s.to_dict(), indent=2))
        return None
    from irepa.study.report import write_report
    if report_only:
        if not (Path(out) / "compare" / "spec.json").is_file():
            raise InputNotFound(f"{out}: no study here (no compare/spec.json); run the study first")
        text = write_report(out, s).read_text()
        print(text)
        return str(Path(out) / "summary.md")
    import os
    from irepa.compare.backend import Interrupted
    from irepa.study.runner import Study

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else \
        (lambda m: print(f"[rank {rank}] {m}", file=sys.stderr, flush=True))
    try:
        summary = Study(s, out, cache_dir=cache_dir, device=device, rank=rank, world_size=world, log=log).run()
    except (Interrupted, KeyboardInterrupt) as e:
        sys.exit(f"analyze.py: interrupted ({e or 'SIGINT'}); finished pieces are kept in {out}: "
                 f"run the same command again to continue")
    except (ValueError, FileNotFoundError) as e:  # a bad spec, preset, override or folder
        raise InputError(str(e)) from None
    if summary is None:
        return None
    print(summary.read_text())
    print(f"report: {out}/summary.md, {out}/targets.csv, {out}/correlation.csv, {out}/scatter.png")
    return str(summary)


COMMANDS = {"metrics": metrics, "correlate": correlate, "spatialnorm": spatialnorm, "study": study}


def check_args(argv: list[str]) -> None:
    """Refuse an unknown command, option or extra positional value before anything runs (irepa.cli)."""
    from irepa.cli import check_args as _check
    _check(argv, COMMANDS)


def main(argv: list[str] | None = None):
    """The CLI in-process: typed options (irepa.cli.call); a UserError propagates."""
    from irepa.cli import call
    return call(COMMANDS, "analyze.py", sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    from irepa.cli import run
    run(COMMANDS, "analyze.py")
