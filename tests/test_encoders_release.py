"""Each encoder computes the tokens of the official iREPA release (issue 19).

What these tests stand for: a side-by-side run outside the project fed the same raw
pixels (scikit-image's astronaut and coffee, 256 and 512 px) into End2End-Diffusion/iREPA
@99ad4ac (jit/vision_encoder.py `create_encoder -> preprocess -> forward_features`, with
timm 1.0.17, transformers 4.56.1, kornia 0.8.1, scikit-image; DINO / DINOv2 / CLIP from
their repositories) and into `irepa.encoders.build(name, weights=...)`, with seeded
random weights saved in each official checkpoint format. After the fixes every compared
encoder agrees to fp32 round-off (max rel <= 1.1e-7 .. 7.6e-7, most exactly 0). The tests
here stand alone: each pins one cause found there against an independent reference
(Pillow's bicubic for timm's antialiased resample, numpy resizes for F.interpolate,
scikit-image's hog, explicit constants), on tiny random models, and fails if that cause
is reintroduced.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irepa import encoders
from irepa.encoders import hf, vit
from irepa.encoders.base import release_pos_embed, resample_pos_embed

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

_CACHE: dict[str, encoders.Encoder] = {}


def _tiny(name: str) -> encoders.Encoder:
    if name not in _CACHE:
        _CACHE[name] = encoders.build(name, tiny=True)
    return _CACHE[name]


def _image(size: int, batch: int = 1) -> torch.Tensor:
    """Real 8-bit pixels in [0, 1]: scikit-image's astronaut, box-averaged to `size`."""
    from skimage import data
    a = torch.from_numpy(data.astronaut()).permute(2, 0, 1).double()[None] / 255  # 512 px
    if size != 512:
        a = F.avg_pool2d(a, 512 // size)
    return (a * 255).round().float().div(255).expand(batch, -1, -1, -1).contiguous()


# --------------------------------------------------------------------------------------
# independent references

def _pil_bicubic(grid_CHW: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's BICUBIC (a = -0.5, antialiased) per channel: what timm's
    resample_abs_pos_embed computes through torch's antialias=True (checked to 5e-7)."""
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize(size[::-1], Image.BICUBIC))
                     for c in grid_CHW])


def _pil_table(pos_1TD: torch.Tensor, prefix: int, sides: list[int]) -> torch.Tensor:
    """Position table resampled through each side in turn with Pillow, prefix rows kept."""
    extra, p = pos_1TD[:, :prefix], pos_1TD[0, prefix:]
    side = math.isqrt(p.shape[0])
    g = p.T.reshape(-1, side, side).double().numpy()
    for s in sides:
        if s != g.shape[-1]:
            g = _pil_bicubic(g, (s, s))
    t = torch.from_numpy(np.ascontiguousarray(g)).reshape(g.shape[0], -1).T[None].to(pos_1TD.dtype)
    return torch.cat([extra, t], dim=1)


def _keys_cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def _resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """[n_out, n_in] weights of torch's plain (no antialias, align_corners False) resize."""
    M = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        if mode == "bilinear":
            src = max(src, 0.0)
            i0 = int(np.floor(src))
            lam = src - i0
            M[i, min(i0, n_in - 1)] += 1 - lam
            M[i, min(i0 + 1, n_in - 1)] += lam
        else:  # Keys cubic, taps clamped to the border
            i0 = int(np.floor(src))
            for k in range(-1, 3):
                M[i, min(max(i0 + k, 0), n_in - 1)] += _keys_cubic(src - (i0 + k))
    return M


