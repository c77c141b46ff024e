"""Forward-mode AD (torch.func.jvp, MeanFlow's du/dt) through the models: which paths take it.

What PyTorch 2.13 does under forward AD (each checked in tests/test_forward_ad.py):
- F.scaled_dot_product_attention: only the math backend has a forward-AD formula. The CPU
  flash kernel (the CPU default), CUDA flash, memory-efficient, cuDNN and the overridable
  fused op raise NotImplementedError. flash-attn and xformers have no JVP at all.
- torch.library custom ops without a forward-AD rule (our fused adaLN and alignment loss)
  do not raise: they return the primal and treat the output as constant, i.e. a silently
  wrong (zero) tangent. The public wrappers therefore take their eager references here.
- A block compiled with torch.compile cannot be called from an eager torch.func.jvp
  (dynamo: "Calling torch.func.jvp(compiled_fn) from eager mode is not supported",
  pytorch#128711); the blocks' eager forward is used inside the JVP (irepa.meanflow).

`active(*tensors)` says whether the caller runs under such a transform: inside
`jvp_mode()` (the flag the MeanFlow code sets, and the only test that survives
torch.compile tracing), under any torch.func transform (eager), or with a forward-AD
dual tensor among `tensors`. Under vmap/grad the eager paths are just as correct.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD

_depth = 0
_noted: set[str] = set()


@contextmanager
def jvp_mode():
    """Mark a region that runs under forward-mode AD (nestable)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def active(*tensors: torch.Tensor) -> bool:
    if _depth:
        return True
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return fwAD._current_level >= 0 and any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def note_fallback(what: str, why: str) -> None:
    """One log line per process and fallback (rank 0 only under torchrun)."""
    if what in _noted or torch.compiler.is_compiling():
        return
    _noted.add(what)
    if os.environ.get("RANK", "0") == "0":
        print(f"[irepa] forward-mode AD (JVP): {what} ({why})", file=sys.stderr, flush=True)
