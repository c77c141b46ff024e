"""Where prepare may write a dataset, and what --overwrite may replace.

Checked on the command's paths before any work (so a refusal costs nothing and touches
nothing), and again at the final rename (hours later, the folder may have changed):

- OUT and OUT.partial are never the source folder, inside it or around it: the source is
  never written into, moved or deleted;
- OUT is missing, an empty folder, or a complete dataset whose manifest names this tool
  (format.made_by_prepare); --overwrite replaces only the last kind. A file, a symbolic link
  or a folder holding anything else (the user's images, unrelated files) is refused;
- OUT.partial, when there, is an unfinished preparation (it holds config.json); a folder of
  that name made by anyone else is refused rather than resumed into or deleted.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from irepa.errors import InputError

from . import format as fmt

CONFIG = "config.json"  # what marks OUT.partial as an unfinished preparation


def check_out(out: Path, partial: Path, source_root: Path | None, overwrite: bool) -> bool:
    """Raise InputError unless a dataset may be written to `out`; True when `out` already holds one."""
    package = Path(__file__).resolve().parent
    if package == out.resolve() or package in out.resolve().parents:
        raise InputError(f"{out}: inside the irepa.data source package ({package}); prepared datasets live outside "
                         f"the source tree (e.g. /data/<name>)")
    if source_root is not None:
        for p in (out, partial):
            _apart_from_source(p, source_root)
    if out.is_symlink():
        raise InputError(f"{out}: a symbolic link; give the folder it points to ({out.resolve()})")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: a file, not a folder; choose another output folder")
    if partial.exists() and not (partial / CONFIG).is_file():
        raise InputError(f"{partial}: a folder that is not an unfinished preparation (no {CONFIG}) is in the way; "
                         f"move it away or choose another output folder")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if fmt.made_by_prepare(out):
        return True
    how = "--overwrite replaces only a prepared dataset; " if overwrite else ""
    raise InputError(f"{out}: exists and is not a dataset made by prepare (no {fmt.MANIFEST} naming "
                     f"{fmt.TOOL}); {how}choose another output folder")


def _apart_from_source(p: Path, source_root: Path) -> None:
    mine, src = p.resolve(), source_root.resolve()
    if mine == src:
        raise InputError(f"{p}: is the source folder; the dataset goes to another folder (the images stay as they are)")
    if src in mine.parents:
        raise InputError(f"{p}: inside the source folder {source_root}; choose an output folder outside it")
    if mine in src.parents:
        raise InputError(f"{p}: contains the source folder {source_root}; choose an output folder beside it")


def replace_out(partial: Path, out: Path, overwrite: bool, bookkeeping: tuple[str, ...]) -> None:
    """Rename the finished `partial` to `out`, then delete its `bookkeeping` files (globs) and, with
    overwrite, the older dataset that was at `out`. Anything else found at `out` by now is refused,
    the finished dataset kept in `partial`."""
    old = None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        dataset = out.is_dir() and not out.is_symlink() and fmt.made_by_prepare(out)
        if not (overwrite and dataset):
            what = "a dataset; pass --overwrite to replace it" if dataset else "not a dataset made by prepare"
            raise InputError(f"{out}: appeared while preparing ({what}); the finished dataset is kept in {partial}")
        old = Path(str(out) + f".old{os.getpid()}")
        os.rename(out, old)
    os.rename(partial, out)
    # bookkeeping goes only now: a crash before the rename must still find it in .partial
    for pattern in bookkeeping:
        for p in out.glob(pattern):
            p.unlink()
    if old is not None:
        shutil.rmtree(old)
