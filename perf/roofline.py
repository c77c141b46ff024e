"""Roofline model of one training step, on paper: FLOPs and bytes per op class, predicted time and MFU ceiling.

    python perf/roofline.py                                  # SiT-XL/2 and JiT-B/16 + iREPA, batch 256, H200
    python perf/roofline.py --models SiT-XL/2 --device h100-sxm --micro_batch 128
    python perf/roofline.py --device h200,h100-sxm --record  # also perf/results/roofline.csv + RESULTS.md
    python perf/suite_report.py --update                     # then the targets table shows the predictions

What is counted. The training step of perf/bench_step.py's case, built by the trainer's own
assembly (irepa.train.assemble.build_run) and run by the trainer's own step (one optimizer
step of the batch, micro-batches as the trainer's planner picks them for the device's
memory), on fake tensors (no memory, no arithmetic: SiT-XL/2 at batch 256 in about a minute
on one CPU core) under a TorchDispatchMode that sees every aten op the GPU would run: the
recipe's draws, the forward and backward of our model, projector and losses, gradient
clipping, AdamW (fused), EMA, and for the reference-style baseline its online encoder and
loss scaling.
CUDA's autocast policy (ATen's lists: matmuls in bf16/fp16, layer/RMS norms, pow, sum,
softmax, upsampling in fp32) is applied by a TorchFunctionMode, so the dtypes and casts,
and so the bytes, are those of a CUDA run, not of CPU autocast. Per op:
  FLOPs  matmul-class only (GEMMs, convolutions, attention; torch.utils.flop_counter's
         formulas; flash attention's backward includes its recompute of QK^T). Other ops
         run at < 3 FLOP per byte, far under the ~20 FLOP/byte ridge of the CUDA cores, so
         their time is their bytes.
  bytes  each input read once and each output written once (views and allocations move
         nothing; in-place ops write what they mutate). The fused Triton ops are counted
         with the traffic their docstrings design (the alignment forward reads y twice).
Op classes: GEMM, attention, norms+modulation (LayerNorm/RMSNorm and the adaLN shift and
scale, fused or not), elementwise (activations, residuals and gates, casts, RoPE, the
denoising loss, noise), alignment loss (spatial norm + cosine, forward and backward),
optimizer+EMA (gradient accumulation over micro-batches, clipping, AdamW, EMA, loss-scale
unscaling) and online encoder (the baseline's frozen ViT, all of its ops). Backward ops
take the class of the forward code that made their autograd node.

Time model. A GPU runs the step's kernels one after another, and inside one kernel the
memory traffic and the arithmetic overlap, so the step takes
    sum over kernels of max(FLOPs / matmul rate, bytes / bandwidth)
(not max(total FLOPs / rate, total bytes / bandwidth), which would assume overlap
across kernels, nor the plain sum, which would deny it inside a GEMM). Launch gaps and
sub-peak GEMM shapes are left out: the result is a ceiling, and the gap between it and a
measurement is what tuning can still win.

Which ops are kernels depends on the configuration:
  eager     every aten op is a kernel.
  compiled  the ops of one compiled graph (per block for `train.compile`, the whole
            network for the baseline's whole-model compile; forward and backward are
            separate graphs) that are neither GEMMs nor attention nor our Triton ops fuse:
            a pointwise or reduction op joins the region of an op it reads from (or that
            reads the same tensor) when everything else it reads was ready before that
            region began, so the region can run as one kernel. A region reads each outside
            tensor once and writes only what outside ops read later (saved activations
            included: the partitioner's recomputation is not modelled). This is ideal
            fusion: Inductor splits some of these regions (reductions over different axes),
            so measured compiled steps move more bytes than this.
Configurations (as perf/bench_step.py): eager; compile (per-block compile); compile+fusedloss
(+ the fused alignment loss; adaLN left to Inductor); compile+fused (+ fused adaLN too, the
trainer's CUDA default; the Triton op is opaque to Inductor, so the residual add and gate
around it cannot fuse with it); baseline
(reference style: whole-model compile, SDPA, fp16 autocast + dynamic loss scaling, MLP
projector, a ViT-B/14-sized encoder run online each step, in bf16 as the trainer runs it).

MFU = useful FLOPs (irepa.train.flops: model + projector, forward + backward, what
bench_step counts) / (predicted step time x the dense bf16 peak, 989 TFLOP/s on an
H100 SXM or H200); the measured matmul rate (~790) caps it at about 80% even for a step
of pure GEMMs. 'Beyond FLOPs' is a class's predicted time minus its FLOPs at the matmul
rate: the time fusion or a better kernel can remove; the three largest are printed.

Devices: h200 (measured on this workplace's H200: 790 TFLOP/s bf16 matmul, 4.3 TB/s
device-to-device copy; nominal 4.8 TB/s), h100-sxm (3.35 TB/s nominal, no measurement;
matmul rate taken as the H200's, same chip and clocks). --matmul_tflops, --bandwidth_tbs
and --memory_gib override.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import re
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_step  # noqa: E402,F401  (finds irepa: installed, linked by gpu_suite.sh, or this checkout)

from irepa.align import alignment_loss  # noqa: E402
from irepa.train.assemble import build_run  # noqa: E402
from irepa.train.build import DataBundle  # noqa: E402
from irepa.train.step import UPDATE  # noqa: E402

aten = torch.ops.aten


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
    "h100-sxm": Device("NVIDIA H100 80GB HBM3", 989.0, 790.0, 3.35, 79.1,
                       "HBM 3.35 TB/s nominal (not measured here); matmul rate taken as the H200's "
                       "measured 790 TFLOP/s (same chip and clocks)"),
}

CLASSES = ("GEMM", "attention", "norms+modulation", "elementwise", "alignment loss", "optimizer+EMA",
           "online encoder")
CONFIGS = ("eager", "compile", "compile+fusedloss", "compile+fused", "baseline")
TAG_KEY = "roofline_tag"

# ---- CUDA autocast, emulated on CPU fake tensors --------------------------------------------
# ATen's CUDA lists (ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE), by the Python name of the function that reaches them.
_LOWER = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
          "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "mv", "einsum",
          "scaled_dot_product_attention", "prelu", "linalg_vecdot", "chain_matmul"}
_FP32 = {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
         "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "rms_norm", "group_norm",
         "cosine_similarity", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "nll_loss",
         "binary_cross_entropy_with_logits", "cdist", "dist", "pdist", "renorm", "logsumexp", "interpolate"}
_FP32_OPT_DTYPE = {"sum", "prod", "softmax", "log_softmax", "cumsum", "cumprod", "vector_norm", "matrix_norm"}
_LOW = (torch.float16, torch.bfloat16)


class CudaAutocast(TorchFunctionMode):
    """torch.autocast("cuda", dtype) on any device: casts arguments as CUDA autocast would.

    Lower-precision ops get their floating arguments in `dtype`; casts of leaf tensors that
    require grad (the parameters) are cached for the life of this context, as autocast's
    weight-cast cache is (one cast per parameter per forward). fp32 ops get fp32 arguments;
    sum / softmax / ... of a low-precision input run with dtype=float32.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cast(self, t, dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        if dtype != torch.float32 and t.dtype == torch.float64:
            return t
        if t.is_leaf and t.requires_grad and torch.is_grad_enabled():
            hit = self.cache.get(id(t))
            if hit is None or hit[0] is not t:
                hit = self.cache[id(t)] = (t, t.to(dtype))
            return hit[1]
        return t.to(dtype)

    def _cast_all(self, args, kwargs, dtype):
        def one(a):
            if isinstance(a, (list, tuple)):
                return type(a)(one(x) for x in a)
            return self._cast(a, dtype)
        return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _LOWER:
            args, kwargs = self._cast_all(args, kwargs, self.dtype)
        elif name in _FP32:
            if name == "interpolate" or any(isinstance(a, torch.Tensor) and a.dtype in _LOW for a in args):
                args, kwargs = self._cast_all(args, kwargs, torch.float32)
        elif name in _FP32_OPT_DTYPE and args and isinstance(args[0], torch.Tensor) and args[0].dtype in _LOW \
                and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)


