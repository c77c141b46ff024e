"""The encoder contract, preprocessing and local weight lookup shared by every encoder.

An `Encoder` takes images [B, 3, H, W] in [0, 1] at the diffusion model's resolution
(H, W multiples of 16) and returns patch tokens [B, (H/16)*(W/16), E], row-major, with
no CLS or register tokens. Each encoder resizes to its own input size first: the token
grid is kept at H/16 x W/16, so an encoder whose tokens cover `patch` pixels sees
(H/16 * patch) x (W/16 * patch) pixels (DINOv2's 14 px patches -> 224 px at 256,
SAM2's stride-32 last stage -> 512 px at 256, as End2End-Diffusion/iREPA ldm/vision_encoder.py@99ad4ac
resizes them).

Weights are only ever read from this machine (never downloaded at run time); see
`resolve_weights` for the search order. A missing file is a FileNotFoundError that
names the paths that were tried and where to put the file.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from irepa.errors import InputError, InputNotFound

GRID_PATCH = 16  # pixels of the diffusion model's input per encoder token
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


def grid_of(images: torch.Tensor, who: str) -> tuple[int, int]:
    """Token grid (H/16, W/16) for an image batch, or a ValueError saying what is wrong."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if H % GRID_PATCH or W % GRID_PATCH:
        raise ValueError(f"{who}: image size {H}x{W} is not a multiple of {GRID_PATCH} px; "
                         f"resize or crop to e.g. 256x256 first")
    return H // GRID_PATCH, W // GRID_PATCH


class Encoder(nn.Module):
    """Frozen feature extractor: images [B, 3, H, W] in [0, 1] -> tokens [B, T, E].

    Subclasses set `dim` and `patch` and implement `tokens(x)` on the preprocessed batch
    x [B, 3, gh*patch, gw*patch] returning [B, gh*gw, E]. `mean`/`std` None skips
    normalization; `interpolation` is the torch resize mode ("bicubic", "bilinear"),
    `antialias` and `normalize_first` as in `preprocess`. `apply_spec` copies them from a
    registry entry.
    """

    name: str = "encoder"
    dim: int = 0
    patch: int = GRID_PATCH
    interpolation: str = "bicubic"
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    antialias: bool = False
    normalize_first: bool = False

    def apply_spec(self, spec) -> "Encoder":
        """Take the preprocessing of a registry entry (name, patch, resize, normalization)."""
        self.name, self.patch = spec.name, spec.patch
        self.mean, self.std = spec.mean, spec.std
        self.interpolation, self.antialias, self.normalize_first = spec.interpolation, spec.antialias, spec.normalize_first
        return self

    def freeze(self) -> "Encoder":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Encoder":
        # frozen targets: dropout / batch-norm statistics never switch to training mode
        return super().train(False)

    def param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def preprocess(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Resize to grid * patch and normalize, in fp32; cast to the weights' dtype last.

        The resize is plain F.interpolate (align_corners False) unless `antialias`, and
        comes after the normalization when `normalize_first` (both linear, so the order
        only moves fp32 round-off; kept to follow the release to the last bit).
        """
        size = (grid[0] * self.patch, grid[1] * self.patch)
        x = images.float()
        if self.normalize_first:
            x = self._normalize(x)
        if tuple(x.shape[-2:]) != size:
            smooth = self.interpolation in ("bilinear", "bicubic")
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False if smooth else None,
                              antialias=self.antialias and smooth)
        if not self.normalize_first:
            x = self._normalize(x)
        return x.to(self.param_dtype())

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokens(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = grid_of(images, self.name)
        out = self.tokens(self.preprocess(images, grid))
        T = grid[0] * grid[1]
        if out.shape[1] != T:
            raise RuntimeError(f"{self.name}: produced {out.shape[1]} tokens, expected {T} "
                               f"for a {grid[0]}x{grid[1]} grid")
        return out


# ---------------------------------------------------------------------------------------
# token helpers

def grid_to_tokens(x_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] feature map -> [B, H*W, C] row-major tokens."""
    return x_BCHW.flatten(2).transpose(1, 2)


def resample_pos_embed(pos_1TD: torch.Tensor, grid: tuple[int, int], prefix: int = 0,
                       mode: str = "bicubic", antialias: bool = False) -> torch.Tensor:
    """Resample absolute position embeddings [1, prefix + g*g, D] to a new grid.

    The first `prefix` entries (CLS / registers) are kept; the square patch part is
    interpolated in fp32 to grid = (gh, gw) and cast back. With mode "bicubic" and
    antialias True this is timm's resample_abs_pos_embed (timm 1.0.17,
    layers/pos_embed.py), which the release applies at load for DINO, DINOv2, MoCo v3,
    MAE, I-JEPA and CLIP: torch's antialiased bicubic uses PIL's a = -0.5 kernel, so it
    differs from plain bicubic (a = -0.75) even when upsampling 14 -> 16.
    """
    extra, patch = pos_1TD[:, :prefix], pos_1TD[:, prefix:]
    n = patch.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    if (side, side) == tuple(grid):
        return pos_1TD
    D = patch.shape[-1]
    p = patch.reshape(1, side, side, D).permute(0, 3, 1, 2).float()
    p = F.interpolate(p, size=tuple(grid), mode=mode, align_corners=False, antialias=antialias)
    p = p.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D).to(pos_1TD.dtype)
    return torch.cat([extra, p], dim=1)


