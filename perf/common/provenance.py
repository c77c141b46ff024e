"""Where a row comes from: the commit, the device and the date.

The commit is git's (short hash, `-dirty` when tracked files differ), else the COMMIT file at the
repository root (written by `python -m perf.common.provenance --write` before a device call: the
copy of the tree on the device machine has no .git), else $IREPA_COMMIT, else "unknown".
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMIT_FILE = "COMMIT"


def git_commit(root: Path = ROOT) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def commit(root: Path = ROOT) -> str:
    found = git_commit(root)
    if found:
        return found
    path = root / COMMIT_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    return os.environ.get("IREPA_COMMIT") or "unknown"


def write_commit_file(root: Path = ROOT) -> str:
    """Write git's commit into the tree (COMMIT, untracked and not ignored, so it travels)."""
    found = git_commit(root)
    if not found:
        raise SystemExit(f"provenance: {root} is not a git checkout: no commit to write")
    tmp = root / (COMMIT_FILE + ".tmp")
    tmp.write_text(found + "\n")
    os.replace(tmp, root / COMMIT_FILE)
    return found


def device_name(device) -> str:
    if str(device).startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def env_info(device) -> dict:
    import torch
    return {"date": utc_now(), "commit": commit(), "device_name": device_name(device), "torch": torch.__version__}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="print the commit rows will carry; --write puts it into the tree")
    p.add_argument("--write", action="store_true", help=f"write {COMMIT_FILE} at the repository root")
    a = p.parse_args(argv)
    print(write_commit_file() if a.write else commit())


if __name__ == "__main__":
    main()
