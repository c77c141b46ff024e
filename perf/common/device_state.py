"""What the device was doing when a row was measured: peak reserved memory, clocks, power,
throttle reasons (nvidia-smi, read right after the timed region), and the SDPA backend torch
picks for a shape. Every column exists on CPU too, empty, so CPU practice rows have the GPU
rows' layout."""
from __future__ import annotations

import shutil
import subprocess

SMI_FIELDS = {"sm_clock_mhz": "clocks.sm", "mem_clock_mhz": "clocks.mem", "power_w": "power.draw",
              "temp_c": "temperature.gpu", "throttle": "clocks_throttle_reasons.active"}
# bit -> name (NVML's clocksThrottleReasons): why the SM clock is below its maximum
THROTTLE_BITS = {0x1: "idle", 0x2: "app-clocks", 0x4: "sw-power-cap", 0x8: "hw-slowdown", 0x20: "sw-thermal",
                 0x40: "hw-thermal", 0x80: "hw-power-brake", 0x100: "display-clocks"}


def throttle_names(mask: str) -> str:
    try:
        bits = int(mask, 16)
    except ValueError:
        return mask
    names = [n for b, n in THROTTLE_BITS.items() if bits & b]
    return "+".join(names) if names else "none"


def gpu_state(device) -> dict:
    """Clocks, power, temperature and throttle reasons of the GPU now ('' each on CPU or without nvidia-smi)."""
    out = dict.fromkeys(SMI_FIELDS, "")
    if not str(device).startswith("cuda") or shutil.which("nvidia-smi") is None:
        return out
    import torch
    index = torch.device(device).index or 0
    try:
        line = subprocess.run(["nvidia-smi", f"--id={index}", "--format=csv,noheader,nounits",
                               "--query-gpu=" + ",".join(SMI_FIELDS.values())], capture_output=True, text=True,
                              timeout=10).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return out
    values = [v.strip() for v in line.split(",")]
    if len(values) == len(SMI_FIELDS):
        out.update(zip(SMI_FIELDS, values))
        out["throttle"] = throttle_names(out["throttle"])
    return out


def memory_state(device) -> dict:
    """Peak allocated and reserved GiB since the last reset ('' on CPU)."""
    if not str(device).startswith("cuda"):
        return {"peak_alloc_gib": "", "peak_reserved_gib": ""}
    import torch
    return {"peak_alloc_gib": f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}",
            "peak_reserved_gib": f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f}"}


def sdpa_backend(shape=(2, 16, 256, 72), dtype=None, device="cpu") -> str:
    """The backend torch's SDPA dispatcher picks for q = k = v of `shape` (B, H, T, D) here."""
    import torch
    dtype = dtype or torch.bfloat16
    try:
        q = torch.empty(shape, dtype=dtype, device=device)
        choice = torch._fused_sdp_choice(q, q, q)
        return torch.nn.attention.SDPBackend(choice).name.lower()
    except Exception as e:  # private API: a torch without it says so in the row
        return f"unknown ({type(e).__name__})"


def row_state(device, sdpa_shape=None) -> dict:
    """The columns every timing row carries about the device."""
    state = {**memory_state(device), **gpu_state(device)}
    if sdpa_shape is not None:
        import torch
        state["sdpa_backend"] = sdpa_backend(sdpa_shape, torch.bfloat16, device)
    return state