# ---- tagging: which code made an op (forward) or its autograd node (backward) ---------------

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class Tagger:
    """A stack of (module path, function tag) during the forward. When a tagged module or
    function returns, every autograd node it created (walked back from its outputs to its
    inputs) that has no tag yet gets its tag, innermost first, so its backward ops can be
    attributed too (torch._C._current_autograd_node() while the engine runs a node)."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.stack: list[tuple[str, str]] = []
        self._walk = 0

    def current(self) -> str:
        if not self.stack:
            return ""
        path, fn = self.stack[-1]
        return f"{path}::{fn}" if fn else path

    def _tag_graph(self, outputs, inputs, tag):
        self._walk += 1
        stop = {id(t.grad_fn) for t in _tensors(inputs) if t.grad_fn is not None}
        todo = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or id(node) in stop or node.metadata.get("_walk") == self._walk:
                continue
            node.metadata["_walk"] = self._walk
            if type(node).__name__ == "AccumulateGrad":
                continue
            node.metadata.setdefault(TAG_KEY, tag)
            todo.extend(f for f, _ in node.next_functions)

    def pre_hook(self, module, args):
        path = self.names.get(id(module))
        if path is not None:
            self.stack.append((path, self.names.get(("fn", id(module)), "")))

    def post_hook(self, module, args, kwargs, out):
        if self.names.get(id(module)) is not None:
            tag = self.current()
            self.stack.pop()
            self._tag_graph(out, (args, kwargs), tag)

    def wrap(self, fn, tag: str):
        """fn, with its ops and autograd nodes tagged `tag` inside the current module."""
        def tagged(*args, **kwargs):
            path = self.stack[-1][0] if self.stack else ""
            self.stack.append((path, tag))
            try:
                out = fn(*args, **kwargs)
            finally:
                full = self.current()
                self.stack.pop()
            self._tag_graph(out, (args, kwargs), full)
            return out
        return tagged

    @contextlib.contextmanager
    def hooks(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        h1 = register_module_forward_pre_hook(self.pre_hook)
        h2 = register_module_forward_hook(self.post_hook, with_kwargs=True, always_call=True)
        try:
            yield
        finally:
            h1.remove()
            h2.remove()


# ---- recording ops -----------------------------------------------------------------------------

@dataclass
class Op:
    name: str
    tag: str
    phase: str
    """fwd | bwd | update | accum (AccumulateGrad in the backward)"""
    flops: float
    useful: float
    reads: list  # [(storage key, bytes, writer index at the time of the read or None)]
    writes: list  # [(storage key, bytes)]
    cls: str = ""
    unit: str | None = None
    fused_bytes: float = 0.0

    @property
    def bytes(self) -> float:
        return float(sum(b for _, b, _ in self.reads) + sum(b for _, b in self.writes))


_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
              "lift_fresh", "lift_fresh_copy", "set_", "_has_compatible_shallow_copy_type", "sym_size",
              "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_record_function_enter_new",
              "_record_function_exit", "device", "detach", "alias", "record_stream", "_unsafe_view"}
_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
               "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "randn", "rand", "randint",
               "randn_like", "rand_like", "arange", "scalar_tensor"}
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "convolution", "_convolution",
         "convolution_backward", "cudnn_convolution", "_slow_conv2d_forward", "_slow_conv2d_backward"}
_NORM_OPS = {"native_layer_norm", "native_layer_norm_backward", "layer_norm", "_fused_rms_norm",
             "_fused_rms_norm_backward", "rms_norm", "adaln_fwd", "adaln_bwd"}


def _touched_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel reads or writes for this tensor (a broadcast dimension is read once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


def _attention_flops(name: str, args, out) -> tuple[float, float]:
    """(executed, useful) FLOPs of an SDPA op of any backend; useful leaves out the backward's recompute."""
    if "backward" in name:
        grad_out, q, k, v = args[:4]
        f = float(sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape))
        return f, f * 4 / 5  # 5 matmuls run, 4 are the gradient (the first recomputes QK^T)
    q, k, v = args[:3]
    f = float(sdpa_flop_count(q.shape, k.shape, v.shape))
    return f, f


