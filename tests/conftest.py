"""Test session setup: where the Triton kernel tests run, decided once per session.

IREPA_KERNEL_TEST_DEVICE picks the device of tests/test_kernel_*.py: "cpu" runs the
kernels under the Triton interpreter on CPU tensors, "cuda" runs the compiled kernels on
CUDA tensors. Unset, it is "cuda" when torch sees a GPU (and TRITON_INTERPRET=1 was not
asked for), else "cpu". The choice is written back to the environment for the test files.

TRITON_INTERPRET is read when triton is first imported, so it must be set before any
test module (or irepa.kernels) imports it; per-file settings come too late once another
module has imported triton in compiled mode. It is set for "cpu" only: on "cuda" the
whole session uses compiled kernels (CPU tensors elsewhere then take the eager references).

perf/ is a package of the checkout, not of the install: its tests import it from the root, put
last on sys.path so the installed (or, on the device machine, linked) irepa still comes first.
"""
import os
import sys
from pathlib import Path

import pytest
import torch  # does not import triton

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

_DEVICES = ("cpu", "cuda")
_asked = os.environ.get("IREPA_KERNEL_TEST_DEVICE", "").strip().lower()
_interpret_asked = os.environ.get("TRITON_INTERPRET", "0") == "1"
_has_cuda = torch.cuda.is_available()
_usage_error = None

if _asked and _asked not in _DEVICES:
    _usage_error = f"IREPA_KERNEL_TEST_DEVICE={_asked!r}: expected one of {', '.join(_DEVICES)}"
elif _asked == "cuda" and not _has_cuda:
    _usage_error = (f"IREPA_KERNEL_TEST_DEVICE=cuda but no CUDA device: torch {torch.__version__} "
                    "says torch.cuda.is_available() is False; unset it (or set it to cpu) to test the "
                    "kernels under the Triton interpreter on CPU tensors")
elif _asked == "cuda" and _interpret_asked:
    _usage_error = ("IREPA_KERNEL_TEST_DEVICE=cuda tests the compiled kernels, but TRITON_INTERPRET=1 is set; "
                    "unset one of them")

KERNEL_TEST_DEVICE = _asked or ("cuda" if _has_cuda and not _interpret_asked else "cpu")
os.environ["IREPA_KERNEL_TEST_DEVICE"] = KERNEL_TEST_DEVICE
if KERNEL_TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    if _usage_error is not None:
        raise pytest.UsageError(_usage_error)


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return (f"irepa kernel tests: device {KERNEL_TEST_DEVICE}, "
            f"Triton {'interpreter' if interp else 'compiled kernels'} (IREPA_KERNEL_TEST_DEVICE=cpu|cuda)")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One data.cache_dir for the whole session: each built-in digits variant is prepared once."""
    return str(tmp_path_factory.mktemp("digits-cache"))


@pytest.fixture
def one_thread():
    """Tiny ops: intra-op threads only add spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
