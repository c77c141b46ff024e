"""irepa.kernels.fused_alignment_loss against float64: under the Triton interpreter on CPU,
or compiled on CUDA tensors (tests/conftest.py picks the device, IREPA_KERNEL_TEST_DEVICE).

Three-way check (flash-attention style): the kernel's error against a float64 oracle must
be at most a small multiple of the eager reference's own error in the same dtype plus an
atol per dtype. Outputs are poisoned with NaN so an element a kernel forgets to write shows.
Shapes stay small: the interpreter runs every program in numpy; training-sized shapes and
inductor run on CUDA only. The op computes dL/dz in the forward; the saved-bytes tests pin
what that buys and that forward-only calls skip it.
"""
import os

import pytest
import torch

pytest.importorskip("triton")
from irepa.align import alignment_loss
from irepa.kernels import alignment as K
from irepa.kernels import fused_alignment_loss

# tests/conftest.py decides the device once: "cpu" sets TRITON_INTERPRET=1 before triton is
# first imported, "cuda" leaves the kernels compiled; the fixture below checks which took effect
DEVICE = os.environ.get("IREPA_KERNEL_TEST_DEVICE", "cpu")
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels on CUDA (IREPA_KERNEL_TEST_DEVICE=cuda)")

# atol relative to the largest reference value; bf16 has room for the interpreter's
# fp32 -> bf16 cast, which truncates where the GPU rounds to nearest
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


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
    monkeypatch.setattr(K, "_empty_like", lambda t: torch.full_like(t, float("nan")))


def _inputs(shape, dtype, offset=3.0, device=DEVICE):
    z = torch.randn(shape, dtype=torch.float32, device=device).to(dtype).requires_grad_()
    y = (torch.randn(shape, device=device) * 2 + offset).to(dtype)  # channel offset: spatial norm must remove it
    return z, y


def _loss_and_grad(fn, z, y, gamma, grad_out=1.0):
    z = z.detach().requires_grad_()
    loss = fn(z, y, gamma)
    (loss * grad_out).backward()  # grad_out != 1: a loss scale (GradScaler) or loss weight
    return loss.detach(), z.grad


def _check(z, y, gamma, grad_out=1.0, fn=fused_alignment_loss):
    dtype = z.dtype
    loss_64, dz_64 = _loss_and_grad(K._ref, z.detach().double(), y.double(), gamma, grad_out)
    loss_e, dz_e = _loss_and_grad(alignment_loss, z, y, gamma, grad_out)
    loss_k, dz_k = _loss_and_grad(fn, z, y, gamma, grad_out)
    assert loss_k.device == z.device and dz_k.device == z.device
    assert loss_k.dtype == torch.float32 and dz_k.dtype == dtype and dz_k.shape == z.shape
    assert torch.isfinite(loss_k) and torch.isfinite(dz_k).all()
    for got, eager, ref in [(loss_k, loss_e, loss_64), (dz_k, dz_e, dz_64)]:
        err = (got.double() - ref).abs().max().item()
        err_eager = (eager.double() - ref).abs().max().item()
        # the loss is a mean of cosines, each bounded by 1: rounding scales with the summands,
        # not with the mean, which is near 0 for unrelated random z and y
        scale = 1.0 if got.dim() == 0 else ref.abs().max().item()
        atol = ATOL[dtype] * scale + 1e-9
        assert err <= 2 * err_eager + atol, f"{dtype} gamma={gamma}: err {err:.3g}, eager {err_eager:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [None, 0.6])
def test_matches_float64(dtype, gamma):
    _check(*_inputs((2, 13, 40), dtype), gamma)