class Recorder(TorchDispatchMode):
    """Records every kernel-launching aten op: FLOPs, bytes read and written (by storage),
    the tag of the code that ran it and the phase. The update phase is what runs inside the
    train step's profiler range irepa.train.step.UPDATE (unscale, clipping, optimizer, EMA).
    A host read of a fake tensor (.item()) has no value: it is answered 0, which is the loss
    scaler's "no overflow" (the steady-state step)."""

    def __init__(self, tagger: Tagger):
        super().__init__()
        self.tagger = tagger
        self.ops: list[Op] = []
        self.last_writer: dict[int, int] = {}
        self._keep: list = []  # storages stay alive, so their keys are never reused
        self._ranges: list[str] = []  # the open profiler ranges (record_function), innermost last

    def _key(self, t: torch.Tensor) -> int:
        st = t.untyped_storage()
        self._keep.append(st)
        return st._cdata

    def _track_range(self, name: str, args) -> None:
        if name == "_record_function_enter_new":
            self._ranges.append(args[0])
        elif name == "_record_function_exit" and self._ranges:
            self._ranges.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense":
            return 0
        out = func(*args, **kwargs)
        if func.namespace == "profiler":
            self._track_range(name, args)
            return out
        if name in _NO_KERNEL or func.is_view or func.namespace == "prim":
            return out
        node = torch._C._current_autograd_node()
        if UPDATE in self._ranges:
            phase, tag = "update", ""
        elif node is not None:
            phase = "accum" if type(node).__name__ == "AccumulateGrad" else "bwd"
            tag = node.metadata.get(TAG_KEY, "")
        else:
            phase, tag = "fwd", self.tagger.current()
        schema = func._schema
        mutated = []
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                v = args[i] if i < len(args) else kwargs.get(a.name)
                mutated.extend(_tensors(v))
        if name in ("_fused_adamw_", "_fused_adam_"):  # the grads are read, not written
            mutated = list(_tensors(args[0])) + list(_tensors(args[2])) + list(_tensors(args[3]))
        write_only = name in _WRITE_ONLY
        reads, seen = [], set()
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        if name == "copy_":
            inputs = inputs[1:]
        elif write_only:
            inputs = []
        if name == "alignment_loss_fwd" and args[2] is not None:
            inputs.append(args[1])  # the spatial-norm statistics read y once more (kernels/alignment.py)
        for t in inputs:
            key = self._key(t)
            if (key, id(t)) in seen:
                continue
            seen.add((key, id(t)))
            reads.append((key, _touched_bytes(t), self.last_writer.get(key)))
        writes = [(self._key(t), _touched_bytes(t)) for t in mutated]
        if not schema.is_mutable or name in ("copy_",):
            writes += [(self._key(t), _touched_bytes(t)) for t in _tensors(out)]
        writes = list({k: (k, b) for k, b in writes}.values())
        packet = func.overloadpacket
        if _is_attention(name):
            flops, useful = _attention_flops(name, args, out)
        elif packet in flop_registry:
            flops = useful = float(flop_registry[packet](*args, **kwargs, out_val=out))
        else:
            flops = useful = 0.0
        index = len(self.ops)
        self.ops.append(Op(name, tag, phase, flops, useful, reads, writes))
        for key, _ in writes:
            self.last_writer[key] = index
        return out


