"""What a file is, from its first bytes: checked before torch.load, so a wrong file is named as what it is.

torch.load of a PNG, a JSON file or a safetensors file fails with several lines about
`weights_only` and pickle opcodes that do not say what the file is. `sniff` reads the magic
bytes (and a zip's member names) and `require_torch` turns a mismatch into one line:
"x.png: a PNG image, not the Inception weights (a torch .pt/.pth file)".
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from irepa.errors import InputError, InputNotFound

_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"RIFF", "riff"), (b"\x1f\x8b", "gzip"), (b"%PDF", "pdf"))
DESCRIPTIONS = {
    "torch": "a torch file", "pickle": "a pickle (legacy torch.save format)",
    "safetensors": "a safetensors file",
    "npz": "a numpy .npz archive", "zip": "a zip archive",
    "damaged-zip": "a truncated or damaged zip archive (a torch file or .npz cut short?)", "png": "a PNG image", "jpeg": "a JPEG image",
    "gif": "a GIF image", "bmp": "a BMP image", "riff": "a RIFF file (WebP image, WAV audio)",
    "gzip": "a gzip archive", "pdf": "a PDF document", "json": "a JSON text file", "text": "a text file",
    "empty": "an empty file", "unknown": "a file of unknown kind",
}


def sniff(path: str | Path) -> str:
    """One of DESCRIPTIONS' keys. "torch": torch.save's zip layout (a member named */data.pkl);
    "pickle": a pickle stream, which the legacy torch.save format also is."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # PROTO opcode, protocols 2-5
        return "pickle"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"  # u64 header length, then the JSON header
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "unknown"


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return "damaged-zip"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


def describe(path: str | Path) -> str:
    return DESCRIPTIONS[sniff(path)]


def require_torch(path: str | Path, what: str) -> Path:
    """`path` if it is a file torch.load can read (torch's zip or a pickle), else an InputError
    naming what it is and `what` was expected; InputNotFound if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: not found (expected {what})")
    kind = sniff(path)
    if kind not in ("torch", "pickle"):
        raise InputError(f"{path}: {DESCRIPTIONS[kind]}, not {what}")
    return path
