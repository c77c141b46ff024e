"""irepa.kernels.fused_adaln against float64: under the Triton interpreter on CPU, or compiled
on CUDA tensors (tests/conftest.py picks the device, IREPA_KERNEL_TEST_DEVICE).

Same three-way check as test_kernel_alignment.py: the kernel's error against a float64
reference is at most a small multiple of eager's error in the same dtype plus an atol per
dtype, for the output and the gradients of x, shift and scale. Outputs are NaN-poisoned.
Training-sized shapes and inductor run on CUDA only.
"""
import os

import pytest
import torch

pytest.importorskip("triton")
from irepa.kernels import adaln as K
from irepa.kernels import fused_adaln
from irepa.adaln import modulate_norm_ref

# tests/conftest.py decides the device once: "cpu" sets TRITON_INTERPRET=1 before triton is
# first imported, "cuda" leaves the kernels compiled; the fixture below checks which took effect
DEVICE = os.environ.get("IREPA_KERNEL_TEST_DEVICE", "cpu")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels on CUDA (IREPA_KERNEL_TEST_DEVICE=cuda)")

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # x max |reference|


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    if DEVICE == "cpu":
        if not K.INTERPRETED:
            pytest.fail("irepa.kernels was imported before TRITON_INTERPRET=1 was set: the kernels are "
                        "compiled for a GPU; run this file on its own or import it first")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        if K.INTERPRETED:
            pytest.fail(f"IREPA_KERNEL_TEST_DEVICE={DEVICE} but irepa.kernels was imported with "
                        "TRITON_INTERPRET=1: the kernels are interpreted, not compiled")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors take the reference
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def _inputs(B, T, D, dtype, device=DEVICE):
    x = (torch.randn(B, T, D, device=device) * 3 + 1).to(dtype)
    shift, scale = torch.randn(B, D, device=device).to(dtype), (0.5 * torch.randn(B, D, device=device)).to(dtype)
    return x, shift, scale


def _run(fn, x, shift, scale, grad_out):
    ins = [t.detach().requires_grad_() for t in (x, shift, scale)]
    out = fn(*ins)
    return [out.detach(), *torch.autograd.grad(out, ins, grad_out)]


def _check(x, shift, scale, fn=fused_adaln):
    grad_out = torch.randn(x.shape, device=x.device).to(x.dtype)
    ref = _run(modulate_norm_ref, x.double(), shift.double(), scale.double(), grad_out.double())
    eager = _run(modulate_norm_ref, x, shift, scale, grad_out)
    got = _run(fn, x, shift, scale, grad_out)
    for name, g, e, r, inp in zip(["out", "dx", "dshift", "dscale"], got, eager, ref, [x, x, shift, scale]):
        assert g.dtype == (e.dtype if name == "out" else inp.dtype) and g.shape == r.shape, name
        assert g.device == x.device, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        atol = ATOL[x.dtype] * r.abs().max().item()
        assert err <= 2 * err_eager + atol, f"{name} {x.dtype}: err {err:.3g}, eager {err_eager:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64(dtype):
    _check(*_inputs(2, 7, 40, dtype))


def test_odd_shape():
    _check(*_inputs(1, 257, 1000, torch.bfloat16))


def test_non_contiguous():
    # shift/scale as adaLN chunks of one [B, 6D] projection, x a transposed view
    B, T, D = 3, 5, 24
    mod = torch.randn(B, 6 * D, device=DEVICE)
    shift, scale = mod[:, :D], mod[:, 2 * D:3 * D]
    x = torch.randn(B, D, T, device=DEVICE).transpose(1, 2)
    assert not (x.is_contiguous() or shift.is_contiguous())
    _check(x, shift, scale)


def test_many_chunks_in_backward(monkeypatch):
    # force several T chunks per sample so the partial dshift/dscale reduction is exercised
    monkeypatch.setattr(K, "_num_chunks", lambda x, B, T, rows: 3)
    _check(*_inputs(2, 11, 8, torch.float32))


