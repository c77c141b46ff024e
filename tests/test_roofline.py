"""perf/roofline: the op counting against hand-computed FLOPs and bytes (a Linear, attention),
the CUDA autocast emulation against ATen's CUDA lists, the fusion model on two small graphs
worked out by hand, and whole-model matmul FLOPs against irepa.train.flops and the published
forward GMACs (DiT paper for SiT, the JiT release for JiT)."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from perf import roofline as R


def record(fn, stack=None):
    """Ops of fn(recorder, tagger) run on fake tensors."""
    mode = FakeTensorMode()
    tagger = R.Tagger({})
    rec = R.Recorder(tagger)
    with mode:
        fn(rec, tagger)
    return rec.ops


def test_linear_forward_backward_by_hand():
    """x [4, 8, 16] fp32 through Linear(16, 32), backward with a dense gradient: three GEMMs of
    2*32*16*32 FLOPs; bytes: addmm reads x, W, b and writes y; the two backward mm read dy and
    W (x) and write dx (dW); the bias sum reads dy and writes db. Views move nothing."""
    def fn(rec, _):
        x = torch.empty(4, 8, 16).requires_grad_()
        lin = torch.nn.Linear(16, 32)
        g = torch.empty(4, 8, 32)
        with rec:
            lin(x).backward(g)
    ops = record(fn)
    M, K, N, f = 32, 16, 32, 4
    assert [o.name for o in ops] == ["addmm", "mm", "mm", "sum"]
    assert sum(o.flops for o in ops) == 3 * 2 * M * K * N
    fwd = (M * K + N * K + N + M * N) * f
    bwd = 2 * (M * N + N * K + M * K) * f + (M * N + N) * f
    assert sum(o.bytes for o in ops) == fwd + bwd
    assert [R.classify(o) for o in ops] == ["GEMM", "GEMM", "GEMM", "elementwise"]


def test_attention_is_one_fused_kernel_by_hand():
    """SDPA on q, k, v [2, 3, 16, 8] bf16: forward 2 matmuls of 2*b*h*T*T*d FLOPs, the backward 5
    (recompute of QK^T included; 4 count as useful). Bytes as flash attention moves them: the
    forward reads q, k, v and writes o and the fp32 logsumexp; the backward reads dO, q, k, v, o
    and the logsumexp and writes dq, dk, dv. No T x T score matrix touches memory."""
    b, h, T, d = 2, 3, 16, 8
    n = b * h * T * d * 2  # one bf16 [b, h, T, d] tensor
    lse = b * h * T * 4

    def fn(rec, _):
        q, k, v = (torch.empty(b, h, T, d, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        g = torch.empty(b, h, T, d, dtype=torch.bfloat16)
        with rec:
            F.scaled_dot_product_attention(q, k, v).backward(g)
    ops = [o for o in record(fn) if o.phase != "accum"]
    assert len(ops) == 2 and all(R.classify(o) == "attention" for o in ops)
    mm = 2 * b * h * T * T * d
    fwd, bwd = ops
    assert (fwd.flops, fwd.useful, bwd.flops, bwd.useful) == (2 * mm, 2 * mm, 5 * mm, 4 * mm)
    assert fwd.bytes == 3 * n + n + lse
    assert bwd.bytes == 5 * n + lse + 3 * n


def test_cuda_autocast_policy():
    """ATen's CUDA lists: linear runs in bf16 (each parameter cast once per autocast region,
    however often it is used), layer_norm and sum in fp32, gelu in its input's dtype."""
    def fn(rec, _):
        lin = torch.nn.Linear(16, 16)
        x = torch.empty(2, 16)
        with rec, R.CudaAutocast(torch.bfloat16):
            h = lin(lin(x))
            assert h.dtype == torch.bfloat16
            assert F.layer_norm(h, (16,)).dtype == torch.float32
            assert h.sum().dtype == torch.float32
            assert F.gelu(h).dtype == torch.bfloat16
    ops = record(fn)
    casts = sorted(o.reads[0][1] for o in ops if o.name == "_to_copy")
    # x (128 B fp32), W (1 KiB) and b (64 B) once each although lin runs twice, h (64 B bf16) to fp32
    # for layer_norm; sum reads bf16 with dtype=float32, no cast
    assert casts == [64, 64, 128, 1024]


def _fused_case(fn):
    ops = record(fn)
    for o in ops:
        o.cls = R.classify(o)
        o.unit = R.compile_unit(o, "blocks")
    return ops, R.fuse(ops)


def test_fusion_of_a_pointwise_chain():
    """x [8, 8] fp32 (256 B); a = 2x, b = a + 1, c = relu(b) inside a compiled block, then c.sum()
    outside it: the chain is one kernel that reads x and writes c (512 B); eager moves 3 x 512 B."""
    def fn(rec, tagger):
        x = torch.empty(8, 8)
        with rec:
            tagger.stack.append(("net.model.blocks.0", ""))
            c = torch.relu(x * 2 + 1)
            tagger.stack.pop()
            c.sum()
    ops, regions = _fused_case(fn)
    assert regions == 1
    assert [o.unit for o in ops] == ["blocks.0"] * 3 + [None]
    assert sum(o.bytes for o in ops) == 3 * 512 + 256 + 4
    assert sum(o.fused_bytes for o in ops) == 512 + 256 + 4


