"""Frozen vision encoders that give REPA / iREPA their alignment targets.

    enc = irepa.encoders.build("dinov2-vit-b", device="cuda")   # bf16 on GPU
    y = enc(images)           # images [B, 3, H, W] in [0, 1] -> [B, (H/16)*(W/16), enc.dim]

`names()` lists every encoder (the paper's 36, the C-RADIO family, HOG, SIFT, VGG16
pool4, raw patches, the digits CNN targets trained here, and the variants of registry.VARIANTS);
any of them + "+global" or "+perm" is a control target (controls.py). `info(name)` gives
its width, input resolution and whether its weights are on this machine, `table()` the
preprocessing of each as docs/encoders.md shows it. Each name computes the tokens the official iREPA release computes for
it (registry.py). Weights are read from local files only (see `base.resolve_weights`);
`build(name, tiny=True)` gives a randomly initialised small model of the same
architecture for tests.
"""
from __future__ import annotations

import torch

from .base import Encoder, env_key, resolve_weights
from .controls import CONTROLS
from .registry import POS_RULES, REGISTRY, EncoderSpec, get_spec

__all__ = ["Encoder", "EncoderSpec", "build", "names", "info", "infos", "get_spec", "table", "table_markdown"]


def names() -> list[str]:
    return list(REGISTRY)


def _build_module(spec: EncoderSpec, tiny: bool, weights) -> Encoder:
    if spec.family == "control":
        from .controls import ControlTarget
        return ControlTarget(spec.name, _build_module(get_spec(spec.base), tiny, weights), spec.arch)
    if spec.family == "raw-patch":
        from .classical import RawPatch
        return RawPatch(spec.name)
    if spec.family == "digits-cnn":
        from .digits_cnn import build_digits_cnn
        return build_digits_cnn(spec, tiny=tiny)
    if spec.family == "hog-patch":
        from .classical import HOG
        return HOG(spec.name)
    if spec.family == "hog":
        from .classical import DenseHOG
        return DenseHOG(spec.name)
    if spec.family == "sift":
        from .sift import KorniaSIFT
        return KorniaSIFT(spec.name)
    if spec.family == "sift-upright":
        from .classical import DenseSIFT
        return DenseSIFT(spec.name)
    if spec.family == "vgg16":
        from .classical import build_vgg16
        return build_vgg16(spec, tiny=tiny, weights=weights)
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
    if spec.needs_weights:
        enc = enc.to(dtype)
    enc.freeze()
    if compile:
        enc.tokens = torch.compile(enc.tokens)
    return enc


def info(name: str) -> dict:
    """Width, resolution at 256 px, weight location and presence for one encoder."""
    spec = get_spec(name)
    weighted = get_spec(spec.base) if spec.base else spec  # a control reads its base encoder's weights
    path = resolve_weights(weighted.name, hf_repo=spec.source if "/" in (spec.source or "") else None,
                           filename=None if "/" in (spec.source or "") else spec.source,
                           must_exist=False) if spec.needs_weights else None
    return {
        "name": spec.name, "family": spec.family, "dim": spec.dim, "patch": spec.patch,
        "resolution": spec.resolution, "tokens_at_256": 256, "source": spec.source,
        "needs_weights": spec.needs_weights, **_preprocessing(spec),
        "weights_present": (path is not None) if spec.needs_weights else True,
        "weights_path": str(path) if path is not None else None,
        "override_env": env_key(spec.name), "note": spec.note,
    }


def infos() -> list[dict]:
    return [info(n) for n in names()]


# ---------------------------------------------------------------------------------------
# the encoder table of docs/encoders.md, generated from the registry

TABLE_COLUMNS = ("name", "source", "input", "resize", "normalization", "pos embed", "final norm", "dim",
                 "tokens@256")


def _preprocessing(spec: EncoderSpec) -> dict:
    if spec.patch == 16:
        resize = "-"  # the encoder sees the model's own pixels
    else:
        resize = spec.interpolation + (" antialias" if spec.antialias else "")
    final = {True: "yes", False: "no", None: "-"}[spec.final_norm]
    return {"input": spec.resolution, "resize": resize, "normalization": spec.normalization,
            "pos_embed": spec.pos, "final_norm": final}


def table() -> list[dict]:
    """One row per registered encoder: TABLE_COLUMNS (tokens at a 256 px model input)."""
    rows = []
    for name in names():
        spec = get_spec(name)
        pre = _preprocessing(spec)
        rows.append({"name": name, "source": spec.source or "weight free", "input": pre["input"],
                     "resize": pre["resize"], "normalization": pre["normalization"],
                     "pos embed": pre["pos_embed"], "final norm": pre["final_norm"], "dim": spec.dim,
                     "tokens@256": (256 // 16) ** 2, "note": spec.note})
    return rows


def table_markdown() -> str:
    """The encoder table of docs/encoders.md (python launch/encoders.py table --markdown)."""
    cols = TABLE_COLUMNS + ("note",)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table():
        cells = [f"`{r[c]}`" if c == "name" else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("pos embed: " + "; ".join(f"`{k}` {v}" for k, v in POS_RULES.items()) + ".")
    lines.append("")
    lines.append("Controls (any name above): " + "; ".join(f"`NAME+{k}` {v}" for k, v in CONTROLS.items()) + ".")
    return "\n".join(lines) + "\n"
