"""The package's imports flow one way: launch -> train -> recipes -> sampling -> models / data -> align / kernels.

Every `import` and `from ... import` statement of every module (at any depth: a function-level
import is still a dependency) is read with `ast`, mapped to the irepa module it names
(irepa/ -> irepa.*, kernels/ -> irepa.kernels.*, data/ -> irepa.data.*; importing a.b.c
runs the __init__ of a and a.b too, so it depends on them), and checked against LAYERS:
no module imports one of a higher layer, and the module graph has no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"irepa": ROOT / "irepa", "irepa.kernels": ROOT / "kernels", "irepa.data": ROOT / "data"}

# highest first; a module belongs to the longest prefix listed. Same-layer imports are allowed.
LAYERS = [
    ["irepa.metrics.spatial"],  # the public name of the spatial metrics: an alias of irepa.analysis.spatial
    ["irepa.study"],  # a comparison per target plus the targets' metrics and the correlations
    ["irepa.compare"],  # trains runs and evaluates them (only irepa.compare.backend imports train / recipes)
    ["irepa.train"],
    ["irepa.recipes"],
    ["irepa.sampling", "irepa.transport", "irepa.generate", "irepa.meanflow"],  # consume models' velocities; never imported by them
    ["irepa.models", "irepa.data", "irepa.analysis", "irepa.autoencoder",
     "irepa.metrics.reference"],  # evaluate.py's real images: an ADM batch, or a folder read as prepare reads it
    ["irepa.align", "irepa.adaln", "irepa.kernels", "irepa.codec", "irepa.grid", "irepa.metrics", "irepa.encoders",
     "irepa.analysis.spatial"],
    ["irepa.config", "irepa.cli", "irepa.dist", "irepa.forward_ad", "irepa.errors", "irepa"],
]


def _layer(module: str) -> int:
    best, rank = "", None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) >= len(best):
                best, rank = n, len(LAYERS) - 1 - i
    assert rank is not None, f"{module} is in no layer of tests/test_layers.py; add it"
    return rank


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in SOURCES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "irepa" and parts[:1] in (["kernels"], ["data"]):
                continue
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """irepa modules `name` depends on (each target plus the packages above it)."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base.split(".")
                mod = ".".join(up[: len(up) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            while t and t not in known:  # `import irepa.x.y` where y is an attribute
                t = t.rsplit(".", 1)[0] if "." in t else ""
            while t:
                if t != name:
                    found.add(t)
                t = t.rsplit(".", 1)[0] if "." in t else ""
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _descends(a: str, b: str) -> bool:
    """Importing a submodule always runs its packages' __init__ first: not a dependency cycle."""
    return a.startswith(b + ".")


def test_no_import_from_a_higher_layer():
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, targets in sorted(_graph().items()) for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t in ts if not _descends(m, t)} for m, ts in _graph().items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walk_sees_function_level_and_relative_imports():
    """The checker itself: a lazy import inside a function and a relative import are both edges."""
    g = _graph()
    assert "irepa.models.sit" in g["irepa.models"]  # `from .sit import ...` in irepa/models/__init__.py
    assert "irepa.encoders" in g["irepa.data.prepare"]  # imported inside build_encoder()
    assert "irepa.data" in g["irepa.train.build"]
