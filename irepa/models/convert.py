"""Load released SiT + REPA/iREPA checkpoints (the reference layout) into our models.

Reference .pt files are state dicts, possibly wrapped ({"ema": ..., "model": ..., "opt":
..., "args": ...}) and possibly prefixed ("module.", "_orig_mod."). They are read with
torch.load(weights_only=True): tensors and plain containers only, no pickled code.

Key mapping (reference -> ours); every other key has the same name and math:
  x_embedder.proj.{weight,bias}   -> x_embedder.{weight,bias}    (timm PatchEmbed -> Conv2d)
  pos_embed                       -> dropped after checking it equals our fixed sin-cos table
  projectors.K.{0,2,4}.*          -> head: projectors.K.net.{0,2,4}.*  (REPA release MLP)
  projectors.K.projection_layer.{0,2,4}.*
                                  -> head: projectors.K.net.{0,2,4}.*  (iREPA release MLP,
                                     ldm/models/sit.py@99ad4ac ProjectionLayer + build_mlp)
  projectors.K.projection_layer.* / projectors.K.weight / projectors.K.0.weight, 4-D weight
                                  -> head: projectors.K.conv.*        (conv, any odd k x k)
Architecture hyper-parameters are read off the shapes (patch, channels, width, depth,
classes, grid, learned sigma; the head's kind, encoder dims, MLP width and conv kernel
size: info["head"], `reference_head` builds it); the head count is not in the weights, so
the size is matched by (depth, width) against irepa.models.SIT_SIZES or given by name.

info["release"] says which release trained the checkpoint, as far as it shows: "irepa"
(the iREPA code: its ProjectionLayer keys, a conv head, or its training args), "repa"
(REPA's projectors.K.{0,2,4} head or REPA training args), None (neither: no projectors,
no args). It matters for decoding: the iREPA code scales SD-VAE latents per channel
(sdvae-ft-mse-f8d4-latents-stats.pt), REPA by 0.18215. info["recipe"] is the training recipe
(irepa.recipes) that samples such a model: "sit", the flow-matching velocity all three
releases (SiT, REPA, iREPA) train.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from irepa.align import AlignmentHead
from irepa.errors import InputError, InputKeyError, InputNotFound

from .sit import SIT_SIZES, SiT

RELEASE_RECIPE = "sit"
"""the recipe of every release this module reads: SiT flow matching (velocity, t = 1 noise)"""
_PREFIXES = ("module.", "_orig_mod.", "model.")


def unwrap_state_dict(obj, which: str = "ema") -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint object: obj[which] if wrapped, else obj itself."""
    if not isinstance(obj, dict):
        raise InputError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    if which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif any(isinstance(v, dict) for v in obj.values()) and not any(torch.is_tensor(v) for v in obj.values()):
        wrapped = [k for k, v in obj.items() if isinstance(v, dict)]
        raise InputKeyError(f"checkpoint is wrapped (keys {wrapped}) but has no {which!r} entry")
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
        raise InputKeyError(f"not a SiT state dict: missing {e}") from None
    dim, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_ch = final.shape[0] // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise InputError(f"final layer gives {out_ch} channels for {in_ch} input channels")
    if name is None:
        hits = [n for n, s in SIT_SIZES.items() if (s.depth, s.dim) == (depth, dim) and n.endswith(f"/{patch}")]
        if not hits:
            raise InputError(f"no SiT size with depth {depth}, width {dim}, patch {patch}; pass the model name")
        name = hits[0]
    s = SIT_SIZES[name]
    if (s.depth, s.dim) != (depth, dim):
        raise InputError(f"{name} is depth {s.depth} x width {s.dim}; the checkpoint has {depth} x {dim}")
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


# projector keys: REPA's build_mlp Sequential, the iREPA release's ProjectionLayer (MLP
# Sequential or a Conv2d), or a bare Conv2d
_PROJ_KEY = re.compile(r"projectors\.(\d+)\.(?:(projection_layer)\.)?(?:(\d+)\.)?(weight|bias)$")
_MLP_LAYERS = ("0", "2", "4")  # Linear, SiLU, Linear, SiLU, Linear


def _head_key(k: str, sd: dict[str, torch.Tensor]) -> str:
    """Our AlignmentHead key for a reference projector key, or a ValueError naming the layout."""
    m = _PROJ_KEY.match(k)
    weight = sd.get(k[: -len("bias")] + "weight") if m and m.group(4) == "bias" else sd.get(k)
    if m and weight is not None:
        idx, layer, param = m.group(1), m.group(3), m.group(4)
        if weight.dim() == 4 and layer in (None, "0"):
            return f"projectors.{idx}.conv.{param}"
        if weight.dim() == 2 and layer in _MLP_LAYERS:
            return f"projectors.{idx}.net.{layer}.{param}"
    raise InputError(
        f"{k}: projector layout not recognised; expected REPA's projectors.K.{{0,2,4}}.*, the iREPA "
        f"release's projectors.K.projection_layer.{{0,2,4}}.* (MLP) or projectors.K.projection_layer.* "
        f"(conv, 4-D weight); a single-Linear ('linear') projector has no irepa equivalent "
        f"(pass head=False to load the model without its projectors)")


def split_reference(sd: dict[str, torch.Tensor], head: bool = True) -> tuple[dict, dict]:
    """Reference-layout state dict -> (our SiT state dict, our AlignmentHead state dict).

    head=False drops the projectors without reading them (sampling needs none)."""
    model, head_sd = {}, {}
    for k, v in sd.items():
        if k.startswith("projectors."):
            if head:
                head_sd[_head_key(k, sd)] = v
        elif k.startswith("x_embedder.proj."):
            model["x_embedder." + k[len("x_embedder.proj."):]] = v
        elif k == "pos_embed":
            continue
        else:
            model[k] = v
    return model, head_sd