def test_fusion_stops_at_a_gemm_it_depends_on():
    """a = 2x; m = a @ w (GEMM); d = a + m; d.sum() outside: d cannot join a's kernel (it needs m,
    made after that kernel ran), so two pointwise kernels: 2x (read x, write a: 512 B) and
    a + m (read a and m, write d: 768 B); the GEMM reads a and w and writes m (768 B)."""
    def fn(rec, tagger):
        x, w = torch.empty(8, 8), torch.empty(8, 8)
        with rec:
            tagger.stack.append(("net.model.blocks.0", ""))
            a = x * 2
            d = a + a @ w
            tagger.stack.pop()
            d.sum()
    ops, regions = _fused_case(fn)
    assert [o.name for o in ops] == ["mul", "mm", "add", "sum"] and regions == 2
    assert [o.fused_bytes for o in ops] == [512, 768, 768, 260]


@pytest.mark.parametrize("name,gmacs", [("SiT-B/2", 23.0), ("SiT-XL/2", 118.6), ("JiT-B/16", 25.2)])
def test_whole_step_flops(name, gmacs):
    """The traced step's matmul FLOPs: the forward of the diffusion model per image equals the
    published forward GMACs x 2 (0.5%), and forward + backward of model and projector equals
    irepa.train.flops.train_flops_per_image (the MFU numerator; 1%: the patch embedding's input
    gradient is not computed)."""
    tr = R.trace_step(name, "eager", 2, R.DEVICES["h200"], micro_batch=2)
    mm = [o for o in tr.ops if R.classify(o) in ("GEMM", "attention")]
    fwd_model = sum(o.useful for o in mm if o.phase == "fwd" and not o.tag.startswith("net.head"))
    assert fwd_model / 2 / 2e9 == pytest.approx(gmacs, rel=0.005)
    assert sum(o.useful for o in mm) == pytest.approx(tr.useful_flops, rel=0.01)


def test_step_classes_and_ceiling():
    """A tiny step per configuration: every class that should appear does, the predicted time is
    the sum of the class times, compiling never predicts more bytes than eager, the fused
    alignment loss moves less than the compiled reference, and the baseline's encoder shows up."""
    dev = R.DEVICES["h200"]
    costs = {}
    for config in R.CONFIGS:
        tr = R.trace_step("SiT-Tiny/2", config, 8, dev, micro_batch=4, quick=True)
        c = costs[config] = R.cost(tr, dev)
        assert c.total_s == pytest.approx(sum(c.t_pred.values()))
        assert 0 < c.mfu < dev.matmul_tflops / dev.peak_tflops
        for k in ("GEMM", "attention", "norms+modulation", "elementwise", "alignment loss", "optimizer+EMA"):
            assert c.bytes[k] > 0, (config, k)
        assert (c.bytes["online encoder"] > 0) == (config == "baseline")
        order = [v for _, v in R.beyond_flops(c)]
        assert order == sorted(order, reverse=True)
    assert sum(costs["compile"].bytes.values()) < sum(costs["eager"].bytes.values())
    assert costs["compile+fusedloss"].bytes["alignment loss"] < costs["compile"].bytes["alignment loss"]


def test_alignment_prediction_ratios():
    """The loss alone: the fused op moves its designed 6 passes (fwd: y twice, z, write w; bwd:
    read w, write dz) of B*T*E bf16 elements, i.e. twice the 3-pass minimum, plus O(B*T + B*E)."""
    B, T, E = 4, 16, 64
    pr = R.alignment_prediction(B, T, E, R.DEVICES["h200"])
    n = B * T * E * 2
    assert 6 * n <= pr["fused"]["bytes"] < 6 * n + 64 * (B * T + B * E)
    assert pr["fused"]["bytes"] < pr["compile"]["bytes"] < pr["eager"]["bytes"]


def test_cli_records_a_prediction(tmp_path, capsys):
    csv_path, md = tmp_path / "roofline.csv", tmp_path / "RESULTS.md"
    md.write_text("# Performance results\n\nkept\n")
    R.main(["--quick", "--models", "SiT-Tiny/2", "--configs", "compile+fusedloss,baseline", "--loss_shapes", "2x16x64",
            "--micro_batch", "4", "--batch", "8", "--record", "--csv", str(csv_path), "--results", str(md)])
    out = capsys.readouterr().out
    assert "MFU ceiling" in out and "beyond FLOPs" in out and "predicted best configuration compile+fusedloss" in out
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["model"], r["config"]) for r in rows] == [
        ("SiT-Tiny/2", "compile+fusedloss"), ("SiT-Tiny/2", "baseline"), ("alignment-loss 2x16x64", "eager"),
        ("alignment-loss 2x16x64", "compile"), ("alignment-loss 2x16x64", "fused")]
    assert all(r["device_model"] == "h200" and r["commit"] and "-m perf.roofline" in r["command"] for r in rows)
    text = md.read_text()
    assert "kept" in text and "<!-- roofline:begin -->" in text and "Prediction, not a measurement" in text
    R.main(["--quick", "--models", "SiT-Tiny/2", "--configs", "eager", "--loss_shapes", "", "--micro_batch", "4",
            "--batch", "8", "--record", "--csv", str(csv_path), "--results", str(md)])
    assert md.read_text().count("<!-- roofline:begin -->") == 1  # the block is rewritten, not appended


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="unknown --device"):
        R.main(["--device", "tpu"])
    with pytest.raises(SystemExit, match="must be a positive divisor"):
        R.trace_step("SiT-Tiny/2", "eager", 8, R.DEVICES["h200"], micro_batch=3, quick=True)
