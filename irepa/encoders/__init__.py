"""Frozen vision encoders that give REPA / iREPA their alignment targets.

    enc = irepa.encoders.build("dinov2-vit-b", device="cuda")   # bf16 on GPU
    y = enc(images)           # images [B, 3, H, W] in [0, 1] -> [B, (H/16)*(W/16), enc.dim]

`names()` lists every encoder (the paper's 36, the C-RADIO family, HOG, SIFT, VGG16
pool4), `info(name)` its width, input resolution and whether its weights are on this
machine. Weights are read from local files only (see `base.resolve_weights`);
`build(name, tiny=True)` gives a randomly initialised small model of the same
architecture for tests.
"""
from __future__ import annotations

import torch

from .base import Encoder, env_key, resolve_weights
from .registry import REGISTRY, EncoderSpec, get_spec

__all__ = ["Encoder", "EncoderSpec", "build", "names", "info", "infos", "get_spec"]


def names() -> list[str]:
    return list(REGISTRY)


def _build_module(spec: EncoderSpec, tiny: bool, weights) -> Encoder:
    if spec.family == "hog":
        from .classical import HOG
        return HOG(spec.name)
    if spec.family == "sift":
        from .classical import DenseSIFT
        return DenseSIFT(spec.name)
    if spec.family == "vgg16":
        from .classical import build_vgg16
        return build_vgg16(spec.name, tiny=tiny, weights=weights)
    if spec.family in ("mocov3", "pe"):
        from .vit import build_own_vit
        return build_own_vit(spec, tiny=tiny, weights=weights)
    if spec.family == "radio":
        from .radio import build_radio
        return build_radio(spec, tiny=tiny, weights=weights)
    from .hf import build_hf
    return build_hf(spec, tiny=tiny, weights=weights)


def build(name: str, *, tiny: bool = False, weights=None, device: str | torch.device | None = None,
          dtype: torch.dtype | None = None, compile: bool = False) -> Encoder:
    """Build a frozen encoder in eval mode.

    tiny: random-init small variant of the same architecture (tests; no weights needed).
    weights: explicit file or Hugging Face folder; otherwise looked up locally (env
      IREPA_ENCODER_<NAME>, $IREPA_ENCODER_DIR, the HF cache, the torch hub cache).
    device / dtype: dtype defaults to bf16 on CUDA and fp32 elsewhere (whatever the
      checkpoint holds); weight-free encoders compute in fp32 whatever the dtype.
    compile: wrap the token computation in torch.compile.
    """
    spec = get_spec(name)
    enc = _build_module(spec, tiny, weights)
    if device is not None:
        enc = enc.to(device)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    if spec.family not in ("hog", "sift"):
        enc = enc.to(dtype)
    enc.freeze()
    if compile:
        enc.tokens = torch.compile(enc.tokens)
    return enc


def info(name: str) -> dict:
    """Width, resolution at 256 px, weight location and presence for one encoder."""
    spec = get_spec(name)
    path = resolve_weights(spec.name, hf_repo=spec.source if "/" in (spec.source or "") else None,
                           filename=None if "/" in (spec.source or "") else spec.source,
                           must_exist=False) if spec.needs_weights else None
    return {
        "name": spec.name, "family": spec.family, "dim": spec.dim, "patch": spec.patch,
        "resolution": spec.resolution, "tokens_at_256": 256, "source": spec.source,
        "needs_weights": spec.needs_weights,
        "weights_present": (path is not None) if spec.needs_weights else True,
        "weights_path": str(path) if path is not None else None,
        "override_env": env_key(spec.name), "note": spec.note,
    }


def infos() -> list[dict]:
    return [info(n) for n in names()]