def head_spec(head_sd: dict[str, torch.Tensor]) -> dict | None:
    """AlignmentHead arguments read off converted projector weights (None without projectors):
    {"projector": "conv"|"mlp", "encoder_dims": [E per projector], "hidden_dim", "kernel_size"}."""
    if not head_sd:
        return None
    idx = sorted({int(k.split(".")[1]) for k in head_sd})
    if idx != list(range(len(idx))):
        raise ValueError(f"projector indices {idx} are not 0..{len(idx) - 1}")
    kinds, dims, hidden, kernel = set(), [], set(), set()
    for i in idx:
        w = head_sd.get(f"projectors.{i}.conv.weight")
        if w is not None:
            if w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0:
                raise ValueError(f"projector {i}: conv kernel {tuple(w.shape[-2:])} is not square and odd")
            kinds.add("conv")
            kernel.add(int(w.shape[-1]))
            dims.append(int(w.shape[0]))
            continue
        layers = [head_sd.get(f"projectors.{i}.net.{j}.weight") for j in _MLP_LAYERS]
        if any(x is None for x in layers):
            raise ValueError(f"projector {i}: an MLP head needs Linear layers 0, 2 and 4; got "
                             f"{sorted(k for k in head_sd if k.startswith(f'projectors.{i}.'))}")
        kinds.add("mlp")
        hidden.add(int(layers[0].shape[0]))
        dims.append(int(layers[2].shape[0]))
    if len(kinds) > 1 or len(hidden) > 1 or len(kernel) > 1:
        raise ValueError(f"projectors differ in kind {sorted(kinds)}, MLP width {sorted(hidden)} or kernel "
                         f"{sorted(kernel)}; one AlignmentHead builds them all alike")
    return {"projector": kinds.pop(), "encoder_dims": dims, "hidden_dim": hidden.pop() if hidden else 2048,
            "kernel_size": kernel.pop() if kernel else 3}


def reference_head(head_sd: dict[str, torch.Tensor], spec: dict, dim: int,
                   gamma: float | None = None) -> AlignmentHead:
    """The converted projectors as our AlignmentHead (spec: info["head"]), weights loaded strictly.

    gamma is the spatial norm the run trained with (not stored in the weights)."""
    head = AlignmentHead(dim, spec["encoder_dims"], spec["projector"], gamma, spec["hidden_dim"],
                         kernel_size=spec["kernel_size"])
    head.load_state_dict(head_sd)
    return head


_IREPA_ARGS = ("projection_layer_type", "proj_kwargs_kernel_size", "spnorm_method")  # ldm/train.py@99ad4ac only
_REPA_ARGS = ("enc_type", "proj_coeff", "encoder_depth")


def release_kind(sd: dict[str, torch.Tensor], train_args: dict | None = None) -> str | None:
    """"irepa" / "repa" / None: which release's training code the checkpoint shows (module doc)."""
    args = train_args or {}
    if any(a in args for a in _IREPA_ARGS):
        return "irepa"
    proj = [k for k in sd if k.startswith("projectors.")]
    if any(".projection_layer." in k for k in proj) or any(sd[k].dim() == 4 for k in proj):
        return "irepa"
    if proj or any(a in args for a in _REPA_ARGS):
        return "repa"
    return None


def convert_reference(sd: dict[str, torch.Tensor], name: str | None = None, input_size: int | None = None,
                      head: bool = True, train_args: dict | None = None, **overrides) -> tuple[SiT, dict, dict]:
    """Build our SiT from a reference-layout state dict -> (model in eval mode, head state dict, info).

    info["head"]: the head's AlignmentHead arguments (None without projectors or with head=False);
    info["release"], info["recipe"]: see the module doc. train_args: the checkpoint's "args" entry, if any."""
    size, kw = infer_sit_kwargs(sd, name)
    if input_size is not None:
        kw["input_size"] = input_size
    if "input_size" not in kw:
        raise InputError("the checkpoint has no pos_embed; pass input_size (latent side)")
    kw.update(overrides)
    model = SiT(**kw)
    model_sd, head_sd = split_reference(sd, head)
    if "pos_embed" in sd:
        ref = sd["pos_embed"].reshape(model.pos_embed.shape).float()
        if not torch.allclose(ref, model.pos_embed, atol=1e-4):
            raise InputError("the checkpoint's pos_embed is not the fixed 2-D sin-cos table this SiT uses")
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise InputError(f"reference checkpoint does not fit {size}: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    info = {"name": size, **kw, "projectors": sorted({k.split(".")[1] for k in head_sd}, key=int),
            "head": head_spec(head_sd), "release": release_kind(sd, train_args), "recipe": RELEASE_RECIPE}
    return model.eval(), head_sd, info


def load_reference_checkpoint(path: str | Path, which: str = "ema", name: str | None = None,
                              input_size: int | None = None, head: bool = True,
                              **overrides) -> tuple[SiT, dict, dict]:
    """A released SiT/REPA/iREPA .pt -> (our SiT in eval mode, projector state dict, info).

    `reference_head(head_sd, info["head"], info["dim"])` rebuilds the projectors."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"checkpoint not found: {path}")
    try:  # training scripts store their argparse.Namespace next to the weights: plain data, allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code or a corrupt file: refuse, never unpickle
        raise InputError(f"{path}: cannot load as a plain state dict with weights_only=True ({e})") from e
    args = obj.get("args") if isinstance(obj, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None
    return convert_reference(unwrap_state_dict(obj, which), name, input_size, head, args, **overrides)
