"""The repository is self-contained: no tracked file sends a reader to notes that are not in it
(the design and spec notes the project was written from, or the folder they were shared in).
Upstream code is cited by repository, file and commit instead; detail lives in docs/."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from parts so that this file does not match itself.
_NOTES = "|".join(("SPEC", "SPEC_RECIPES", "DESIGN", "STYLE"))
OUTSIDE = re.compile(rb"\b(?:" + _NOTES.encode() + rb")\.md\b|\.\./" + b"shared|/work/" + b"shared", re.IGNORECASE)


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p]


def outside_references(paths, root: Path = ROOT) -> list[str]:
    found = []
    for path in paths:
        if not path.is_file():  # deleted in the work tree, or a submodule
            continue
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(root)}:{n}: {line.decode(errors='replace').strip()[:120]}")
    return found


def test_no_tracked_file_points_outside_the_repository():
    files = tracked_files()
    assert len(files) > 50 and ROOT / "README.md" in files
    assert outside_references(files) == []


def test_the_check_finds_each_kind_of_reference(tmp_path):
    names = [n + ".md" for n in _NOTES.split("|")] + ["../" + "shared/notes.txt", "/work/" + "shared/x"]
    files = []
    for i, name in enumerate(names):
        f = tmp_path / f"f{i}.py"
        f.write_text(f"x = 1\n# see {name.lower() if i % 2 else name} for why\n")
        files.append(f)
    clean = tmp_path / "clean.py"
    clean.write_text('SPEC = "spec.json"\n_SPECS = []  # SPECmd, DESIGN notes, style.mdx\n')
    found = outside_references(files + [clean], root=tmp_path)
    assert [line.split(":")[0] for line in found] == [f.name for f in files]
