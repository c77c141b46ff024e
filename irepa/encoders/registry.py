"""Every encoder the paper studies (the reference README's list) plus classical features.

`patch` is the encoder-input size of one output token: the encoder sees
(H/16 * patch) px for an H px model input, so at 256 px DINOv2 (14 px patches) runs at
224, SigLIP-B at 256, SAM2 (stride-32 last stage) at 512 (SPEC.md section 7). `dim` is
the real model's token width; tiny test variants (`build(name, tiny=True)`) have the
same architecture with small widths. `source` is the Hugging Face repo id (looked up in
the local cache only) or the checkpoint file name.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    family: str            # builder: a transformers family (hf.FAMILIES), "mocov3", "pe", "radio", "hog", "sift", "vgg16"
    dim: int               # token width E of the real model
    patch: int             # encoder input pixels per token (input = grid * patch)
    source: str | None     # Hugging Face repo id, or a checkpoint file name, or None (weight free)
    mean: tuple | None = IMAGENET_MEAN
    std: tuple | None = IMAGENET_STD
    interpolation: str = "bicubic"
    arch: str = ""         # architecture size key for our own implementations (vit.py, radio.py)
    note: str = ""

    @property
    def resolution(self) -> int:
        """Encoder input size at the 256 px model resolution."""
        return 16 * self.patch

    @property
    def needs_weights(self) -> bool:
        return self.family not in ("hog", "sift")


def _s(*a, **k) -> EncoderSpec:
    return EncoderSpec(*a, **k)


_SPECS = [
    _s("dino-vit-b", "vit", 768, 16, "facebook/dino-vitb16", note="DINO v1 ViT-B/16, final LN"),
    _s("dinov2-vit-b", "dinov2", 768, 14, "facebook/dinov2-base", note="normalized patch tokens"),
    _s("dinov2-vit-l", "dinov2", 1024, 14, "facebook/dinov2-large"),
    _s("dinov2-vit-g", "dinov2", 1536, 14, "facebook/dinov2-giant"),
    _s("dinov3-vit-b16", "dinov3", 768, 16, "facebook/dinov3-vitb16-pretrain-lvd1689m", note="RoPE, 4 registers dropped"),
    _s("dinov3-vit-l16", "dinov3", 1024, 16, "facebook/dinov3-vitl16-pretrain-lvd1689m"),
    _s("dinov3-vit-h16plus", "dinov3", 1280, 16, "facebook/dinov3-vith16plus-pretrain-lvd1689m"),
    _s("dinov3-vit-7b16", "dinov3", 4096, 16, "facebook/dinov3-vit7b16-pretrain-lvd1689m"),
    _s("webssl-vit-dino300m_full2b_224", "dinov2", 1024, 14, "facebook/webssl-dino300m-full2b-224"),
    _s("webssl-vit-dino1b_full2b_224", "dinov2", 1536, 14, "facebook/webssl-dino1b-full2b-224"),
    _s("webssl-vit-dino2b_full2b_224", "dinov2", 2688, 14, "facebook/webssl-dino2b-full2b-224"),
    _s("webssl-vit-dino3b_full2b_224", "dinov2", 3072, 14, "facebook/webssl-dino3b-full2b-224"),
    _s("webssl-vit-dino5b_full2b_224", "dinov2", 3584, 14, "facebook/webssl-dino5b-full2b-224"),
    _s("webssl-vit-dino7b_full8b_224", "dinov2", 4096, 14, "facebook/webssl-dino7b-full8b-224"),
    _s("mocov3-vit-b", "mocov3", 768, 16, "mocov3_vitb.pth", arch="vit-b", note="MoCo v3 base_encoder, timm keys"),
    _s("mocov3-vit-l", "mocov3", 1024, 16, "mocov3_vitl.pth", arch="vit-l"),
    _s("clip-vit-L", "clip", 1024, 14, "openai/clip-vit-large-patch14", CLIP_MEAN, CLIP_STD,
       note="last layer before post-LN / projection"),
    _s("jepa-vit-h", "ijepa", 1280, 14, "facebook/ijepa_vith14_1k"),
    _s("mae-vit-l", "mae", 1024, 16, "facebook/vit-mae-large", note="mask ratio 0, grid order kept"),
    _s("siglip-vit-b", "siglip", 768, 16, "google/siglip-base-patch16-256", HALF, HALF),
    _s("siglip-vit-l", "siglip", 1024, 16, "google/siglip-large-patch16-256", HALF, HALF),
    _s("siglip-vit-so400m", "siglip", 1152, 14, "google/siglip-so400m-patch14-224", HALF, HALF),
    _s("siglip2-vit-b", "siglip", 768, 16, "google/siglip2-base-patch16-256", HALF, HALF,
       note="fixed-resolution SigLIP2 checkpoints use the SigLIP architecture"),
    _s("siglip2-vit-l", "siglip", 1024, 16, "google/siglip2-large-patch16-256", HALF, HALF),
    _s("siglip2-vit-so400m", "siglip", 1152, 14, "google/siglip2-so400m-patch14-224", HALF, HALF),
    _s("siglip2-vit-g", "siglip", 1536, 16, "google/siglip2-giant-opt-patch16-256", HALF, HALF),
    _s("pe-vit-b", "pe", 768, 16, "PE-Core-B16-224.pt", HALF, HALF, "bilinear", arch="core-b16"),
    _s("pe-vit-l", "pe", 1024, 14, "PE-Core-L14-336.pt", HALF, HALF, "bilinear", arch="core-l14"),
    _s("pe-vit-g", "pe", 1536, 14, "PE-Core-G14-448.pt", HALF, HALF, "bilinear", arch="core-g14"),
    _s("langpe-vit-l", "pe", 1024, 14, "PE-Lang-L14-448.pt", HALF, HALF, "bilinear", arch="lang-l14"),
    _s("langpe-vit-g", "pe", 1536, 14, "PE-Lang-G14-448.pt", HALF, HALF, "bilinear", arch="lang-g14"),
    _s("spatialpe-vit-b", "pe", 768, 16, "PE-Spatial-B16-512.pt", HALF, HALF, "bilinear", arch="spatial-b16"),
    _s("spatialpe-vit-l", "pe", 1024, 14, "PE-Spatial-L14-448.pt", HALF, HALF, "bilinear", arch="spatial-l14"),
    _s("spatialpe-vit-g", "pe", 1536, 14, "PE-Spatial-G14-448.pt", HALF, HALF, "bilinear", arch="spatial-g14"),
    _s("sam2-vit-s", "sam2", 768, 32, "facebook/sam2.1-hiera-small", interpolation="bilinear",
       note="Hiera last stage (stride 32) at 2x input"),
    _s("sam2-vit-b", "sam2", 896, 32, "facebook/sam2.1-hiera-base-plus", interpolation="bilinear"),
    _s("sam2-vit-l", "sam2", 1152, 32, "facebook/sam2.1-hiera-large", interpolation="bilinear"),
    # C-RADIO (radio.py): CLIP conditioner, 16 px patches, CPE grid resampled, cls + registers dropped
    _s("c-radio-v2-vit-b", "radio", 768, 16, "nvidia/C-RADIOv2-B", CLIP_MEAN, CLIP_STD, arch="v2-b",
       note="C-RADIOv2 ViT-B/16, CPE 128x128, no final norm"),
    _s("c-radio-v2-vit-l", "radio", 1024, 16, "nvidia/C-RADIOv2-L", CLIP_MEAN, CLIP_STD, arch="v2-l"),
    _s("c-radio-v2-vit-h", "radio", 1280, 16, "nvidia/C-RADIOv2-H", CLIP_MEAN, CLIP_STD, arch="v2-h"),
    _s("c-radio-v2-vit-g", "radio", 1536, 16, "nvidia/C-RADIOv2-g", CLIP_MEAN, CLIP_STD, arch="v2-g"),
    _s("c-radio-v3-vit-b", "radio", 768, 16, "nvidia/C-RADIOv3-B", CLIP_MEAN, CLIP_STD, arch="v3-b",
       note="C-RADIOv3 ViT-B/16 with LayerScale"),
    _s("c-radio-v3-vit-l", "radio", 1024, 16, "nvidia/C-RADIOv3-L", CLIP_MEAN, CLIP_STD, arch="v3-l"),
    _s("c-radio-v3-vit-h", "radio", 1280, 16, "nvidia/C-RADIOv3-H", CLIP_MEAN, CLIP_STD, arch="v3-h"),
    _s("c-radio-v3-vit-g", "radio", 1536, 16, "nvidia/C-RADIOv3-g", CLIP_MEAN, CLIP_STD, arch="v3-g"),
    _s("c-radio-v4-vit-h", "radio", 1280, 16, "nvidia/C-RADIOv4-H", CLIP_MEAN, CLIP_STD, arch="v4-h",
       note="3 cls + 7 register tokens dropped"),
    _s("hog", "hog", 128, 16, None, None, None, note="4x4 cells x 8 orientations, L2-Hys, weight free"),
    _s("sift", "sift", 128, 16, None, None, None, note="dense upright SIFT, 16 px grid, weight free"),
    _s("vgg16", "vgg16", 512, 16, "vgg16-397923af.pth", note="conv1_1..pool4, torchvision weights file"),
]

REGISTRY: dict[str, EncoderSpec] = {s.name: s for s in _SPECS}
ALIASES = {"vgg16-pool4": "vgg16", "dense-sift": "sift"}


def get_spec(name: str) -> EncoderSpec:
    key = ALIASES.get(name, name)
    if key not in REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key]