def _resize_ref(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    Mh, Mw = _resize_matrix(x.shape[-2], size[0], mode), _resize_matrix(x.shape[-1], size[1], mode)
    return torch.from_numpy(Mh @ x.double().numpy() @ Mw.T)


def _normalize_ref(x: torch.Tensor, stats) -> torch.Tensor:
    mean, std = (torch.tensor(v, dtype=x.dtype).view(1, 3, 1, 1) for v in stats)
    return (x - mean) / std


# --------------------------------------------------------------------------------------
# position embeddings: timm's antialiased bicubic, once or via 16 x 16

@pytest.mark.parametrize("src,dst", [(14, 16), (8, 16), (16, 32), (37, 16)])
def test_release_pos_resample_is_pillow_bicubic(src, dst):
    """timm's resample_abs_pos_embed (bicubic, antialias; the release resizes MoCo v3's,
    MAE's, DINO's, DINOv2's, I-JEPA's and CLIP's tables with it at load) equals Pillow's
    BICUBIC; plain bicubic (what the encoders did at run time before) is far from it."""
    torch.manual_seed(src)
    pos = torch.randn(1, 1 + src * src, 6)
    ours = release_pos_embed(pos, (dst, dst), prefix=1, rule="timm")
    ref = _pil_table(pos, 1, [dst])
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    plain = resample_pos_embed(pos, (dst, dst), prefix=1, mode="bicubic")
    assert (plain - ref).abs().max() > 1e-2
    # "timm@16" (MoCo v3, MAE): the checkpoint's table to 16 x 16 first, then to the grid
    two = release_pos_embed(pos, (dst, dst), prefix=1, rule="timm@16")
    torch.testing.assert_close(two, _pil_table(pos, 1, [16, dst]), atol=2e-6, rtol=0)


def _hf_twin(enc, table_1TD: torch.Tensor) -> encoders.Encoder:
    """The same encoder whose stored position table is `table` (so no resize is needed
    when the table already has the input's grid)."""
    twin = copy.deepcopy(enc)
    emb = hf._embeddings(twin.model)
    if hasattr(emb, "position_embeddings"):
        emb.position_embeddings.data = table_1TD.clone()
    else:
        emb.position_embedding.weight.data = table_1TD[0].clone()
        emb.register_buffer("position_ids", torch.arange(table_1TD.shape[1])[None], persistent=False)
    return twin


# (name, rule): every transformers family with an absolute table; tiny models store 8 x 8
HF_POS = [("dino-vit-b", "timm"), ("dinov2-vit-b", "timm"), ("clip-vit-L", "timm"), ("jepa-vit-h", "timm"),
          ("mae-vit-l", "timm@16"), ("webssl-vit-dino300m_full2b_224", "hf"), ("siglip-vit-b", "hf")]


@pytest.mark.parametrize("res", [256, 512])
@pytest.mark.parametrize("name,rule", HF_POS)
def test_hf_position_tables_follow_the_release(name, rule, res):
    """The tokens equal those of a twin holding the table the release would use at this
    grid: Pillow's bicubic of the stored 8 x 8 table for "timm" (DINO, DINOv2, CLIP,
    I-JEPA: resampled once at load), via 16 x 16 for "timm@16" (MAE), and transformers'
    plain run-time bicubic for "hf" (WebSSL and SigLIP load through transformers)."""
    assert encoders.get_spec(name).pos == rule
    enc = _tiny(name)
    grid = res // 16
    prefix = enc._pos_prefix()
    stored = hf._stored_pos(hf._embeddings(enc.model)).detach()
    if rule == "timm":
        table = _pil_table(stored, prefix, [grid])
    elif rule == "timm@16":
        table = _pil_table(stored, prefix, [16])
    else:
        side = math.isqrt(stored.shape[1] - prefix)
        g = stored[0, prefix:].T.reshape(1, -1, side, side)
        g = _resize_ref(g, (grid, grid), "bicubic").float()
        table = torch.cat([stored[:, :prefix], g.reshape(1, -1, grid * grid).transpose(1, 2)], dim=1)
    twin = _hf_twin(enc, table)
    x = _image(res)
    torch.testing.assert_close(enc(x), twin(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("res", [256, 512])
def test_mocov3_position_table_goes_through_16(res):
    """MoCo v3: fix_mocov3_state_dict resamples the file's table to 16 x 16 (timm), the
    encoder then to the run's grid: a twin holding Pillow's 8 -> 16 table gives the same
    tokens at 256 and 512 (one step 8 -> 32, or plain bicubic, would not)."""
    enc = _tiny("mocov3-vit-b")
    twin = copy.deepcopy(enc)
    twin.pos_embed.data = _pil_table(enc.pos_embed.detach(), 1, [16])
    x = _image(res)
    torch.testing.assert_close(enc(x), twin(x), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# final norms, LayerNorm eps, LayerScale, checkpoint keys

def _hf_blocks(model):
    """The transformer blocks of a transformers backbone (layout differs by model/version)."""
    for path in ("layers", "encoder.layer", "encoder.layers", "vision_model.encoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise AttributeError(f"no block list in {type(model).__name__}")


def _last_block_output(module_list, enc, x):
    seen = {}
    h = module_list[-1].register_forward_hook(lambda m, i, o: seen.setdefault("y", o[0] if isinstance(o, tuple) else o))
    try:
        enc(x)
    finally:
        h.remove()
    return seen["y"]


def test_mae_skips_its_final_layernorm_unless_asked():
    """The release's MAE forward_features stops after the blocks (no final norm);
    "mae-vit-l+norm" applies the model's LayerNorm."""
    enc, normed = _tiny("mae-vit-l"), _tiny("mae-vit-l+norm")
    x = _image(256)
    y = _last_block_output(_hf_blocks(enc.model), enc, x)[:, 1:]
    torch.testing.assert_close(enc(x), y)
    assert encoders.get_spec("mae-vit-l").final_norm is False
    ln = normed.final_norm
    assert isinstance(ln, torch.nn.LayerNorm)
    torch.testing.assert_close(normed(x), ln(_last_block_output(_hf_blocks(normed.model), normed, x))[:, 1:])
    assert (normed(x) - enc(x)).abs().max() > 0.1


@pytest.mark.parametrize("name,norm", [("pe-vit-b", False), ("pe-vit-bnorm", True), ("pe-vit-l", False),
                                       ("pe-vit-gnorm", True)])
def test_pe_core_ln_post_only_for_norm_names(name, norm):
    """The release calls forward_features(norm=name.endswith("norm")): PE core tokens
    skip ln_post unless the name ends in "norm" (pe-vit-bnorm, the release's own name)."""
    enc = _tiny(name)
    x = _image(256)
    y = _last_block_output(enc.transformer.resblocks, enc, x)
    if norm:
        y = enc.ln_post(y)
    torch.testing.assert_close(enc(x), y[:, int(enc.arch.cls):])


def test_clip_tokens_are_before_post_layernorm():
    """The release's CLIP forward stops after the transformer (ln_post commented out)."""
    enc = _tiny("clip-vit-L")
    x = _image(256)
    torch.testing.assert_close(enc(x), _last_block_output(_hf_blocks(enc.model), enc, x)[:, 1:])


@pytest.mark.parametrize("name", ["dino-vit-b", "mae-vit-l", "jepa-vit-h", "dinov2-vit-b"])
def test_layernorm_eps_of_the_original_models(tmp_path, monkeypatch, name):
    """DINO, MAE and I-JEPA as the release builds them use LayerNorm eps 1e-6; a Hub
    config that says 1e-12 (vit-mae-large's) is overridden when the folder is loaded."""
    family = encoders.get_spec(name).family
    src = hf.tiny_model(family, encoders.get_spec(name).patch, layer_norm_eps=1e-12)
    src.save_pretrained(tmp_path / name)
    spec = encoders.get_spec(name)
    enc = hf.build_hf(type(spec)(**{**spec.__dict__, "dim": 32}), weights=tmp_path / name)
    eps = {m.eps for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}, eps


@pytest.mark.parametrize("name,layer_scale", [("spatialpe-vit-b", False), ("spatialpe-vit-l", False),
                                              ("spatialpe-vit-g", True), ("langpe-vit-l", True),
                                              ("pe-vit-b", False)])
def test_pe_layerscale_as_in_the_release_configs(tmp_path, name, layer_scale):
    """pe_config.py: "No layerscale on the smaller spatial models"; Lang L/G and Spatial G
    carry ls_1 / ls_2. A file in the released layout (ls keys only where the config has
    them) loads strictly."""
    enc = _tiny(name)
    has = any(".ls_1." in k for k in enc.state_dict())
    assert has == layer_scale
    sd = {k: v for k, v in enc.state_dict().items()}
    torch.save(sd, tmp_path / "pe.pt")
    again = encoders.build(name, tiny=True, weights=tmp_path / "pe.pt")
    x = _image(256)
    torch.testing.assert_close(again(x), enc(x))


def test_mocov3_vit_l_misspelt_keys_are_renamed(tmp_path, monkeypatch):
    """The released ViT-L file spells blocks.13.norm1 / mlp.fc1 as norm13 / fc13 and
    blocks.14.norm2 / mlp.fc2 as norm14 / fc14; the release's fix_mocov3_state_dict
    renames them, and so does our loader (it refused the file before)."""
    monkeypatch.setitem(vit.MOCOV3_ARCH, "vit-l", dict(dim=32, depth=15, heads=2))
    torch.manual_seed(0)
    src = vit.MoCoV3ViT("mocov3-vit-l", dim=32, depth=15, heads=2).eval()
    typos = {"blocks.13.norm1.": "blocks.13.norm13.", "blocks.13.mlp.fc1.": "blocks.13.mlp.fc13.",
             "blocks.14.norm2.": "blocks.14.norm14.", "blocks.14.mlp.fc2.": "blocks.14.mlp.fc14."}
    sd = {}
    for k, v in src.state_dict().items():
        for good, bad in typos.items():
            k = k.replace(good, bad)
        sd["module.base_encoder." + k] = v
    assert "module.base_encoder.blocks.14.mlp.fc14.weight" in sd
    torch.save({"state_dict": sd}, tmp_path / "mocov3_vitl.pth")
    enc = encoders.build("mocov3-vit-l", weights=tmp_path / "mocov3_vitl.pth")
    x = _image(128)
    torch.testing.assert_close(enc(x), src(x))


# --------------------------------------------------------------------------------------
# image resize and normalization

# name -> (encoder input at 256 px, resize mode, normalization, normalize before resizing)
PREPROCESS = {
    "dinov2-vit-b": (224, "bicubic", IMAGENET), "webssl-vit-dino300m_full2b_224": (224, "bicubic", IMAGENET),
    "jepa-vit-h": (224, "bicubic", IMAGENET), "clip-vit-L": (224, "bicubic", CLIP),
    "siglip-vit-so400m": (224, "bicubic", IMAGENET), "siglip-vit-b": (256, None, IMAGENET),
    "siglip2-vit-so400m": (256, None, IMAGENET), "siglip-vit-so400m+siglip-norm": (224, "bicubic", HALF),
    "pe-vit-l": (224, "bilinear", HALF), "spatialpe-vit-g": (224, "bilinear", HALF), "pe-vit-b": (256, None, HALF),
    "sam2-vit-s": (512, "bicubic", IMAGENET), "mocov3-vit-b": (256, None, IMAGENET),
    "mae-vit-l": (256, None, IMAGENET), "dino-vit-b": (256, None, IMAGENET), "dinov3-vit-b16": (256, None, IMAGENET),
    "vgg16": (256, None, IMAGENET), "c-radio-v3-vit-b": (256, None, CLIP),
}


@pytest.mark.parametrize("res", [256, 512])
@pytest.mark.parametrize("name", list(PREPROCESS))
def test_preprocess_resizes_and_normalizes_as_the_release(name, res):
    """The release resizes with plain F.interpolate (bicubic for DINOv2, WebSSL, I-JEPA,
    CLIP, SigLIP, SAM2; bilinear for PE; no antialias: an antialiased resize moved
    WebSSL's tokens by 0.12) and normalizes with ImageNet statistics for SigLIP too
    (0.5 / 0.5 only for "+siglip-norm"). Reference: a numpy resize of the same kernel."""
    size, mode, stats = PREPROCESS[name]
    size = size * res // 256
    enc = _tiny(name)
    x = _image(res)
    ours = enc.preprocess(x, (res // 16, res // 16)).double()
    ref = x.double() if mode is None else _resize_ref(x, (size, size), mode)
    assert ours.shape[-1] == size
    # torch resizes in fp32 (coordinates too): 1e-5 of the [0, 1] range; an antialiased
    # resize or other statistics differ by 1e-2 and more
    torch.testing.assert_close(ours, _normalize_ref(ref, stats), atol=3e-4, rtol=0)


def test_siglip2_so400m_is_the_patch16_256_checkpoint():
    """The release's SigLIP2 map: so400m -> google/siglip2-so400m-patch16-256."""
    spec = encoders.get_spec("siglip2-vit-so400m")
    assert spec.source == "google/siglip2-so400m-patch16-256" and spec.patch == 16 and spec.resolution == 256
    assert encoders.get_spec("siglip-vit-so400m").source == "google/siglip-so400m-patch14-224"
    assert encoders.get_spec("sam2-vit-s").source == "facebook/sam2-hiera-small"
    assert encoders.get_spec("cradio-vit-b").name == "c-radio-v3-vit-b"  # the release's C-RADIO names


# --------------------------------------------------------------------------------------
# classical: the release's HOG (scikit-image) and SIFT (kornia)

@pytest.mark.parametrize("res", [256, 512])
def test_dense_hog_is_the_release_scikit_image_hog(res):
    """hog = the release's HOGVisionEncoder (g{res/16}_d128): scikit-image
    hog(orientations=8, pixels_per_cell=(2, 2), cells_per_block=(4, 4), L2-Hys) of the
    float32 BT.709 gray image, every block L2-normalized, bilinear (plain) to the grid.
    Side by side with the release: max rel 1.1e-7 (256) / 8.3e-8 (512)."""
    from skimage.feature import hog
    x = _image(res)
    v = (x[0] * 255).permute(1, 2, 0).numpy()
    gray = ((0.2126 * v[..., 0] + 0.7152 * v[..., 1] + 0.0722 * v[..., 2]) / 255.0).clip(0, 1).astype(np.float32)
    blocks = hog(gray, orientations=8, pixels_per_cell=(2, 2), cells_per_block=(4, 4), transform_sqrt=False,
                 feature_vector=False, block_norm="L2-Hys")
    b = torch.from_numpy(blocks.reshape(blocks.shape[0], blocks.shape[1], 128).astype(np.float32))
    b = F.normalize(b, dim=-1).permute(2, 0, 1)[None]
    ref = _resize_ref(b, (res // 16, res // 16), "bilinear").float().flatten(2).transpose(1, 2)
    out = encoders.build("hog")(x)
    torch.testing.assert_close(encoders.build("hog-dense")(x), out, atol=0, rtol=0)  # the old name: an alias
    assert out.shape == (1, (res // 16) ** 2, 128)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_patch_hog_is_not_the_release_hog():
    """"hog-patch" (ours, the digits presets' target: 4 px cells, one block per patch) is
    another feature than the release's "hog"."""
    x = _image(256)
    a, b = encoders.build("hog-patch")(x), encoders.build("hog")(x)
    assert a.shape == b.shape and (a - b).abs().max() > 0.1


def test_sift_is_the_release_kornia_pipeline():
    """"sift" = the release's SIFTEncoder: keypoints at (8 + 16 j, 8 + 16 i), scale 16,
    LAFOrienter(20) dominant orientation, 41 px patches from the pyramid, kornia 0.8.1's
    SIFTDescriptor(41, 8, 4, rootsift=False, clipval=0.2), L2 normalized; gray = kornia's
    rgb_to_grayscale. Written out here with the release's parameters (side by side with
    the release: exactly equal)."""
    kornia = pytest.importorskip("kornia")
    import kornia.feature as KF
    if kornia.__version__ != "0.8.1":
        with pytest.raises(RuntimeError, match="0.8.1"):
            encoders.build("sift")
        pytest.skip(f"kornia {kornia.__version__} is not the release's 0.8.1")
    x = torch.cat([_image(128), _image(128).flip(-1)])  # 8 x 8 keypoints each
    out = encoders.build("sift")(x)
    gray = kornia.color.rgb_to_grayscale(x)
    c = torch.arange(8, 128, 16, dtype=torch.float32)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    centers = torch.stack([xx.flatten(), yy.flatten()], -1)[None].expand(2, -1, -1)
    lafs = KF.laf_from_center_scale_ori(centers, torch.full((2, 64, 1, 1), 16.0), torch.zeros(2, 64, 1))
    lafs = KF.LAFOrienter(20)(lafs, gray)
    patches = KF.extract_patches_from_pyramid(gray, lafs, PS=41).reshape(-1, 1, 41, 41)
    desc = KF.SIFTDescriptor(41, 8, 4, rootsift=False, clipval=0.2)(patches).view(2, 64, 128)
    torch.testing.assert_close(out, F.normalize(desc, dim=-1))


def test_sift_refuses_other_kornia_versions(monkeypatch):
    pytest.importorskip("kornia")
    import kornia
    monkeypatch.setattr(kornia, "__version__", "0.9.0")
    with pytest.raises(RuntimeError, match="kornia==0.8.1"):
        encoders.build("sift")


# --------------------------------------------------------------------------------------
# the encoder table of docs/encoders.md comes from the registry

def test_readme_encoder_table_is_generated():
    """docs/encoders.md holds exactly `table_markdown()` between its markers; regenerate with
    `python launch/encoders.py table --markdown`."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "docs" / "encoders.md").read_text()
    start, end = "<!-- encoders-table:start -->\n", "<!-- encoders-table:end -->"
    assert start in readme and end in readme
    body = readme[readme.index(start) + len(start):readme.index(end)]
    assert body == encoders.table_markdown(), "docs/encoders.md table is stale: python launch/encoders.py table --markdown"
    rows = encoders.table()
    assert [r["name"] for r in rows] == encoders.names()
    by = {r["name"]: r for r in rows}
    assert by["siglip-vit-b"]["normalization"] == "ImageNet" and by["mae-vit-l"]["final norm"] == "no"
    assert by["dinov2-vit-b"]["resize"] == "bicubic" and by["dinov2-vit-b"]["input"] == 224
