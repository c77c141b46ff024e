"""Analytic FLOPs (irepa.train.flops) against counted matmul FLOPs, published sizes, and the peak table."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from irepa import models
from irepa.align import AlignmentHead
from irepa.train import flops

TINY = [("SiT-Tiny/2", dict(input_size=16, in_channels=4)), ("SiT-T/2", dict(input_size=8, in_channels=4)),
        ("JiT-T/16", dict(input_size=64))]


def _build(name, **kw):
    if name.startswith("JiT") and "JiT-T/16" not in models.names():
        pytest.skip("irepa.models.jit not available")
    torch.manual_seed(0)
    return models.build(name, num_classes=10, **kw)


def _inputs(m, B=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=g), torch.rand(B, generator=g),
            torch.randint(0, 10, (B,), generator=g))


def _count(fn) -> float:
    # the math SDPA path is made of bmm calls the counter sees; the fused CPU kernel is not counted
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


@pytest.mark.parametrize("name,kw", TINY)
def test_forward_flops_match_counted(name, kw):
    m = _build(name, **kw)
    x, t, y = _inputs(m)
    counted = _count(lambda: m(x, t, y)) / x.shape[0]
    assert flops.transformer_forward_flops(m) == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize("projector", ["conv", "mlp"])
def test_train_step_flops_match_counted(projector):
    m = _build("SiT-Tiny/2", input_size=16, in_channels=4)
    head = AlignmentHead(m.dim, [48, 32], projector, gamma=0.6, hidden_dim=96)
    x, t, y = _inputs(m)
    feats = [torch.randn(x.shape[0], m.num_tokens, e) for e in (48, 32)]

    def step():
        out, h = m(x, t, y)
        (out.square().mean() + head(h, feats)).backward()
    counted = _count(step) / x.shape[0]
    # forward + backward = 3x forward; the backward skips the input gradient of the patch embedding
    assert flops.train_flops_per_image(m, head) == pytest.approx(counted, rel=0.03)


# forward GMACs at 256 px: SiT from the DiT paper (its Gflops are MACs), JiT-B/16 from the JiT release
@pytest.mark.parametrize("name,gmacs,kw", [("SiT-S/2", 6.06, {}), ("SiT-B/2", 23.0, {}), ("SiT-L/2", 80.7, {}),
                                           ("SiT-XL/2", 118.6, {}),
                                           ("JiT-B/16", 25.2, dict(input_size=256, in_channels=3))])
def test_published_sizes(name, gmacs, kw):
    if name not in models.names():
        pytest.skip(f"{name} not available")
    with torch.device("meta"):  # no memory, no init cost
        m = models.build(name, **kw)
    assert flops.transformer_forward_flops(m) / 2e9 == pytest.approx(gmacs, rel=0.005)


@pytest.mark.parametrize("device_name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                              ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                              ("Some Future GPU", None)])
def test_peak_table_by_device_name(monkeypatch, device_name, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: device_name)
    assert flops.peak_tflops("cuda:0") == peak


def test_no_peak_on_cpu():
    assert flops.peak_tflops("cpu") is None and flops.peak_tflops(None) is None