def test_compile_fullgraph():
    x, shift, scale = _inputs(2, 5, 16, torch.float32)
    grad_out = torch.randn(x.shape, device=DEVICE)
    compiled = torch.compile(lambda x, a, b: fused_adaln(x, a, b) * 2, fullgraph=True, backend="aot_eager")
    got = _run(compiled, x, shift, scale, grad_out)
    want = _run(lambda x, a, b: modulate_norm_ref(x, a, b) * 2, x, shift, scale, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _sit_modulation(B, T, D, x_dtype, device=DEVICE):
    """x and the adaLN projection as SiTBlock.forward has them under bf16 autocast: the
    residual stream x [B, T, D] in fp32 (bf16 without autocast), adaLN_modulation(c)
    [B, 6D] in bf16, whose first two chunks (sh_a, sc_a: strided views) go to the op."""
    x = (torch.randn(B, T, D, device=device) * 3 + 1).to(x_dtype)
    mod = torch.randn(B, 6 * D, device=device).to(torch.bfloat16)
    return x, mod


def _sit_chunks(mod):
    shift, scale, *_ = mod.chunk(6, dim=-1)
    assert shift.stride() == scale.stride() == (mod.shape[1], 1)
    return shift, scale


@cuda_only
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_training_shape_sit_xl(x_dtype):
    # B = 256 images of 16x16 tokens at SiT-XL width
    torch.manual_seed(0)
    x, mod = _sit_modulation(256, 256, 1152, x_dtype)
    _check(x, *_sit_chunks(mod))


@cuda_only
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_inductor(x_dtype):
    # the default backend: inductor generates its own Triton kernels around the custom op
    torch._dynamo.reset()
    B, T, D = 8, 64, 1152
    x, mod = _sit_modulation(B, T, D, x_dtype)
    compiled = torch.compile(lambda x, a, b: fused_adaln(x, a, b) * 2, fullgraph=True)
    _check(x, *_sit_chunks(mod), fn=lambda x, a, b: compiled(x, a, b) / 2)  # three-way, against float64

    # the adaLN chunking traced into the same graph, as torch.compile sees SiTBlock
    def block(x, mod):
        shift, scale, *_ = mod.chunk(6, dim=-1)
        return fused_adaln(x, shift, scale) * 2

    compiled_block = torch.compile(block, fullgraph=True)
    grad_out = torch.randn(B, T, D, device=DEVICE)
    got, want = [], []
    for fn, res in [(compiled_block, got), (block, want)]:  # the same kernel, compiled or not
        ins = [t.detach().requires_grad_() for t in (x, mod)]
        out = fn(*ins)
        res += [out.detach(), *torch.autograd.grad(out, ins, grad_out.to(out.dtype))]
    assert got[0].dtype == x_dtype and got[2].dtype == torch.bfloat16
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_opcheck():
    x, shift, scale = _inputs(2, 3, 8, torch.float32)
    torch.library.opcheck(K._adaln_fwd_op, (x.requires_grad_(), shift.requires_grad_(), scale, 1e-6))


def test_sit_block_uses_fused_kernel():
    from irepa.models.sit import SiTBlock

    torch.manual_seed(0)
    ref, fused = SiTBlock(32, 2, fused=False).to(DEVICE), SiTBlock(32, 2, fused=True).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x, c = torch.randn(2, 4, 32, device=DEVICE), torch.randn(2, 32, device=DEVICE)
    torch.testing.assert_close(fused(x, c), ref(x, c), rtol=1e-5, atol=1e-5)


def test_cpu_falls_back_to_reference_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, shift, scale = _inputs(2, 3, 8, torch.bfloat16, device="cpu")
    assert torch.equal(fused_adaln(x, shift, scale), modulate_norm_ref(x, shift, scale))


def test_bad_input():
    with pytest.raises(ValueError, match=r"shift, scale \[B, D\]"):
        fused_adaln(torch.randn(2, 3, 8), torch.randn(2, 7), torch.randn(2, 7))



def test_compiles_for_sm90_with_vector_loads():
    # the interpreter accepts code the compiler rejects: compile the real thing too
    from test_kernel_alignment import compile_check

    kinds = compile_check("bench_adaln")
    assert set(kinds) == {"adaln_fwd", "adaln_bwd"}
    for name, instrs in kinds.items():
        assert "ld.global.v4.b32" in instrs and "st.global.v4.b32" in instrs, (name, instrs)