def release_pos_embed(pos_1TD: torch.Tensor, grid: tuple[int, int], prefix: int, rule: str) -> torch.Tensor:
    """Position embeddings for a token grid by a registry rule ("timm" or "timm@16").

    "timm@16": the release resamples the checkpoint's table to 16 x 16 when it loads it
    (MoCo v3's fix_mocov3_state_dict, MAE's loader) and to the run's grid afterwards, so
    at 512 px a 14 x 14 table goes 14 -> 16 -> 32, each step timm's.
    """
    if rule == "timm@16":
        pos_1TD = resample_pos_embed(pos_1TD, (16, 16), prefix, "bicubic", antialias=True)
    elif rule != "timm":
        raise ValueError(f"no release position-embedding rule {rule!r}")
    return resample_pos_embed(pos_1TD, grid, prefix, "bicubic", antialias=True)


# ---------------------------------------------------------------------------------------
# local weight lookup

def env_key(name: str) -> str:
    """Per-encoder override variable: dinov2-vit-b -> IREPA_ENCODER_DINOV2_VIT_B."""
    return "IREPA_ENCODER_" + re.sub(r"[^0-9A-Za-z]+", "_", name).upper()


def encoder_dir() -> Path:
    return Path(os.environ.get("IREPA_ENCODER_DIR", Path.home() / ".cache" / "irepa" / "encoders"))


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """Newest local snapshot of a Hugging Face repo in the hub cache, never the network."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception:
        pass
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snaps = hub / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    if snaps.is_dir():
        found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def resolve_weights(name: str, *, hf_repo: str | None = None, filename: str | None = None,
                    weights: str | os.PathLike | None = None, must_exist: bool = True,
                    what: str = "encoder") -> Path | None:
    """Find an encoder's weights on this machine (also used for other frozen or initial
    weights: the VAE, LPIPS, the discriminator; `what` names the kind in errors).

    Order: the `weights` argument; $IREPA_ENCODER_<NAME>; $IREPA_ENCODER_DIR/<name>
    (a Hugging Face style folder or a file) and $IREPA_ENCODER_DIR/<filename>; the
    Hugging Face hub cache (`hf_repo`); the torch hub cache (checkpoints/<filename>).
    Returns a folder (Hugging Face layout) or a file. Raises FileNotFoundError naming
    every place tried when nothing is there (or returns None if must_exist is False).
    """
    tried: list[str] = []
    candidates: list[Path] = []
    if weights is not None:
        candidates.append(Path(weights).expanduser())
    if os.environ.get(env_key(name)):
        candidates.append(Path(os.environ[env_key(name)]).expanduser())
    root = encoder_dir()
    candidates.append(root / name)
    if filename:
        candidates.append(root / filename)
    for c in candidates:
        tried.append(str(c))
        if c.exists():
            return c
        if weights is not None and c == Path(weights).expanduser():
            raise InputNotFound(f"{what} {name!r}: weights path {c} does not exist")
    if hf_repo:
        snap = hf_cache_snapshot(hf_repo)
        tried.append(f"Hugging Face cache of {hf_repo}")
        if snap is not None:
            return snap
    if filename:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / filename
        tried.append(str(hub))
        if hub.exists():
            return hub
    if not must_exist:
        return None
    expected = f"the Hugging Face repo {hf_repo!r} (config.json + weights)" if hf_repo else f"the file {filename!r}"
    raise InputNotFound(
        f"{what} {name!r}: no weights on this machine (nothing is downloaded at run time). "
        f"Put {expected} at {root / (name if hf_repo else (filename or name))}, or point "
        f"${env_key(name)} / build(..., weights=PATH) at it"
        + (f", or pre-fill the Hugging Face cache (huggingface-cli download {hf_repo})" if hf_repo else "")
        + ". Tried: " + "; ".join(tried))


def load_state_dict(path: Path, prefixes: Sequence[str] = ("module.", "base_encoder.", "model.")) -> dict:
    """Read a .safetensors / .pth / .pth.tar checkpoint into a flat tensor dict.

    Unwraps the usual containers ("state_dict", "model", "teacher") and strips the
    given key prefixes (DDP's "module.", MoCo's "base_encoder.").
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "weights", "teacher"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_checked(module: nn.Module, sd: dict, name: str, path: Path, assign: bool = False) -> None:
    """load_state_dict that fails loudly on missing keys or wrong shapes, naming a few.

    assign=True takes the checkpoint tensors as the parameters (for meta-device models).
    """
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in own if k not in sd]
    if missing:
        raise InputError(f"encoder {name!r}: checkpoint {path} lacks {len(missing)} tensors the "
                         f"model needs, e.g. {missing[:5]}; is it the right file?")
    bad = [k for k in sd if sd[k].shape != own[k].shape]
    if bad:
        raise InputError(f"encoder {name!r}: checkpoint {path} has shapes that differ from the model for "
                         f"{bad[:5]} (e.g. {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
    module.load_state_dict(sd, strict=True, assign=assign)