def test_odd_shape_T257_E1000_B1():
    _check(*_inputs((1, 257, 1000), torch.bfloat16), 0.6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(dtype):
    # z as the conv projector hands it over ([B, E, T] memory), y a channel slice
    z = torch.randn(2, 24, 36, device=DEVICE).to(dtype).transpose(1, 2).requires_grad_()
    y = (torch.randn(2, 36, 50, device=DEVICE) + 1).to(dtype)[:, :, 3:27]
    assert not z.is_contiguous() and not y.is_contiguous()
    _check(z, y, 0.8)
    dz = _loss_and_grad(fused_alignment_loss, z, y, 0.8)[1]
    assert dz.stride() == z.stride()  # the gradient keeps the caller's layout


def test_fp16_small_gradient_with_loss_scale():
    # |z| ~ 6e3, N = 26: dL/dz ~ 1e-6 is subnormal in fp16 (spacing 6e-8); a loss scale of
    # 1024 makes it ~1e-3, and eager applies the scale in fp32 before its one cast. Storing
    # dL/dz itself in fp16 would lose ~3 % here; the op stores the unit-scale w instead.
    z, y = _inputs((2, 13, 40), torch.float16)
    z = (z.detach().float() * 1000).half().requires_grad_()
    _check(z, y, 0.6, grad_out=1024.0)


def test_zero_token_and_large_offset():
    # a zero projection token (norm clamp: the norm's derivative is blocked) and a
    # channel offset 1e3 times the spread (cancellation in a naive sum of squares)
    z, _ = _inputs((2, 10, 33), torch.float32)
    y = torch.randn(2, 10, 33, device=DEVICE) + 1e3
    z = z.detach().clone()
    z[0, 3] = 0
    _check(z.requires_grad_(), y, 0.6)


def test_target_gets_no_gradient():
    z, y = _inputs((1, 6, 8), torch.float32)
    y.requires_grad_()
    fused_alignment_loss(z, y, 0.6).backward()
    assert y.grad is None and z.grad is not None


def test_compile_fullgraph():
    z, y = _inputs((2, 9, 24), torch.float32)

    def step(z, y):
        return 0.5 * fused_alignment_loss(z, y, 0.6)

    # aot_eager traces forward and backward through register_fake / register_autograd like
    # inductor does, without a C++ build per test run
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, dz = _loss_and_grad(lambda z, y, _: compiled(z, y), z, y, None)
    want, dz_want = _loss_and_grad(lambda z, y, g: 0.5 * alignment_loss(z, y, g), z, y, 0.6)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dz, dz_want)
    with torch.no_grad():  # the flag is a trace-time constant: a second graph, no gradient made
        torch.testing.assert_close(compiled(z, y), want)


@cuda_only
@pytest.mark.parametrize("shape", [(256, 256, 768), (256, 256, 1152), (64, 1024, 1536)])
def test_training_shapes_bf16(shape):
    # B = 256 images of 16x16 tokens against DINOv2-B / SiT-XL widths, and 32x32 tokens at E = 1536
    torch.manual_seed(0)
    _check(*_inputs(shape, torch.bfloat16), 0.6)


@cuda_only
def test_training_shape_conv_projector_layout():
    # the conv projector's output: conv [B, E, H, W] -> flatten(2).transpose(1, 2) = [B, T, E]
    # with strides (E * T, 1, T); the target is the encoder's contiguous [B, T, E]
    torch.manual_seed(0)
    B, T, E = 256, 256, 768
    z = torch.randn(B, E, T, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    y = (torch.randn(B, T, E, device=DEVICE) * 2 + 3).to(torch.bfloat16)
    assert z.stride() == (E * T, 1, T)
    _check(z, y, 0.6)
    dz = _loss_and_grad(fused_alignment_loss, z, y, 0.6)[1]
    assert dz.stride() == z.stride()


@cuda_only
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2, 9, 24)), (torch.bfloat16, (8, 256, 768))])
def test_compile_fullgraph_inductor(dtype, shape):
    # the default backend: inductor generates its own Triton kernels around the custom op
    torch._dynamo.reset()
    z, y = _inputs(shape, dtype)

    def step(z, y):
        return 0.5 * fused_alignment_loss(z, y, 0.6)

    compiled = torch.compile(step, fullgraph=True)
    _check(z, y, 0.6, fn=lambda z, y, g: 2 * compiled(z, y))  # three-way, against float64
    got, dz = _loss_and_grad(lambda z, y, _: compiled(z, y), z, y, None)
    want, dz_want = _loss_and_grad(lambda z, y, g: 0.5 * fused_alignment_loss(z, y, g), z, y, 0.6)
    torch.testing.assert_close(got, want)  # the same kernels, compiled or not
    torch.testing.assert_close(dz, dz_want)
    with torch.no_grad():
        torch.testing.assert_close(compiled(z, y), want)


def test_opcheck():
    z, y = _inputs((2, 4, 8), torch.float32)
    torch.library.opcheck(K._alignment_fwd_op, (z, y, 0.6, True))
    torch.library.opcheck(K._alignment_fwd_op, (z, y, None, True))
    zt = torch.randn(2, 8, 4, device=DEVICE).transpose(1, 2).requires_grad_()  # fake must give w z's layout
    torch.library.opcheck(K._alignment_fwd_op, (zt, y, 0.6, True))
    torch.library.opcheck(K._alignment_fwd_op, (z.detach(), y, 0.6, False))


