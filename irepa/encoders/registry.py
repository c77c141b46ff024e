"""Every encoder the paper studies, each described as the official release runs it.

One `EncoderSpec` per name says everything that decides the patch tokens besides the
weights: the encoder input size (`patch` px per output token, so the encoder sees
H/16 * patch px for an H px model input), the image resize (mode, antialias, before or
after normalization), the normalization constants, how absolute position embeddings
meet the token grid (`pos`, see POS_RULES), whether the final norm is applied, and
LayerNorm eps overrides. The defaults are those of End2End-Diffusion/iREPA @99ad4ac
(`ldm/vision_encoder.py`; the `jit/` copy computes the same tokens), quirks included;
where a quirk looks like a mistake the other choice is registered as a variant name
(`VARIANTS`). `table()` in __init__.py renders these specs for docs/encoders.md.

Upstream code each family was run against side by side (same weights and pixels, fp32;
max rel after the fixes in brackets), or read where marked:
- release (End2End-Diffusion/iREPA @99ad4ac, timm 1.0.17, transformers 4.56.1): MoCo v3
  b/l (models/mocov3_vit.py) [0], MAE-L (models/mae_vit.py) [0], I-JEPA-H (models/jepa.py)
  [5e-7], PE core/lang/spatial (models/pe.py, pe_config.py, rope.py) [0], WebSSL,
  SigLIP, SigLIP2, SAM2 (transformers) [0], HOG (scikit-image) [1e-7], SIFT (kornia
  0.8.1) [0], VGG16 (torchvision 0.28 layout) [0];
- DINO v1 via facebookresearch/dino @7c446df [8e-7], DINOv2 via facebookresearch/dinov2
  @b8931f7 [0], DINOv3 via facebookresearch/dinov3 @94a96ac (the release's pin) [4e-7],
  CLIP via openai/CLIP @dcba3cb (the release's pin, fp16 weights) [0];
- read only: C-RADIOv3 (NVlabs/RADIO @c0f3701, radio.py).

`dim` is the real model's token width; tiny test variants (`build(name, tiny=True)`)
have the same architecture with small widths. `source` is the Hugging Face repo id
(looked up in the local cache only) or the checkpoint file name.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .base import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD

from irepa.errors import InputError

# how absolute position embeddings are brought to the token grid
POS_RULES = {
    "timm": "stored grid -> token grid once, timm's resample_abs_pos_embed (bicubic, antialias)",
    "timm@16": "stored grid -> 16x16 -> token grid, timm's resample each time (release: at load)",
    "hf": "transformers' interpolate_pos_encoding at run time (bicubic, no antialias)",
    "bilinear": "stored grid -> token grid, bilinear, no antialias (PE's own)",
    "rope": "none stored: RoPE on the token grid",
    "cpe": "RADIO's CPE: stored grid bilinear to the long side, top-left window",
    "hiera": "Hiera's windowed position embedding (transformers)",
    "none": "no position embedding",
}


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    family: str            # builder: a transformers family (hf.FAMILIES), "mocov3", "pe", "radio", "hog", "hog-patch", "sift", "vgg16"
    dim: int               # token width E of the real model
    patch: int             # encoder input pixels per token (input = grid * patch)
    source: str | None     # Hugging Face repo id, or a checkpoint file name, or None (weight free)
    mean: tuple | None = IMAGENET_MEAN
    std: tuple | None = IMAGENET_STD
    interpolation: str = "bicubic"   # image resize mode when the input size differs
    antialias: bool = False          # the release resizes with plain F.interpolate (no antialias)
    normalize_first: bool = False    # the release normalizes before resizing (DINO, SigLIP, I-JEPA, WebSSL)
    pos: str = "none"                # POS_RULES key
    final_norm: bool | None = None   # apply the model's final norm; None: the model has none
    layer_norm_eps: float | None = None  # override the checkpoint config's LayerNorm eps (transformers)
    arch: str = ""         # architecture size key for our own implementations (vit.py, radio.py, digits_cnn.py)
    note: str = ""
    base: str | None = None  # controls.py: the encoder whose tokens a "+global" / "+perm" control transforms

    @property
    def resolution(self) -> int:
        """Encoder input size at the 256 px model resolution."""
        return 16 * self.patch

    @property
    def needs_weights(self) -> bool:
        """Whether weights must be put on this machine (the digits CNN trains itself here)."""
        if self.base is not None:
            return get_spec(self.base).needs_weights
        return self.family not in BUILT_HERE

    @property
    def normalization(self) -> str:
        """Name of the normalization constants (the docs/encoders.md table)."""
        if self.mean is None:
            return "none"
        known = {(IMAGENET_MEAN, IMAGENET_STD): "ImageNet", (CLIP_MEAN, CLIP_STD): "CLIP", (HALF, HALF): "0.5 / 0.5"}
        return known.get((tuple(self.mean), tuple(self.std)), "custom")


BUILT_HERE = ("hog", "hog-patch", "sift", "sift-upright", "raw-patch", "digits-cnn")
"""families that need no weight file: weight free, or trained on this machine (digits_cnn.py)"""


def _s(*a, **k) -> EncoderSpec:
    return EncoderSpec(*a, **k)


_DIGITS_CNN = "trained here (digits)"

# shared settings per release loader (ldm/vision_encoder.py class in the comment)
_DINO = dict(normalize_first=True, pos="timm", final_norm=True, layer_norm_eps=1e-6)   # DINOEncoder, DINOv2Encoder
_DINOV3 = dict(interpolation="bilinear", antialias=True, pos="rope", final_norm=True)  # DINOv3Encoder (torchvision Resize)
_WEBSSL = dict(normalize_first=True, pos="hf", final_norm=True)                         # WebSSLEncoder
_MOCO = dict(pos="timm@16", final_norm=True)                                           # MoCoV3Encoder
_SIGLIP = dict(normalize_first=True, pos="hf", final_norm=True,                        # SigLIP(2)Encoder: ImageNet stats
               note="release: 256 px only, ImageNet mean/std (+siglip-norm: 0.5)")
_PE = dict(mean=HALF, std=HALF, interpolation="bilinear", pos="bilinear")              # PEEncoder
_SAM2 = dict(pos="hiera")                                                               # SAM2Encoder
_RADIO = dict(mean=CLIP_MEAN, std=CLIP_STD, interpolation="bilinear", pos="cpe")        # CRadioEncoder (conditioner in the model)

_SPECS = [
    _s("dino-vit-b", "vit", 768, 16, "facebook/dino-vitb16", **_DINO, note="DINO v1 ViT-B/16"),
    _s("dinov2-vit-b", "dinov2", 768, 14, "facebook/dinov2-base", **_DINO),
    _s("dinov2-vit-l", "dinov2", 1024, 14, "facebook/dinov2-large", **_DINO),
    _s("dinov2-vit-g", "dinov2", 1536, 14, "facebook/dinov2-giant", **_DINO),
    _s("dinov3-vit-b16", "dinov3", 768, 16, "facebook/dinov3-vitb16-pretrain-lvd1689m", **_DINOV3,
       note="4 registers dropped"),
    _s("dinov3-vit-l16", "dinov3", 1024, 16, "facebook/dinov3-vitl16-pretrain-lvd1689m", **_DINOV3),
    _s("dinov3-vit-h16plus", "dinov3", 1280, 16, "facebook/dinov3-vith16plus-pretrain-lvd1689m", **_DINOV3),
    _s("dinov3-vit-7b16", "dinov3", 4096, 16, "facebook/dinov3-vit7b16-pretrain-lvd1689m", **_DINOV3),
    _s("webssl-vit-dino300m_full2b_224", "dinov2", 1024, 14, "facebook/webssl-dino300m-full2b-224", **_WEBSSL),
    _s("webssl-vit-dino1b_full2b_224", "dinov2", 1536, 14, "facebook/webssl-dino1b-full2b-224", **_WEBSSL),
    _s("webssl-vit-dino2b_full2b_224", "dinov2", 2688, 14, "facebook/webssl-dino2b-full2b-224", **_WEBSSL),
    _s("webssl-vit-dino3b_full2b_224", "dinov2", 3072, 14, "facebook/webssl-dino3b-full2b-224", **_WEBSSL),
    _s("webssl-vit-dino5b_full2b_224", "dinov2", 3584, 14, "facebook/webssl-dino5b-full2b-224", **_WEBSSL),
    _s("webssl-vit-dino7b_full8b_224", "dinov2", 4096, 14, "facebook/webssl-dino7b-full8b-224", **_WEBSSL),
    _s("mocov3-vit-b", "mocov3", 768, 16, "mocov3_vitb.pth", **_MOCO, arch="vit-b", note="timm ViT keys"),
    _s("mocov3-vit-l", "mocov3", 1024, 16, "mocov3_vitl.pth", **_MOCO, arch="vit-l",
       note="blocks.13/14 key typos renamed"),
    _s("clip-vit-L", "clip", 1024, 14, "openai/clip-vit-large-patch14", CLIP_MEAN, CLIP_STD, pos="timm",
       final_norm=False, note="no ln_post / projection"),
    _s("jepa-vit-h", "ijepa", 1280, 14, "facebook/ijepa_vith14_1k", normalize_first=True, pos="timm",
       final_norm=True, layer_norm_eps=1e-6),
    _s("mae-vit-l", "mae", 1024, 16, "facebook/vit-mae-large", pos="timm@16", final_norm=False,
       layer_norm_eps=1e-6, note="release: 256 px only, no final LayerNorm (+norm applies it)"),
    _s("siglip-vit-b", "siglip", 768, 16, "google/siglip-base-patch16-256", **_SIGLIP),
    _s("siglip-vit-l", "siglip", 1024, 16, "google/siglip-large-patch16-256", **_SIGLIP),
    _s("siglip-vit-so400m", "siglip", 1152, 14, "google/siglip-so400m-patch14-224", **_SIGLIP),
    _s("siglip2-vit-b", "siglip", 768, 16, "google/siglip2-base-patch16-256", **_SIGLIP),
    _s("siglip2-vit-l", "siglip", 1024, 16, "google/siglip2-large-patch16-256", **_SIGLIP),
    _s("siglip2-vit-so400m", "siglip", 1152, 16, "google/siglip2-so400m-patch16-256", **_SIGLIP),
    _s("siglip2-vit-g", "siglip", 1536, 16, "google/siglip2-giant-opt-patch16-256", **_SIGLIP),
    _s("pe-vit-b", "pe", 768, 16, "PE-Core-B16-224.pt", **_PE, final_norm=False, arch="core-b16",
       note="release skips ln_post (pe-vit-bnorm applies it)"),
    _s("pe-vit-l", "pe", 1024, 14, "PE-Core-L14-336.pt", **_PE, final_norm=False, arch="core-l14"),
    _s("pe-vit-g", "pe", 1536, 14, "PE-Core-G14-448.pt", **_PE, final_norm=False, arch="core-g14"),
    _s("langpe-vit-l", "pe", 1024, 14, "PE-Lang-L14-448.pt", **_PE, arch="lang-l14"),
    _s("langpe-vit-g", "pe", 1536, 14, "PE-Lang-G14-448.pt", **_PE, arch="lang-g14"),
    _s("spatialpe-vit-b", "pe", 768, 16, "PE-Spatial-B16-512.pt", **_PE, arch="spatial-b16", note="no LayerScale"),
    _s("spatialpe-vit-l", "pe", 1024, 14, "PE-Spatial-L14-448.pt", **_PE, arch="spatial-l14", note="no LayerScale"),
    _s("spatialpe-vit-g", "pe", 1536, 14, "PE-Spatial-G14-448.pt", **_PE, arch="spatial-g14"),
    _s("sam2-vit-s", "sam2", 768, 32, "facebook/sam2-hiera-small", **_SAM2, note="Hiera last stage at 2x input"),
    _s("sam2-vit-b", "sam2", 896, 32, "facebook/sam2-hiera-base-plus", **_SAM2),
    _s("sam2-vit-l", "sam2", 1152, 32, "facebook/sam2-hiera-large", **_SAM2),
    # C-RADIO (radio.py); the release loads C-RADIOv3 from torch hub ("cradio-vit-b" etc. alias these)
    _s("c-radio-v2-vit-b", "radio", 768, 16, "nvidia/C-RADIOv2-B", **_RADIO, arch="v2-b", note="not in the release"),
    _s("c-radio-v2-vit-l", "radio", 1024, 16, "nvidia/C-RADIOv2-L", **_RADIO, arch="v2-l", note="not in the release"),
    _s("c-radio-v2-vit-h", "radio", 1280, 16, "nvidia/C-RADIOv2-H", **_RADIO, arch="v2-h", note="not in the release"),
    _s("c-radio-v2-vit-g", "radio", 1536, 16, "nvidia/C-RADIOv2-g", **_RADIO, arch="v2-g", note="not in the release"),
    _s("c-radio-v3-vit-b", "radio", 768, 16, "nvidia/C-RADIOv3-B", **_RADIO, arch="v3-b", note="LayerScale"),
    _s("c-radio-v3-vit-l", "radio", 1024, 16, "nvidia/C-RADIOv3-L", **_RADIO, arch="v3-l", note="LayerScale"),
    _s("c-radio-v3-vit-h", "radio", 1280, 16, "nvidia/C-RADIOv3-H", **_RADIO, arch="v3-h"),
    _s("c-radio-v3-vit-g", "radio", 1536, 16, "nvidia/C-RADIOv3-g", **_RADIO, arch="v3-g"),
    _s("c-radio-v4-vit-h", "radio", 1280, 16, "nvidia/C-RADIOv4-H", **_RADIO, arch="v4-h",
       note="not in the release; 3 cls + 7 registers dropped"),
    _s("hog", "hog", 128, 16, None, None, None, interpolation="bilinear",
       note="the release's HOG: 2 px cells, every block, bilinear to the grid"),
    _s("hog-patch", "hog-patch", 128, 16, None, None, None,
       note="own: 4 px cells, one block per patch (the digits presets' target), not in the release"),
    _s("sift", "sift", 128, 16, None, None, None, interpolation="bilinear",
       note="the release's SIFT: kornia, dominant orientation, 41 px patches"),
    _s("sift-upright", "sift-upright", 128, 16, None, None, None, note="own upright dense SIFT, not in the release"),
    _s("raw-patch", "raw-patch", 256, 16, None, None, None,
       note="own: the gray pixels of each 16 px patch, not in the release"),
    # learned targets of the spatial-vs-global study (irepa.study), trained here on digits (digits_cnn.py)
    _s("digits-cnn-l2", "digits-cnn", 32, 16, _DIGITS_CNN, None, None, arch="2",
       note="own: layer 2 of a 4-layer CNN trained on half the digits (receptive field 5 tokens)"),
    _s("digits-cnn-l4", "digits-cnn", 32, 16, _DIGITS_CNN, None, None, arch="4",
       note="own: layer 4 (the one its classifier pools; receptive field 9 tokens)"),
    _s("digits-cnn-l2-init", "digits-cnn", 32, 16, _DIGITS_CNN, None, None, arch="2-init",
       note="own: digits-cnn-l2 at its seeded initialisation, untrained"),
    _s("digits-cnn-l4-init", "digits-cnn", 32, 16, _DIGITS_CNN, None, None, arch="4-init",
       note="own: digits-cnn-l4 at its seeded initialisation, untrained"),
    _s("vgg16", "vgg16", 512, 16, "vgg16_features-amdegroot-88682ab5.pth", interpolation="bilinear",
       note="conv1_1..pool4, torchvision IMAGENET1K_FEATURES file"),
]

# variants: the other choice where the release's default looks like a mistake
VARIANTS = {
    "+norm": ("MAE with its final LayerNorm", lambda s: replace(s, final_norm=True), ("mae-vit-l",)),
    "norm": ("PE core with ln_post (the release's own 'bnorm' names)", lambda s: replace(s, final_norm=True),
             ("pe-vit-b", "pe-vit-l", "pe-vit-g")),
    "+siglip-norm": ("SigLIP's own mean / std 0.5", lambda s: replace(s, mean=HALF, std=HALF),
                     tuple(s.name for s in _SPECS if s.family == "siglip")),
}


def _with_variants(specs: list[EncoderSpec]) -> list[EncoderSpec]:
    out = []
    by_name = {s.name: s for s in specs}
    for s in specs:
        out.append(s)
        for suffix, (what, change, bases) in VARIANTS.items():
            if s.name in bases:
                out.append(replace(change(by_name[s.name]), name=s.name + suffix, note=what))
    return out


REGISTRY: dict[str, EncoderSpec] = {s.name: s for s in _with_variants(_SPECS)}
ALIASES = {"vgg16-pool4": "vgg16", "dense-sift": "sift", "hog-dense": "hog",
           **{f"cradio-vit-{k}": f"c-radio-v3-vit-{k}" for k in ("b", "l", "h", "g")}}


def get_spec(name: str) -> EncoderSpec:
    """The spec of a registered name, an alias, or a control of either (`<name>+global`, `<name>+perm`:
    controls.py)."""
    from .controls import CONTROLS, split_control

    key = ALIASES.get(name, name)
    if key in REGISTRY:
        return REGISTRY[key]
    control = split_control(key)
    if control is None:
        raise InputError(f"unknown encoder {name!r}; known: {', '.join(REGISTRY)} (and any of them + "
                         f"{' or '.join('+' + k for k in CONTROLS)})")
    base = get_spec(control[0])
    return replace(base, name=f"{base.name}+{control[1]}", family="control", arch=control[1], base=base.name,
                   note=CONTROLS[control[1]])
