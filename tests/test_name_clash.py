"""The checkout's folders `kernels/` and `data/` never stand in for the top-level packages of
those names (irepa/shadowing.py): with the checkout's root first on sys.path (`python -c`,
`python -m pytest` or a notebook started there), `import kernels` gives the package that
owns the name, Hugging Face's `kernels` that transformers and diffusers import, or fails
as if the folder were not there."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_at_root(code: str, pythonpath: str | None = None, *flags: str) -> subprocess.CompletedProcess:
    """`python -c code` started in the checkout's root, which puts the root first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _stand_in(tmp_path: Path, name: str) -> Path:
    """A separately installed package called `name` (with its distribution metadata), as pip lays one out."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("CUDAProperties = 'the other package'\nfrom . import sub\n")
    (site / name / "sub.py").write_text("VALUE = 7\n")
    dist = site / f"{name}-9.9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9.9\n")
    return site


@pytest.mark.parametrize("name", ["kernels", "data"])
def test_top_level_import_at_root_gets_the_other_package(tmp_path, name):
    site = _stand_in(tmp_path, name)
    r = _run_at_root(f"import sys, {name}; from {name} import CUDAProperties; import {name}.sub\n"
                     f"assert not [m for m in sys.modules if m.startswith('{name}.') and m != '{name}.sub'], "
                     f"sorted(sys.modules)\n"  # none of our modules ran under the name (no second op registry)
                     f"print({name}.__file__); print(sys.path[0] == '')\n"
                     f"import importlib.metadata as m; print(m.version({name!r}))", str(site))
    assert r.returncode == 0, r.stderr
    file, root_first, version = r.stdout.split()
    assert root_first == "True"  # the root really was searched first
    assert Path(file) == site / name / "__init__.py", f"`import {name}` at the checkout's root got {file}"
    assert version == "9.9.9"


@pytest.mark.parametrize("name", ["kernels", "data"])
def test_top_level_import_without_the_other_package_fails_cleanly(name):
    # -S: no site-packages, so only the checkout's folder could answer the name
    r = _run_at_root(f"import sys; sys.path.insert(0, '')\n"
                     f"try:\n    import {name}\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
                     f"else:\n    print('found', {name}.__file__)\n"
                     f"print(sorted(m for m in sys.modules if m == {name!r} or m.startswith({name!r} + '.')))",
                     None, "-S")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"missing {name}", "[]"], r.stdout


def test_irepa_kernels_still_serves_its_ops_beside_the_other_package(tmp_path):
    site = _stand_in(tmp_path, "kernels")
    r = _run_at_root("import kernels, irepa.kernels as k, irepa.data as d\n"
                     "print(kernels.CUDAProperties); print(callable(k.fused_alignment_loss), callable(d.build_loader))",
                     str(site))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["the other package", "True True"]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("kernels"), reason="Hugging Face's kernels package is not installed")
def test_hugging_face_kernels_imports_at_root():
    r = _run_at_root("import kernels; from kernels import CUDAProperties; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent != ROOT / "kernels", (
        f"`import kernels` at the checkout's root resolved to our folder {ROOT / 'kernels'} although Hugging "
        f"Face's kernels {importlib.metadata.version('kernels')} is installed: transformers and diffusers break")


@pytest.mark.skipif(not _installed("diffusers"), reason="diffusers is not installed")
def test_diffusers_vae_imports_at_root():
    r = _run_at_root("from diffusers import AutoencoderKL; print(AutoencoderKL.__name__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "AutoencoderKL"
