"""CUDA's autocast policy applied on any device (CPU fake tensors), so the roofline counts the
dtypes, casts and bytes of a CUDA run."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

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
