"""Test session setup: Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET is read when triton is first imported, so it must be set before any
test module (or irepa.kernels) imports it; per-file settings come too late once another
module has imported triton in compiled mode.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
