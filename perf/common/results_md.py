"""The generated blocks of perf/RESULTS.md: `<!-- NAME:begin -->` ... `<!-- NAME:end -->`."""
from __future__ import annotations

import os
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def rewrite_block(md: Path, name: str, body: str, heading: str) -> None:
    """Replace block NAME's body, or append `## heading` and the block; the rest of the file is
    kept as it is. Written through a temporary file (a failed write leaves the old file)."""
    md = Path(md)
    begin, end = markers(name)
    text = md.read_text() if md.is_file() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text[text.index(begin):]:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n{block}\n"
    tmp = md.with_suffix(md.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, md)