# ---- classes, compile units, fusion ------------------------------------------------------------

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


# ---- the step on fake tensors (perf/bench_step.py's case, built and stepped as the trainer does) -----

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
    from bench_step import FULL, QUICK, StandInViT, case_config

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


# ---- cost -----------------------------------------------------------------------------------------

SCOPES = {"eager": None, "compile": "blocks", "compile+fusedloss": "blocks", "compile+fused": "blocks",
          "baseline": "net"}


@dataclass
class Cost:
    flops: dict
    bytes: dict
    t_compute: dict  # s, FLOPs at the matmul rate
    t_memory: dict  # s, bytes at the bandwidth
    t_pred: dict  # s, sum over kernels of max(...)
    kernels: int
    total_s: float
    useful_flops: float
    mfu: float
    img_per_s: float


def cost(trace: Trace, device: Device, scope: str | None = "default") -> Cost:
    """Per-class FLOPs, bytes and times of a trace; scope 'default' is the config's own compile scope."""
    if scope == "default":
        scope = SCOPES[trace.config]
    ops = trace.ops
    for op in ops:
        op.cls = classify(op)
        op.unit = compile_unit(op, scope)
    regions = 0
    if scope is None:
        for op in ops:
            op.fused_bytes = op.bytes
    else:
        regions = fuse(ops)
    rate, bw = device.matmul_tflops * 1e12, device.bandwidth_tbs * 1e12
    z = {c: 0.0 for c in CLASSES}
    flops, nbytes, tc, tm, tp = dict(z), dict(z), dict(z), dict(z), dict(z)
    kernels = regions
    for op in ops:
        c = op.cls
        flops[c] += op.flops
        nbytes[c] += op.fused_bytes
        tc[c] += op.flops / rate
        tm[c] += op.fused_bytes / bw
        tp[c] += max(op.flops / rate, op.fused_bytes / bw)
        kernels += 0 if _fusible(op) else 1
    total = sum(tp.values())
    peak = device.peak_tflops * 1e12
    return Cost(flops, nbytes, tc, tm, tp, kernels, total, trace.useful_flops, trace.useful_flops / (total * peak),
                trace.batch / total)


