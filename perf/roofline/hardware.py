"""The devices the roofline predicts for: the MFU denominator (dense bf16 peak), the matmul rate
and copy bandwidth the time model uses, and the card's memory (the planner's budget). The GPU
call's preflight measures the two rates on the card it runs on (perf/preflight.py writes
preflight.json); `measured(path)` turns that into a Device, so predictions use the card's
measured rates instead of these."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float
    """dense bf16 peak, the MFU denominator (irepa.train.flops.PEAK_TFLOPS)"""
    matmul_tflops: float
    bandwidth_tbs: float
    memory_gib: float
    """what torch reports as the card's memory; the planner may use 90% of it"""
    source: str


DEVICES = {
    "h200": Device("NVIDIA H200", 989.0, 790.0, 4.3, 139.0,
                   "matmul 790 TFLOP/s (8192^3 bf16, random data) and copy 4.3 TB/s measured on this "
                   "workplace's H200 (.library/device/KINDS.md, 2026-10/11); nominal HBM 4.8 TB/s"),
    "h100-sxm": Device("NVIDIA H100 80GB HBM3", 989.0, 798.0, 3.0, 79.1,
                       "matmul 798 TFLOP/s (8192^3 bf16, random data) and copy 3.0 TB/s measured on this "
                       "workplace's H100 (.library/device/KINDS.md, 2026-11-13); nominal HBM 3.35 TB/s"),
}


def measured(path: Path, base: str | None = None) -> tuple[str, Device]:
    """(device model key, Device) from a preflight.json: its GPU's measured GEMM rate at SiT's
    shapes and copy bandwidth replace the base model's (the one its GPU name matches)."""
    pre = json.loads(Path(path).read_text())
    name = pre.get("gpu", {}).get("name", "")
    key = base or ("h200" if "H200" in name else "h100-sxm" if "H100" in name else None)
    if key not in DEVICES:
        raise SystemExit(f"{path}: GPU {name!r} matches no device model ({', '.join(DEVICES)}); give --device")
    m = pre.get("measured", {})
    if not m.get("gemm_tflops") or not m.get("copy_tbs"):
        raise SystemExit(f"{path}: no measured GEMM rate or copy bandwidth (did the preflight finish?)")
    dev = DEVICES[key]
    return key, replace(dev, matmul_tflops=round(m["gemm_tflops"], 1), bandwidth_tbs=round(m["copy_tbs"], 3),
                        memory_gib=pre.get("gpu", {}).get("memory_gib") or dev.memory_gib,
                        source=f"measured by the preflight of {path} on {name} (commit {pre.get('commit', '?')})")
