"""CSV rows of the benchmarks: appended as measured, so a run cut off later keeps them."""
from __future__ import annotations

import csv
import os
from pathlib import Path


def read_csv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict], fields: list[str] | None = None, quiet: bool = False) -> None:
    """Append rows. Columns: `fields` first (a script's fixed order), then the file's, then any
    other the rows carry. A file whose header lacks some of them is rewritten once with the
    union (its rows keep their values, the new columns stay empty), through a temporary file."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_fields, old_rows = [], None
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            wanted = list(fields or []) + [k for r in rows for k in r]
            if any(k not in old_fields for k in wanted):
                old_rows = list(reader)
    cols = list(dict.fromkeys(old_fields + list(fields or []) + [k for r in rows for k in r])) if old_fields else \
        list(dict.fromkeys(list(fields or []) + [k for r in rows for k in r]))
    if old_rows is None:
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            if not old_fields:
                w.writeheader()
            w.writerows(rows)
    else:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writeheader()
            w.writerows(old_rows + rows)
        os.replace(tmp, path)
    if not quiet:
        print(f"appended {len(rows)} rows to {path}", flush=True)