def beyond_flops(c: Cost) -> list[tuple[str, float]]:
    """Classes by predicted time minus their FLOPs at the matmul rate, largest first."""
    return sorted(((k, c.t_pred[k] - c.t_compute[k]) for k in CLASSES), key=lambda kv: -kv[1])


def format_cost(trace: Trace, c: Cost, device: Device) -> str:
    lines = [f"{trace.model} + iREPA, {trace.config}, batch {trace.batch} ({trace.plan}), {device.name}: "
             f"{device.matmul_tflops:.0f} TFLOP/s matmul, {device.bandwidth_tbs} TB/s",
             f"  {'class':18s} {'TFLOP':>9s} {'GB':>9s} {'compute ms':>11s} {'memory ms':>10s} {'pred ms':>9s} "
             f"{'beyond ms':>10s}"]
    for k in CLASSES:
        if c.t_pred[k] == 0 and c.bytes[k] == 0:
            continue
        lines.append(f"  {k:18s} {c.flops[k] / 1e12:9.2f} {c.bytes[k] / 1e9:9.2f} {1e3 * c.t_compute[k]:11.2f} "
                     f"{1e3 * c.t_memory[k]:10.2f} {1e3 * c.t_pred[k]:9.2f} {1e3 * (c.t_pred[k] - c.t_compute[k]):10.2f}")
    lines.append(f"  {'total':18s} {sum(c.flops.values()) / 1e12:9.2f} {sum(c.bytes.values()) / 1e9:9.2f} "
                 f"{1e3 * sum(c.t_compute.values()):11.2f} {1e3 * sum(c.t_memory.values()):10.2f} "
                 f"{1e3 * c.total_s:9.2f} {1e3 * (c.total_s - sum(c.t_compute.values())):10.2f}")
    top = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in beyond_flops(c)[:3])
    lines.append(f"  predicted: {1e3 * c.total_s:.1f} ms/step, {c.img_per_s:.0f} img/s, MFU ceiling "
                 f"{100 * c.mfu:.1f}% (useful {c.useful_flops / 1e12:.1f} TFLOP/step, {c.kernels} kernels); "
                 f"beyond FLOPs: {top}")
    return "\n".join(lines)


# ---- the alignment loss alone -------------------------------------------------------------------

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


def alignment_prediction(B: int, T: int, E: int, device: Device) -> dict:
    """Predicted fwd+bwd ms per provider; compile = ideal fusion of the reference (fwd and bwd graphs)."""
    out = {}
    for provider in ("eager", "compile", "fused"):
        ops = trace_alignment(B, T, E, "fused" if provider == "fused" else "eager")
        for op in ops:
            op.cls = classify(op)
            op.unit = "loss" if provider == "compile" else None
        regions = 0
        if provider == "compile":
            regions = fuse(ops)
        else:
            for op in ops:
                op.fused_bytes = op.bytes
        nbytes = sum(op.fused_bytes for op in ops)
        out[provider] = dict(bytes=nbytes, ms=1e3 * nbytes / (device.bandwidth_tbs * 1e12),
                             kernels=regions + sum(1 for op in ops if not _fusible(op)))
    return out


# ---- recording in perf/results and RESULTS.md -----------------------------------------------

