"""The check of every listed image file before any is encoded: which are skipped and why,
which are converted to RGB, which are smaller than the crop.

Per file it costs about an open: PIL reads the header (format, size, pixel mode); a JPEG's
last bytes must be its end marker (a truncated JPEG is decoded to confirm), a PNG's chunks
and checksums are verified without decompressing, any other format is decoded once. A file
that passes and still fails to decode when encoded is handled by data/prepare.py.

Skipped, each with its reason: broken symbolic links, empty files, files PIL cannot identify
(e.g. text named .jpg), truncated or corrupt files, pixel modes without a defined 8-bit RGB
(32-bit integer "I", float "F"), and with `small_images="skip"` images whose short side is
below the resolution. Converted to RGB and counted: gray, gray+alpha, palette, RGBA (alpha
dropped), CMYK, YCbCr, 16-bit gray (scaled to 8 bits). Smaller than the resolution and kept
(`small_images="upscale"`, what ADM's center crop does): counted, the smallest named.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .sources import EIGHT_BIT_MODES, SIXTEEN_BIT_MODES

SMALL_IMAGES = ("upscale", "skip")
JPEG_END = b"\xff\xd9"
CHUNK = 4096  # files per thread-pool round: bounds the futures in flight on a million-file listing


def check_image(path: Path) -> tuple[str | None, str | None, tuple[int, int] | None]:
    """(reason it is unusable or None, pixel mode, (width, height)) of one image file."""
    if not path.exists():
        return ("broken symbolic link (its target is missing)" if path.is_symlink() else "missing"), None, None
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)", None, None
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            if mode not in EIGHT_BIT_MODES + SIXTEEN_BIT_MODES:
                return f"pixel mode {mode} has no defined 8-bit RGB (only 8-bit and 16-bit gray images are read)", \
                    mode, size
            if img.format == "JPEG":
                if not _ends_with_jpeg_marker(path):
                    img.load()  # no end marker: truncated, or trailing bytes after it; decoding decides
            elif img.format == "PNG":
                img.verify()
            else:
                img.load()
    except UnidentifiedImageError:
        return "not an image file PIL can read", None, None
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})", None, None
    except OSError as e:
        if e.errno is not None:  # the system's refusal (permissions, I/O error), not the data's
            return f"cannot be read ({e.strerror})", None, None
        return f"truncated or corrupt ({e})", None, None
    except (SyntaxError, ValueError) as e:  # what PIL raises for malformed headers or chunks
        return f"truncated or corrupt ({e})", None, None
    return None, mode, size


def _ends_with_jpeg_marker(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        return f.read().rstrip(b"\x00\r\n ").endswith(JPEG_END)


def scan(src, lo: int, hi: int, small_images: str, strict: bool, num_threads: int = 4, bar=None) -> dict:
    """Check listed files [lo, hi) of an image-folder source.

    -> {"skipped": [{"index", "path", "reason"}], "converted": {mode: [index]}, "small": [[index, w, h]]}
    ("small": every readable image below the resolution, also listed as skipped with small_images
    "skip"). With strict the scan stops at its first unusable file."""
    out = {"skipped": [], "converted": {}, "small": []}
    R = src.resolution
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for a in range(lo, hi, CHUNK):
            idx = range(a, min(a + CHUNK, hi))
            for i, (reason, mode, size) in zip(idx, pool.map(check_image, map(src.path, idx))):
                small = reason is None and min(size) < R
                if small:
                    out["small"].append([i, *size])
                if small and small_images == "skip":
                    reason = (f"smaller than the {R} px crop ({size[0]}x{size[1]}); --small_images upscale "
                              f"keeps it, upscaled")
                if reason is not None:
                    out["skipped"].append({"index": i, "path": src.paths[i], "reason": reason})
                    if strict:
                        return out
                    continue
                if mode != "RGB":
                    out["converted"].setdefault(mode, []).append(i)
            if bar is not None:
                bar.update(len(idx))
    return out


def merge(parts: list[dict]) -> dict:
    """The scans of consecutive listing blocks as one (in listing order)."""
    out = {"skipped": [], "converted": {}, "small": []}
    for p in parts:
        out["skipped"] += p["skipped"]
        out["small"] += p["small"]
        for mode, idx in p["converted"].items():
            out["converted"].setdefault(mode, []).extend(idx)
    return out
