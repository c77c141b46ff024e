"""Op classes, compile units, and the ideal-fusion model of compiled regions (see perf/roofline's
docstring)."""
from __future__ import annotations

import re
from collections import defaultdict

from perf.roofline.record import _GEMM, _NORM_OPS, Op, _is_attention


def classify(op: Op) -> str:
    if op.phase in ("update", "accum"):
        return "optimizer+EMA"
    if op.tag.startswith("encoder"):
        return "online encoder"
    if _is_attention(op.name):
        return "attention"
    if op.name in _GEMM:
        return "GEMM"
    if "::align_loss" in op.tag or op.name.startswith("alignment_loss"):
        return "alignment loss"
    if "::norm" in op.tag or op.name in _NORM_OPS:
        return "norms+modulation"
    return "elementwise"


def compile_unit(op: Op, scope: str | None) -> str | None:
    """The compiled graph an op belongs to (None: it runs eagerly)."""
    if scope is None or op.phase in ("update", "accum") or op.cls == "online encoder":
        return None
    path = op.tag.split("::")[0]
    if scope == "blocks":
        m = re.match(r"net\.model\.blocks\.(\d+)(\.|$)", path)
        return f"blocks.{m.group(1)}" if m else None
    if scope == "net":
        return "net" if path == "net" or path.startswith("net.") else None
    raise ValueError(f"unknown compile scope {scope!r}")


def _fusible(op: Op) -> bool:
    return op.unit is not None and op.cls not in ("GEMM", "attention") and op.name not in (
        "adaln_fwd", "adaln_bwd", "alignment_loss_fwd", "alignment_loss_bwd")


def fuse(ops: list[Op]) -> int:
    """Set op.fused_bytes under the ideal-fusion model of the module docstring; returns the
    number of fused regions (kernels made of fusible ops)."""
    region_of: list[int | None] = [None] * len(ops)
    region_start: list[int] = []
    region_inv: list[int] = []
    readers: dict[int, set[int]] = defaultdict(set)  # storage -> regions that read it
    inv, current = 0, None
    for i, op in enumerate(ops):
        if op.unit is not None:
            key = (op.unit, op.phase)
            if key != current:
                inv, current = inv + 1, key
        if not _fusible(op):
            continue
        cands = set()
        for key, _, w in op.reads:
            if w is not None and region_of[w] is not None and region_inv[region_of[w]] == inv:
                cands.add(region_of[w])
            cands.update(r for r in readers.get(key, ()) if region_inv[r] == inv)
        chosen = None
        for r in sorted(cands, key=lambda r: -region_start[r]):
            if all(w is None or region_of[w] == r or w < region_start[r] for _, _, w in op.reads):
                chosen = r
                break
        if chosen is None:
            chosen = len(region_start)
            region_start.append(i)
            region_inv.append(inv)
        region_of[i] = chosen
        for key, _, _ in op.reads:
            readers[key].add(chosen)
    exported: set[tuple[int, int]] = set()  # (writer op, storage) read outside the writer's region
    for i, op in enumerate(ops):
        for key, _, w in op.reads:
            if w is not None and (region_of[w] is None or region_of[w] != region_of[i]):
                exported.add((w, key))
    imported: set[tuple[int, int]] = set()  # (region, storage) already read by the region
    for i, op in enumerate(ops):
        r = region_of[i]
        if r is None:
            op.fused_bytes = op.bytes
            continue
        b = 0.0
        for key, nbytes, w in op.reads:
            if (w is None or region_of[w] != r) and (r, key) not in imported:
                imported.add((r, key))
                b += nbytes
        b += sum(nbytes for key, nbytes in op.writes if (i, key) in exported)
        op.fused_bytes = b
    return len(region_start)
