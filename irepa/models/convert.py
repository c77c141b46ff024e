"""Load released SiT + REPA/iREPA checkpoints (the reference layout) into our models.

Reference .pt files are state dicts, possibly wrapped ({"ema": ..., "model": ..., "opt":
..., "args": ...}) and possibly prefixed ("module.", "_orig_mod."). They are read with
torch.load(weights_only=True): tensors and plain containers only, no pickled code.

Key mapping (reference -> ours); every other key has the same name and math:
  x_embedder.proj.{weight,bias}   -> x_embedder.{weight,bias}    (timm PatchEmbed -> Conv2d)
  pos_embed                       -> dropped after checking it equals our fixed sin-cos table
  projectors.K.{0,2,4}.*          -> head: projectors.K.net.{0,2,4}.*  (REPA MLP)
  projectors.K.weight / .0.weight -> head: projectors.K.conv.*        (iREPA conv, 4-D weight)
Architecture hyper-parameters are read off the shapes (patch, channels, width, depth,
classes, grid, learned sigma); the head count is not in the weights, so the size is
matched by (depth, width) against irepa.models.SIT_SIZES or given by name.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from .sit import SIT_SIZES, SiT

_PREFIXES = ("module.", "_orig_mod.", "model.")


def unwrap_state_dict(obj, which: str = "ema") -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint object: obj[which] if wrapped, else obj itself."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    if which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif any(isinstance(v, dict) for v in obj.values()) and not any(torch.is_tensor(v) for v in obj.values()):
        wrapped = [k for k, v in obj.items() if isinstance(v, dict)]
        raise KeyError(f"checkpoint is wrapped (keys {wrapped}) but has no {which!r} entry")
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def infer_sit_kwargs(sd: dict[str, torch.Tensor], name: str | None = None) -> tuple[str, dict]:
    """(size name, SiT constructor kwargs) read off a reference-layout state dict."""
    try:
        w = sd["x_embedder.proj.weight"] if "x_embedder.proj.weight" in sd else sd["x_embedder.weight"]
        emb = sd["y_embedder.embedding_table.weight"]
        final = sd["final_layer.linear.weight"]
    except KeyError as e:
        raise KeyError(f"not a SiT state dict: missing {e}") from None
    dim, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_ch = final.shape[0] // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final layer gives {out_ch} channels for {in_ch} input channels")
    if name is None:
        hits = [n for n, s in SIT_SIZES.items() if (s.depth, s.dim) == (depth, dim) and n.endswith(f"/{patch}")]
        if not hits:
            raise ValueError(f"no SiT size with depth {depth}, width {dim}, patch {patch}; pass the model name")
        name = hits[0]
    s = SIT_SIZES[name]
    if (s.depth, s.dim) != (depth, dim):
        raise ValueError(f"{name} is depth {s.depth} x width {s.dim}; the checkpoint has {depth} x {dim}")
    from . import _SIT_ALIGN_DEPTH  # the published alignment depth (not stored in the weights)
    kw = dict(patch_size=patch, in_channels=in_ch, dim=dim, depth=depth, heads=s.heads,
              learn_sigma=out_ch == 2 * in_ch, align_depth=_SIT_ALIGN_DEPTH[name])
    if "pos_embed" in sd:
        grid = int(round(sd["pos_embed"].shape[-2] ** 0.5))
        kw["input_size"] = grid * patch
    # the reference adds a null-class row only when trained with label dropout
    kw["num_classes"] = emb.shape[0] - 1
    kw["class_dropout_prob"] = 0.1
    return name, kw


def split_reference(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Reference-layout state dict -> (our SiT state dict, our AlignmentHead state dict)."""
    model, head = {}, {}
    for k, v in sd.items():
        if k.startswith("projectors."):
            _, idx, rest = k.split(".", 2)
            weight = sd.get(k[: -len("bias")] + "weight") if k.endswith("bias") else v
            if weight is not None and weight.dim() == 4:  # iREPA conv, bare or in a Sequential
                head[f"projectors.{idx}.conv.{rest.split('.')[-1]}"] = v
            else:
                head[f"projectors.{idx}.net.{rest}"] = v
        elif k.startswith("x_embedder.proj."):
            model["x_embedder." + k[len("x_embedder.proj."):]] = v
        elif k == "pos_embed":
            continue
        else:
            model[k] = v
    return model, head


def convert_reference(sd: dict[str, torch.Tensor], name: str | None = None, input_size: int | None = None,
                      **overrides) -> tuple[SiT, dict, dict]:
    """Build our SiT from a reference-layout state dict -> (model in eval mode, head state dict, info)."""
    size, kw = infer_sit_kwargs(sd, name)
    if input_size is not None:
        kw["input_size"] = input_size
    if "input_size" not in kw:
        raise ValueError("the checkpoint has no pos_embed; pass input_size (latent side)")
    kw.update(overrides)
    model = SiT(**kw)
    model_sd, head_sd = split_reference(sd)
    if "pos_embed" in sd:
        ref = sd["pos_embed"].reshape(model.pos_embed.shape).float()
        if not torch.allclose(ref, model.pos_embed, atol=1e-4):
            raise ValueError("the checkpoint's pos_embed is not the fixed 2-D sin-cos table this SiT uses")
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"reference checkpoint does not fit {size}: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    info = {"name": size, **kw, "projectors": sorted({k.split(".")[1] for k in head_sd}, key=int)}
    return model.eval(), head_sd, info


def load_reference_checkpoint(path: str | Path, which: str = "ema", name: str | None = None,
                              input_size: int | None = None, **overrides) -> tuple[SiT, dict, dict]:
    """A released SiT/REPA/iREPA .pt -> (our SiT in eval mode, projector state dict, info)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:  # training scripts store their argparse.Namespace next to the weights: plain data, allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code or a corrupt file: refuse, never unpickle
        raise ValueError(f"{path}: cannot load as a plain state dict with weights_only=True ({e})") from e
    return convert_reference(unwrap_state_dict(obj, which), name, input_size, **overrides)
