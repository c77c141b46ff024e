"""Where a training step's time goes: one profiled step, its device time per op class (the
roofline's classes, perf/roofline), written beside the roofline's prediction for that class.

On a GPU each CUDA kernel's time counts; on CPU (the practice run) each aten op's self time. A
kernel is classed by its name (cuBLAS / CUTLASS GEMMs, flash / memory-efficient attention, our
Triton kernels, Inductor's fused kernels named after the ops they hold), and everything that runs
inside the step's update range (irepa.train.step.UPDATE) is optimizer+EMA, as in the roofline. A
kernel no rule names falls in `other`, which has no prediction. The baseline's online encoder
cannot be told apart by kernel name: its kernels count in their own classes here.
"""
from __future__ import annotations

import torch

from irepa.train.step import UPDATE
from perf.op_classes import op_class

def _in_update(evt) -> bool:
    p = evt.cpu_parent
    while p is not None:
        if p.name == UPDATE:
            return True
        p = p.cpu_parent
    return False


def _device_events(prof, cuda: bool):
    """(name, microseconds, in_update) of each kernel (GPU) or aten op's self time (CPU)."""
    for evt in prof.events():
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            parent = getattr(evt, "cpu_parent", None)
            yield evt.name, evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total, \
                parent is not None and (parent.name == UPDATE or _in_update(parent))
        elif evt.name.startswith("aten::") or "alignment_loss" in evt.name or "adaln" in evt.name:
            yield evt.name, evt.self_cpu_time_total, _in_update(evt)


def profile_step(step, index: int, device: torch.device) -> dict[str, float]:
    """ms per class of one call step(index), profiled (after warm-up: nothing compiles in it)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step(index)
        if cuda:
            torch.cuda.synchronize(device)
    out: dict[str, float] = {}
    for name, us, upd in _device_events(prof, cuda):
        cls = op_class(name, upd)
        out[cls] = out.get(cls, 0.0) + us / 1e3
    return out


def attribution_rows(common: dict, model: str, config: str, measured: dict[str, float], prediction: dict | None,
                     classes: tuple[str, ...]) -> list[dict]:
    """One row per class: measured ms beside the roofline row's `{class}_ms` (empty without one)."""
    rows = []
    for cls in [*classes, "other"]:
        if cls not in measured and not (prediction and prediction.get(f"{cls}_ms")):
            continue
        pred = (prediction or {}).get(f"{cls}_ms", "")
        rows.append(dict(common, model=model, config=config, op_class=cls,
                         measured_ms=f"{measured.get(cls, 0.0):.3f}", predicted_ms=pred,
                         prediction_device=(prediction or {}).get("device_model", "")))
    return rows
