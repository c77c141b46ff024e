"""Analytic FLOPs of a training step and the peak-throughput table for MFU.

Counts matmul FLOPs (2 per multiply-add) of the transformer forward per image, then
x3 for forward + backward. Elementwise work, norms and softmax are left out, as in the
DiT paper's Gflops and the usual MFU convention.
"""
from __future__ import annotations

import torch

# dense bf16 tensor-core peak, TFLOP/s, matched against torch.cuda.get_device_name
PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0),
    ("RTX 4090", 165.0), ("V100", 125.0),
]


def peak_tflops(device: torch.device | str | None = None) -> float | None:
    """Peak bf16 TFLOP/s of a CUDA device by name, or None where unknown (CPU)."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(dev)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def transformer_forward_flops(model) -> float:
    """Forward matmul FLOPs per image from the model's config (SiT or JiT)."""
    if hasattr(model, "forward_flops"):
        return float(model.forward_flops())
    D, L, T = model.dim, model.depth, model.num_tokens
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    per_block = T * (4 * D * D + 2 * D * mlp_hidden) + 2 * T * T * D + 6 * D * D
    patch_in = T * model.in_channels * model.patch_size ** 2 * D
    patch_out = T * D * model.out_channels * model.patch_size ** 2 + 2 * D * D
    t_embed = 256 * D + D * D
    return 2.0 * (L * per_block + patch_in + patch_out + t_embed)


def projector_forward_flops(head, num_tokens: int, dim: int) -> float:
    total = 0.0
    for proj in head.projectors:
        for p in proj.parameters():
            if p.dim() >= 2:
                total += 2.0 * num_tokens * p.numel()
    return total


def train_flops_per_image(model, head=None) -> float:
    fwd = transformer_forward_flops(model)
    if head is not None:
        fwd += projector_forward_flops(head, model.num_tokens, model.dim)
    return 3.0 * fwd
