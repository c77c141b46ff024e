"""Top-level names the checkout's folders would shadow: `kernels` and `data`.

setup.py installs the folders `kernels/` and `data/` as `irepa.kernels` and `irepa.data`.
Wherever the checkout's root is on `sys.path` (`python -m pytest`, `python -c` or a notebook
started there), Python would also find them as top-level packages named `kernels` and
`data`: names other projects own. Hugging Face's `kernels` package is the one that
matters today: transformers and diffusers run `from kernels import ...` when they load,
and got our folder instead of it.

So when one of these folders is imported under its top-level name, its `__init__` calls
`yield_name`, which loads the package that owns the name from the rest of the import path
in its place (the import statement receives that module), or, where no other package has
the name, fails as if the folder were not there. Nothing of ours runs under the foreign
name, so the custom ops of irepa.kernels are never registered twice.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def _same_dir(entry: str, root: Path) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == root
    except (OSError, RuntimeError):  # an unreadable or looping entry cannot be the root
        return False


def find_elsewhere(name: str, folder: Path):
    """The import spec of top-level `name` from every place except the checkout `folder` sits in."""
    root = folder.resolve().parent
    path = [p for p in sys.path if isinstance(p, str) and not _same_dir(p, root)]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, path)
        else:  # editable installs and other meta-path finders (they do not scan sys.path)
            find = getattr(finder, "find_spec", None)
            try:
                spec = find(name, None) if find else None
            except Exception:  # a third-party finder that fails on a name it does not own
                spec = None
        if spec is not None and spec.origin and Path(spec.origin).resolve().parent == folder.resolve():
            spec = None  # a finder that maps the name to this very folder
        if spec is not None:
            return spec
    return None


def yield_name(name: str, init_file: str) -> None:
    """Called from a checkout folder's `__init__` imported as the top-level `name`: put the
    package that owns `name` into sys.modules in its place, or raise ModuleNotFoundError."""
    folder = Path(init_file).resolve().parent
    spec = find_elsewhere(name, folder)
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {folder} is the irepa checkout's irepa.{name}, "
            f"not a top-level package)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement that started this returns sys.modules[name]
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