def test_backward_twice_and_flag_misuse():
    z, y = _inputs((2, 6, 8), torch.float32)
    loss = fused_alignment_loss(z, y, 0.6)
    (dz1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (dz2,) = torch.autograd.grad(loss * 3, z)  # the saved gradient is read, never scaled in place
    torch.testing.assert_close(dz2, 3 * dz1)
    loss = K._alignment_fwd_op(z, y, 0.6, False)[0]  # the op itself, told no gradient is needed
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.backward()


def test_cpu_falls_back_to_reference_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, y = _inputs((2, 5, 7), torch.bfloat16, device="cpu")
    assert torch.equal(fused_alignment_loss(z, y, 0.6), alignment_loss(z, y, 0.6))


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        fused_alignment_loss(torch.randn(2, 4, 8), torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="2 tokens"):
        fused_alignment_loss(torch.randn(2, 1, 8), torch.randn(2, 1, 8), 0.6)


def _saved_bytes(fn, *args) -> int:
    """Bytes autograd keeps for backward, each storage counted once."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def test_saves_a_third_of_eager():
    z, y = _inputs((2, 16, 64), torch.bfloat16)
    eager = _saved_bytes(alignment_loss, z, y, 0.6)
    fused = _saved_bytes(fused_alignment_loss, z, y, 0.6)
    # everything counted, inputs included: the bf16 gradient direction and rz per token
    # against eager's fp32 copies of z and of the normalized target
    assert fused == z.numel() * 2 + 2 * 16 * 4, fused
    assert fused <= eager / 3, (fused, eager)


@pytest.mark.parametrize("mode", ["no_grad", "z_frozen"])
def test_forward_only_makes_no_gradient(monkeypatch, mode):
    z, y = _inputs((2, 16, 64), torch.bfloat16)
    with_grad = fused_alignment_loss(z, y, 0.6).detach()
    allocs = []
    poison = K._empty
    monkeypatch.setattr(K, "_empty", lambda shape, dtype, device: allocs.append(tuple(shape)) or poison(shape, dtype, device))
    monkeypatch.setattr(K, "_empty_like", lambda t: pytest.fail("forward-only call allocated a gradient"))
    if mode == "no_grad":
        with torch.no_grad():
            saved = _saved_bytes(fused_alignment_loss, z, y, 0.6)
            loss = fused_alignment_loss(z, y, 0.6)
    else:  # grad mode on, but nothing upstream wants dL/dz (eval of a frozen projector)
        z = z.detach()
        saved = _saved_bytes(fused_alignment_loss, z, y, 0.6)
        loss = fused_alignment_loss(z, y, 0.6)
    assert saved == 0 and not loss.requires_grad
    assert allocs == [(2, 2, 64), (2 * 16,)] * 2  # channel statistics and cos only, per call
    assert torch.equal(loss, with_grad)  # the gradient pass does not touch the loss


def compile_check(bench: str) -> dict:
    """Run python -m perf.<bench> --compile-check in a fresh process: real Triton compilation for
    sm_90 (no GPU needed) cannot share a process with the interpreter."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # -P and the root last on the path: an installed or linked irepa (the device machine's) comes first
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH", ""), root]))
    res = subprocess.run([sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", f"perf.{bench}",
                          "--compile-check"], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    if res.returncode != 0 and ("ptxas" in res.stderr or "No module named 'triton.backends.nvidia'" in res.stderr):
        pytest.skip("this triton cannot compile for sm_90 here")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_compiles_for_sm90_with_vector_loads():
    # the interpreter accepts code the compiler rejects: compile the real thing too
    kinds = compile_check("bench_alignment")
    assert set(kinds) == {"stats", "token_fwd_contiguous", "token_fwd_transposed",
                          "token_bwd_contiguous", "token_bwd_transposed"}
    for name, instrs in kinds.items():
        assert "ld.global.v4.b32" in instrs, (name, instrs)  # 16-byte loads of the [B, T, E] tensors
        if name.startswith("token_"):  # the forward writes the gradient direction, the backward dz
            assert "st.global.v4.b32" in instrs, (name, instrs)
