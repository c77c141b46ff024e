"""Recording a step's aten ops on fake tensors: which code made each op (Tagger: module path and
function tag, forward and backward), its FLOPs and the bytes it reads and writes (Recorder)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from irepa.train.step import UPDATE

TAG_KEY = "roofline_tag"


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
