"""The step on fake tensors: perf/bench_step.py's case, built by the trainer's assembly
(irepa.train.assemble.build_run) and stepped by its own step, recorded op by op; and the
alignment loss alone."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from irepa.align import alignment_loss
from irepa.train.assemble import build_run
from irepa.train.build import DataBundle
from perf.roofline.autocast import CudaAutocast
from perf.roofline.hardware import Device
from perf.roofline.record import Op, Recorder, Tagger

CONFIGS = ("eager", "compile", "compile+fusedloss", "compile+fused", "baseline")


@dataclass
class Trace:
    model: str
    config: str
    batch: int
    micro_batch: int
    ops: list[Op]
    useful_flops: float
    """irepa.train.flops: model + projector, forward + backward, for the whole batch"""
    plan: str = ""
    params: int = 0


def _fused_adaln(x, shift, scale, eps: float = 1e-6):
    from irepa.kernels import adaln as K
    return K._adaln_fwd_op(x, shift, scale, float(eps))[0]


def _fused_loss(z, y, gamma=None):
    from irepa.kernels import alignment as K
    need_grad = torch.is_grad_enabled() and z.requires_grad
    return K._alignment_fwd_op(z, y, None if gamma is None else float(gamma), need_grad)[0]


def _module_names(net: nn.Module, encoder: nn.Module | None) -> dict:
    names: dict = {}
    for n, m in net.named_modules():
        names[id(m)] = "net" + (f".{n}" if n else "")
        if type(m).__name__ in ("RMSNorm", "LayerNorm"):
            names[("fn", id(m))] = "norm"
    if encoder is not None:
        for n, m in encoder.named_modules():
            names[id(m)] = "encoder" + (f".{n}" if n else "")
    return names


def trace_step(name: str, config: str, batch: int, device: Device, micro_batch: int | None = None,
               quick: bool = False) -> Trace:
    """One optimizer step of bench_step's `config` at `batch`, on fake CPU tensors, recorded: the run
    irepa.train.assemble.build_run makes of bench_step's case config, its own step, after one untraced
    step (so the optimizer state exists, as in a steady-state step).

    The build differs from a CUDA run only where CPU fake tensors need it: CUDA's autocast policy
    (CudaAutocast) for the step, the planner and the online encoder; fused AdamW; no compile (the
    compile scope is the cost model's, `cost`); the fused Triton ops called as the custom ops CUDA
    would run (on CPU tensors they fall back to the references). micro_batch None: the trainer's
    planner on 90% of `device.memory_gib`, as bench_step's `--micro_batch auto` does on that card."""
    from perf.bench_step import FULL, QUICK, StandInViT, case_config

    table = QUICK if quick else FULL
    if name not in table:
        raise SystemExit(f"unknown model {name!r}; choose from {list(table)}")
    if config not in CONFIGS:
        raise SystemExit(f"unknown config {config!r}; choose from {CONFIGS}")
    spec = table[name]
    model_kw, _, _, enc_img, enc_patch, (enc_dim, enc_depth, enc_heads) = spec
    baseline = config == "baseline"
    fused_loss, fused_adaln = "fused" in config, config == "compile+fused"
    amp_dtype = torch.float16 if baseline else torch.bfloat16
    # the kernels' choice is made by `instrument` below; the compile scope by `cost`
    cfg = case_config(name, spec, "eager" if not baseline else config, batch,
                      "auto" if micro_batch is None else micro_batch,
                      budget_gib=0.9 * device.memory_gib if micro_batch is None else None, amp_dtype=amp_dtype)
    cfg = replace(cfg, train=replace(cfg.train, compile=False))
    with FakeTensorMode(allow_non_fake_inputs=True):
        encoder = None
        if baseline:
            encoder = StandInViT(enc_img, enc_patch, enc_dim, enc_depth, enc_heads).eval().requires_grad_(False)
        data = DataBundle(loader=None, encoder_dims=[enc_dim], manifest={},
                          online_encoders=[encoder] if encoder is not None else [],
                          encoder_autocast=lambda: CudaAutocast(torch.bfloat16))
        tagger = Tagger({})

        def instrument(net, _):
            tagger.names.update(_module_names(net, encoder))
            _tag_kernels(net, tagger, fused_adaln, fused_loss)

        run = build_run(cfg, data=data, autocast=CudaAutocast, fused_optimizer=True, instrument=instrument)
        C, S = model_kw["in_channels"], model_kw["input_size"]
        tokens = run.model.module.model.num_tokens
        batch_data = {"x": torch.randn(batch, C, S, S), "y": torch.randint(0, model_kw["num_classes"], (batch,))}
        if baseline:
            batch_data["images"] = torch.rand(batch, 3, enc_img, enc_img)
        else:
            batch_data["feats"] = [torch.randn(batch, tokens, enc_dim).to(torch.bfloat16)]
        with tagger.hooks():
            with Recorder(tagger):  # the optimizer state comes to exist in this step
                run.step_fn(batch_data, 0)
            with Recorder(tagger) as rec:
                run.step_fn(batch_data, 1)
    plan = run.memory_plan
    plan_text = plan.describe() if plan is not None else \
        f"micro-batch {run.micro_batch} x {batch // run.micro_batch} (given)"
    n_params = sum(p.numel() for p in run.model.params)
    return Trace(name, config, batch, run.micro_batch, rec.ops, run.flops_per_image * batch, plan_text, n_params)


def _tag_kernels(net: nn.Module, tagger: Tagger, fused_adaln: bool, fused_loss: bool) -> None:
    """The adaLN modulation (SiT's modulate_norm, JiT's modulate) and the alignment loss, tagged; the
    fused configurations' Triton ops called directly (their fake kernels), as on CUDA."""
    for blk in [*net.model.blocks, net.model.final_layer]:
        if hasattr(blk, "modulate_norm"):
            blk.modulate_norm = tagger.wrap(_fused_adaln if fused_adaln else blk.modulate_norm, "norm")
        if hasattr(blk, "modulate"):
            blk.modulate = tagger.wrap(blk.modulate, "norm")
    if net.head is not None:
        net.head.loss_fn = tagger.wrap(_fused_loss if fused_loss else alignment_loss, "align_loss")


def trace_alignment(B: int, T: int, E: int, provider: str, gamma: float = 0.6) -> list[Op]:
    """fwd + bwd of the alignment loss alone (bf16 z, y): eager / compile (the reference) / fused."""
    mode = FakeTensorMode()
    tagger = Tagger({})
    rec = Recorder(tagger)
    with mode:
        z = torch.empty(B, T, E, dtype=torch.bfloat16).requires_grad_()
        y = torch.empty(B, T, E, dtype=torch.bfloat16)
        fn = _fused_loss if provider == "fused" else alignment_loss
        with rec:
            tagger.stack.append(("loss", "align_loss"))
            out = fn(z, y, gamma)
            tagger._tag_graph(out, (z, y), "loss::align_loss")
            tagger.stack.pop()
            out.backward()
    return rec.ops