FIELDS = ["date", "commit", "device_model", "model", "config", "batch", "micro_batch", "matmul_tflops",
          "bandwidth_tbs", "pred_ms", "pred_img_per_s", "pred_mfu", "pred_tflops", "kernels", "top_beyond_flops",
          "command"] + [f"{k}_{m}" for k in CLASSES for m in ("tflop", "gb", "ms")]
BEGIN, END = "<!-- roofline:begin -->", "<!-- roofline:end -->"


def _commit() -> str:
    from bench_step import _commit as commit
    return commit()


def row(trace: Trace, c: Cost, dev_key: str, device: Device, command: str, date: str, commit: str) -> dict:
    r = dict(date=date, commit=commit, device_model=dev_key, model=trace.model, config=trace.config,
             batch=trace.batch, micro_batch=trace.micro_batch, matmul_tflops=device.matmul_tflops,
             bandwidth_tbs=device.bandwidth_tbs, pred_ms=f"{1e3 * c.total_s:.2f}", pred_img_per_s=f"{c.img_per_s:.1f}",
             pred_mfu=f"{c.mfu:.3f}", pred_tflops=f"{c.useful_flops / c.total_s / 1e12:.1f}", kernels=c.kernels,
             top_beyond_flops="; ".join(f"{k} {1e3 * v:.1f} ms" for k, v in beyond_flops(c)[:3]), command=command)
    for k in CLASSES:
        r[f"{k}_tflop"] = f"{c.flops[k] / 1e12:.3f}"
        r[f"{k}_gb"] = f"{c.bytes[k] / 1e9:.3f}"
        r[f"{k}_ms"] = f"{1e3 * c.t_pred[k]:.3f}"
    return r


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            if next(csv.reader(f), None) != FIELDS:
                raise SystemExit(f"{path}: columns differ from this script's; move it aside first")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def load_predictions(path: Path = HERE / "results" / "roofline.csv") -> dict:
    """Newest prediction per (device_model, model, config): what the GPU suite puts beside its figures."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {(r["device_model"], r["model"], r["config"]): r for r in csv.DictReader(f)}


def render(path: Path) -> str:
    preds = load_predictions(path)
    steps = [r for r in preds.values() if not r["model"].startswith("alignment-loss")]
    losses = [r for r in preds.values() if r["model"].startswith("alignment-loss")]
    cols = ["device_model", "model", "config", "batch", "micro_batch", "pred_ms", "pred_img_per_s", "pred_mfu",
            "kernels", "top_beyond_flops", "commit", "date", "command"]
    lines = ["**Prediction, not a measurement.** One training step per row (see `perf/roofline.py` for the model):",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in steps:
        lines.append("| " + " | ".join(f"`{r[c]}`" if c == "command" else str(r[c]) for c in cols) + " |")
    cls_cols = ["device_model", "model", "config"] + [f"{k} ms" for k in CLASSES]
    lines += ["", "Predicted time per op class (ms per step, after fusion where the configuration compiles):", "",
              "| " + " | ".join(cls_cols) + " |", "|" + "---|" * len(cls_cols)]
    for r in steps:
        lines.append("| " + " | ".join([r["device_model"], r["model"], r["config"]] +
                                       [r[f"{k}_ms"] for k in CLASSES]) + " |")
    if losses:
        lines += ["", "Alignment loss alone, fwd + bwd, bf16 (compile = ideal fusion of the eager reference):", "",
                  "| device_model | shape | provider | pred_ms | GB moved | kernels | commit |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['device_model']} | {r['model'].split()[-1]} | {r['config']} | {r['pred_ms']} | "
                  f"{r['alignment loss_gb']} | {r['kernels']} | {r['commit']} |" for r in losses]
    return "\n".join(lines)


def update_results(md: Path, csv_path: Path) -> None:
    text = md.read_text() if md.is_file() else ""
    block = f"{BEGIN}\n{render(csv_path)}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Roofline prediction (perf/roofline.py)\n\n" + block + "\n"
    md.write_text(text)


def predict_device(a, key: str, dev: Device, command: str, date: str, commit: str) -> list[dict]:
    """Print and return the rows of one device model: each model x configuration, then the loss alone."""
    rows = []
    for name in [m for m in a.models.split(",") if m]:
        costs = {}
        for config in [c for c in a.configs.split(",") if c]:
            tr = trace_step(name, config, a.batch, dev, a.micro_batch, a.quick)
            c = costs[config] = cost(tr, dev)
            print(format_cost(tr, c, dev), flush=True)
            rows.append(row(tr, c, key, dev, command, date, commit))
        ours = {k: v for k, v in costs.items() if k != "baseline"}
        if ours:
            best = max(ours, key=lambda k: ours[k].img_per_s)
            ratio = (f", {costs[best].img_per_s / costs['baseline'].img_per_s:.2f}x the baseline"
                     if "baseline" in costs else "")
            print(f"{name}: predicted best configuration {best}: {costs[best].img_per_s:.0f} img/s, MFU "
                  f"{100 * costs[best].mfu:.1f}%{ratio}")
    for shape in [s for s in a.loss_shapes.split(",") if s]:
        B, T, E = (int(v) for v in shape.lower().split("x"))
        pr = alignment_prediction(B, T, E, dev)
        for provider, v in pr.items():
            rows.append(dict(date=date, commit=commit, device_model=key, model=f"alignment-loss {B}x{T}x{E}",
                             config=provider, batch=B, matmul_tflops=dev.matmul_tflops,
                             bandwidth_tbs=dev.bandwidth_tbs, pred_ms=f"{v['ms']:.4f}", kernels=v["kernels"],
                             command=command, **{"alignment loss_gb": f"{v['bytes'] / 1e9:.3f}",
                                                 "alignment loss_ms": f"{v['ms']:.4f}"}))
        n_min = 3 * B * T * E * 2  # read z, y, write dz (bf16): what any implementation must move
        print(f"alignment loss B={B} T={T} E={E} bf16, fwd+bwd at {dev.bandwidth_tbs} TB/s: " + ", ".join(
            f"{k} {v['ms']:.3f} ms ({v['bytes'] / n_min:.1f}x the minimum bytes, {v['kernels']} kernels)"
            for k, v in pr.items()) + f"; fused vs compile {pr['compile']['ms'] / pr['fused']['ms']:.2f}x, "
              f"vs eager {pr['eager']['ms'] / pr['fused']['ms']:.2f}x")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="SiT-XL/2,JiT-B/16")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--device", default="h200", help=f"device model(s), a comma list of: {', '.join(DEVICES)}")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--micro_batch", type=int, default=None, help="default: the trainer's planner for the device")
    p.add_argument("--matmul_tflops", type=float, default=None)
    p.add_argument("--bandwidth_tbs", type=float, default=None)
    p.add_argument("--memory_gib", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="bench_step's tiny models (a flow check)")
    p.add_argument("--loss_shapes", default="256x256x768,256x256x1024",
                   help="BxTxE list for the alignment-loss prediction ('' to skip)")
    p.add_argument("--record", action="store_true",
                   help="append rows to perf/results/roofline.csv and rewrite the roofline table in perf/RESULTS.md")
    p.add_argument("--csv", type=Path, default=HERE / "results" / "roofline.csv")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    a = p.parse_args(argv)
    keys = [d for d in a.device.split(",") if d]
    bad = [d for d in keys if d not in DEVICES]
    if bad or not keys:
        raise SystemExit(f"unknown --device {a.device!r}; choose from {list(DEVICES)} (a comma list runs each)")
    over = {k: v for k, v in dict(matmul_tflops=a.matmul_tflops, bandwidth_tbs=a.bandwidth_tbs,
                                   memory_gib=a.memory_gib).items() if v is not None}
    command = "python " + " ".join(shlex.quote(x) for x in ["perf/roofline.py", *(argv if argv is not None else sys.argv[1:])])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = _commit()
    rows = []
    for key in keys:
        dev = DEVICES[key]
        if over:
            dev = Device(**{**dev.__dict__, **over, "source": dev.source + f"; overridden: {over}"})
        print(f"device model {key}: {dev.source}")
        rows += predict_device(a, key, dev, command, date, commit)
    if a.record and rows:
        write_csv(a.csv, rows)
        update_results(a.results, a.csv)
        print(f"{len(rows)} rows -> {a.csv}, {a.results}")


if __name__ == "__main__":
    main()
