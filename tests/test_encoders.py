"""Encoder registry: every name builds (tiny random-init, same architecture), keeps the
(res/16)^2 row-major token grid, stays frozen, and loads / refuses local weights."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from irepa import encoders
from irepa.encoders import hf
from irepa.encoders.base import CLIP_MEAN, CLIP_STD

README_NAMES = [
    "dino-vit-b", "dinov2-vit-b", "dinov2-vit-l", "dinov2-vit-g",
    "dinov3-vit-b16", "dinov3-vit-l16", "dinov3-vit-h16plus", "dinov3-vit-7b16",
    "webssl-vit-dino300m_full2b_224", "webssl-vit-dino1b_full2b_224", "webssl-vit-dino2b_full2b_224",
    "webssl-vit-dino3b_full2b_224", "webssl-vit-dino5b_full2b_224", "webssl-vit-dino7b_full8b_224",
    "mocov3-vit-b", "mocov3-vit-l", "clip-vit-L", "jepa-vit-h", "mae-vit-l",
    "siglip-vit-b", "siglip-vit-l", "siglip-vit-so400m",
    "siglip2-vit-b", "siglip2-vit-l", "siglip2-vit-so400m", "siglip2-vit-g",
    "pe-vit-b", "pe-vit-l", "pe-vit-g", "langpe-vit-l", "langpe-vit-g",
    "spatialpe-vit-b", "spatialpe-vit-l", "spatialpe-vit-g",
    "sam2-vit-s", "sam2-vit-b", "sam2-vit-l",
]
CLASSICAL = ["hog", "hog-patch", "sift", "sift-upright", "raw-patch", "vgg16"]
DIGITS_CNN = ["digits-cnn-l2", "digits-cnn-l4", "digits-cnn-l2-init", "digits-cnn-l4-init"]  # trained here (study)
RADIO = ["c-radio-v2-vit-b", "c-radio-v2-vit-l", "c-radio-v2-vit-h", "c-radio-v2-vit-g",
         "c-radio-v3-vit-b", "c-radio-v3-vit-l", "c-radio-v3-vit-h", "c-radio-v3-vit-g", "c-radio-v4-vit-h"]
# the other choice where the release's looks like a mistake (registry.VARIANTS)
VARIANT_NAMES = ["mae-vit-l+norm", "pe-vit-bnorm", "pe-vit-lnorm", "pe-vit-gnorm"] + [
    n + "+siglip-norm" for n in README_NAMES if n.startswith("siglip")]
ALL_NAMES = README_NAMES + RADIO + CLASSICAL + DIGITS_CNN + VARIANT_NAMES

# documented widths of the real models (the iREPA paper's encoder list and the model cards)
REAL_DIMS = {
    "dinov2-vit-b": 768, "dinov2-vit-l": 1024, "dinov2-vit-g": 1536, "dinov3-vit-7b16": 4096,
    "webssl-vit-dino2b_full2b_224": 2688, "clip-vit-L": 1024, "jepa-vit-h": 1280, "siglip-vit-so400m": 1152,
    "pe-vit-g": 1536, "siglip2-vit-so400m": 1152, "sam2-vit-s": 768, "sam2-vit-l": 1152, "hog": 128, "hog-patch": 128, "sift": 128, "vgg16": 512,
    "c-radio-v2-vit-b": 768, "c-radio-v3-vit-l": 1024, "c-radio-v3-vit-h": 1280, "c-radio-v3-vit-g": 1536,
}
RES_AT_256 = {"dinov2-vit-b": 224, "dinov3-vit-b16": 256, "clip-vit-L": 224, "siglip-vit-b": 256,
              "siglip-vit-so400m": 224, "siglip2-vit-so400m": 256, "sam2-vit-s": 512, "pe-vit-b": 256,
              "pe-vit-l": 224,
              "c-radio-v3-vit-b": 256}

_CACHE: dict[str, encoders.Encoder] = {}


def _tiny(name: str) -> encoders.Encoder:
    if name not in _CACHE:
        _CACHE[name] = encoders.build(name, tiny=True)
    return _CACHE[name]


def test_registry_lists_every_paper_encoder():
    assert set(ALL_NAMES) == set(encoders.names())  # the per-name tests below cover every name
    for name, d in REAL_DIMS.items():
        assert encoders.get_spec(name).dim == d, name
    for name, r in RES_AT_256.items():
        assert encoders.get_spec(name).resolution == r, name
    with pytest.raises(ValueError, match="unknown encoder"):
        encoders.get_spec("dinov9-vit-z")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_encoder_builds_and_keeps_the_grid(name):
    enc = _tiny(name)
    x = torch.rand(2, 3, 256, 256)
    y = enc(x)
    assert y.shape == (2, 256, enc.dim), (name, tuple(y.shape))
    assert torch.isfinite(y).all()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # frozen targets never switch to training mode


@pytest.mark.parametrize("name", ["dino-vit-b", "dinov2-vit-b", "dinov3-vit-b16", "clip-vit-L", "siglip-vit-so400m",
                                  "jepa-vit-h", "mae-vit-l", "mocov3-vit-b", "pe-vit-l", "sam2-vit-s", "hog-patch", "vgg16",
                                  "c-radio-v3-vit-b", "c-radio-v4-vit-h"])
def test_512px_gives_1024_tokens(name):
    enc = _tiny(name)
    assert enc(torch.rand(1, 3, 512, 512)).shape == (1, 1024, enc.dim)


@pytest.mark.parametrize("name", ["dinov2-vit-b", "dinov3-vit-b16", "mae-vit-l", "siglip-vit-b",
                                  "mocov3-vit-b", "pe-vit-b", "sam2-vit-s", "c-radio-v2-vit-b", "c-radio-v3-vit-b"])
def test_tokens_are_row_major(name):
    """Changing one 16 px patch changes its own token most (catches shuffles and transposes)."""
    enc = _tiny(name)
    torch.manual_seed(1)
    x = torch.rand(1, 3, 256, 256)
    x2 = x.clone()
    r, c = 3, 11
    x2[..., 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)] = 1 - x2[..., 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)]
    change = (enc(x2) - enc(x)).norm(dim=-1)[0]
    assert int(change.argmax()) == r * 16 + c


def test_prefix_tokens_dropped():
    assert _tiny("dinov3-vit-b16")._drop == 1 + 4  # CLS + 4 registers
    assert _tiny("dinov2-vit-b")._drop == 1 and _tiny("clip-vit-L")._drop == 1
    assert _tiny("siglip-vit-b")._drop == 0 and _tiny("jepa-vit-h")._drop == 0
    assert _tiny("c-radio-v3-vit-b").prefix_tokens == 8 and _tiny("c-radio-v4-vit-h").prefix_tokens == 3 + 7


def test_missing_weights_name_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as e:
        encoders.build("dinov2-vit-b")
    msg = str(e.value)
    assert str(tmp_path / "dinov2-vit-b") in msg and "facebook/dinov2-base" in msg
    assert "IREPA_ENCODER_DINOV2_VIT_B" in msg
    with pytest.raises(FileNotFoundError, match="PE-Core-G14-448.pt"):
        encoders.build("pe-vit-g")
    with pytest.raises(FileNotFoundError, match="nvidia/C-RADIOv3-B.*IREPA_ENCODER_C_RADIO_V3_VIT_B"):
        encoders.build("c-radio-v3-vit-b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encoders.build("mocov3-vit-b", weights=tmp_path / "nope.pth")
    info = encoders.info("dinov2-vit-b")
    assert info["weights_present"] is False and info["dim"] == 768 and info["resolution"] == 224
    assert encoders.info("hog")["weights_present"] is True


def test_hf_weights_load_from_local_folder(tmp_path, monkeypatch):
    src = hf.tiny_model("dinov2", patch=14).eval()
    src.save_pretrained(tmp_path / "dinov2-vit-b")
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    assert encoders.info("dinov2-vit-b")["weights_present"]
    with pytest.raises(ValueError, match="registry says 768"):
        encoders.build("dinov2-vit-b")  # a 32-wide checkpoint is not DINOv2-B
    spec = dataclasses.replace(encoders.get_spec("dinov2-vit-b"), dim=32)
    enc = hf.build_hf(spec)
    x = torch.rand(1, 3, 128, 128)
    ref = src(pixel_values=enc.preprocess(x, (8, 8))).last_hidden_state[:, 1:]
    torch.testing.assert_close(enc(x), ref)


def test_sam2_backbone_loads_from_full_model_folder(tmp_path, monkeypatch):
    import json

    from safetensors.torch import save_file
    src = hf.tiny_model("sam2").eval()
    folder = tmp_path / "sam2-vit-s"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "sam2", "vision_config": {
        "model_type": "sam2_vision_model", "backbone_config": hf.FAMILIES["sam2"].tiny}}))
    sd = {f"vision_encoder.backbone.{k}": v.contiguous() for k, v in src.state_dict().items()}
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 4)  # the rest of SAM2 is ignored
    save_file(sd, str(folder / "model.safetensors"))
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    enc = hf.build_hf(dataclasses.replace(encoders.get_spec("sam2-vit-s"), dim=64))
    x = torch.rand(1, 3, 128, 128)
    ref = src(enc.preprocess(x, (8, 8))).last_hidden_state.flatten(1, 2)
    torch.testing.assert_close(enc(x), ref)


def test_mocov3_checkpoint_layout_loads(tmp_path):
    src = _tiny("mocov3-vit-b")
    sd = {f"module.base_encoder.{k}": v for k, v in src.state_dict().items()}
    sd.update({f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in src.state_dict().items()})
    torch.save({"state_dict": sd, "epoch": 300}, tmp_path / "ckpt.pth.tar")
    enc = encoders.build("mocov3-vit-b", tiny=True, weights=tmp_path / "ckpt.pth.tar")
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(enc(x), src(x))


def test_real_size_path_builds_on_meta_and_assigns(tmp_path, monkeypatch):
    from irepa.encoders import vit
    monkeypatch.setitem(vit.MOCOV3_ARCH, "vit-b", dict(dim=32, depth=1, heads=2))
    src = vit.MoCoV3ViT("mocov3-vit-b", dim=32, depth=1, heads=2).eval()
    torch.save({"state_dict": {f"module.base_encoder.{k}": v.half() for k, v in src.state_dict().items()}},
               tmp_path / "mocov3_vitb.pth")
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    enc = encoders.build("mocov3-vit-b")  # found as $IREPA_ENCODER_DIR/<file name>
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in enc.parameters())
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(enc(x), src.half().float()(x), atol=1e-5, rtol=1e-5)


def test_pe_clip_checkpoint_takes_the_visual_tower(tmp_path):
    src = _tiny("pe-vit-b")
    sd = {f"visual.{k}": v for k, v in src.state_dict().items()}
    # the text tower reuses the names "transformer.resblocks.*": it must not leak in
    sd.update({k: torch.zeros_like(v) for k, v in src.state_dict().items() if k.startswith("transformer.")})
    torch.save(sd, tmp_path / "PE-Core-B16-224.pt")
    enc = encoders.build("pe-vit-b", tiny=True, weights=tmp_path / "PE-Core-B16-224.pt")
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(enc(x), src(x))
    bad = {k: v for k, v in sd.items() if "resblocks.1." not in k}
    torch.save(bad, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="lacks"):
        encoders.build("pe-vit-b", tiny=True, weights=tmp_path / "broken.pt")


# --------------------------------------------------------------------------------------
# C-RADIO: checkpoints in the released key layout, CPE resampling

def _radio_file(model, extra: dict | None = None, half: bool = False) -> dict:
    """Our RadioViT state dict under the names of the Hugging Face C-RADIO export."""
    sd = {}
    for k, v in model.state_dict().items():
        v = (v.half() if half else v).contiguous()
        if k.startswith("feature_normalizer."):
            sd["radio_model." + k] = v
        else:  # RADIO stores LayerScale's gamma as "grandma" on the Hub
            sd["radio_model.model." + (k[:-len("gamma")] + "grandma" if k.endswith(".gamma") else k)] = v
    sd["radio_model.input_conditioner.norm_mean"] = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    sd["radio_model.input_conditioner.norm_std"] = torch.tensor(CLIP_STD).view(3, 1, 1)
    sd["radio_model.summary_idxs"] = torch.tensor([0, 1, 2])
    sd["radio_model.adaptors.dino_v2.feat_mlp.fc1.weight"] = torch.randn(16, model.dim)  # teacher heads: ignored
    sd["radio_model.adaptors.clip.head_mlp.final.weight"] = torch.randn(8, 16)
    sd.update(extra or {})
    return sd


def _radio_reference(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """RADIO's eval forward written out from the file's own names (no shared code):
    Im2Patches + bias-free Linear, CPE (resize to max side, top-left window), cls +
    registers, timm blocks with LayerScale 'grandma', patch tokens."""
    g = lambda k: sd["radio_model.model." + k].float()  # noqa: E731
    mean = sd["radio_model.input_conditioner.norm_mean"].view(1, 3, 1, 1)
    x = (x - mean) / sd["radio_model.input_conditioner.norm_std"].view(1, 3, 1, 1)
    B, _, H, W = x.shape
    gh, gw = H // 16, W // 16
    patches = x.reshape(B, 3, gh, 16, gw, 16).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, 768)
    h = patches @ g("patch_generator.embedder.weight").T
    pos = g("patch_generator.pos_embed")
    side, D = math.isqrt(pos.shape[1]), pos.shape[2]
    pos = F.interpolate(pos.reshape(1, side, side, D).permute(0, 3, 1, 2), size=(max(gh, gw),) * 2,
                        mode="bilinear", align_corners=False)[..., :gh, :gw]
    h = h + pos.reshape(1, D, gh * gw).transpose(1, 2)
    tok = g("patch_generator.cls_token.token")
    h = torch.cat([tok.expand(B, -1, -1), h], dim=1)
    i = 0
    while f"radio_model.model.blocks.{i}.norm1.weight" in sd:
        b = lambda k: g(f"blocks.{i}.{k}")  # noqa: E731
        y = F.layer_norm(h, (D,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        q, k, v = (y @ b("attn.qkv.weight").T + b("attn.qkv.bias")).view(B, -1, 3, heads, D // heads).unbind(2)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // heads), dim=-1)
        a = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, -1, D) @ b("attn.proj.weight").T + b("attn.proj.bias")
        h = h + a * b("ls1.grandma")
        y = F.layer_norm(h, (D,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        m = F.gelu(y @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        h = h + m * b("ls2.grandma")
        i += 1
    return h[:, tok.shape[0]:]


def test_c_radio_hf_checkpoint_layout_loads(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    src = _tiny("c-radio-v3-vit-b")
    folder = tmp_path / "c-radio-v3-vit-b"
    folder.mkdir()
    sd = _radio_file(src, {"radio_model.model.reg_token": torch.zeros(1, 4, src.dim)})  # timm leftover
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    assert encoders.info("c-radio-v3-vit-b")["weights_present"]
    enc = encoders.build("c-radio-v3-vit-b", tiny=True, weights=folder)
    assert enc.prefix_tokens == 8 and isinstance(enc.blocks[0].ls1, torch.nn.Module)
    x = torch.rand(2, 3, 128, 192)  # 8 x 12 grid from the stored 8 x 8 one
    torch.testing.assert_close(enc(x), src(x))
    ref = _radio_reference(sd, x, heads=2)  # 128 x 192 needs no resize: the encoder only normalizes
    torch.testing.assert_close(enc(x), ref, atol=1e-4, rtol=1e-4)
    # the file's input conditioner wins over the registry default
    sd["radio_model.input_conditioner.norm_mean"] = torch.tensor(encoders.base.IMAGENET_MEAN).view(3, 1, 1)
    save_file(sd, str(folder / "model.safetensors"))
    enc = encoders.build("c-radio-v3-vit-b", tiny=True, weights=folder)
    assert enc.mean == pytest.approx(encoders.base.IMAGENET_MEAN)


def test_c_radio_cpe_resamples_the_position_grid():
    from irepa.encoders.radio import cpe_pos_embed
    torch.manual_seed(0)
    pos = torch.randn(1, 64, 4)  # stored 8 x 8 grid
    grid_of = lambda p, s: p.reshape(1, s, s, 4).permute(0, 3, 1, 2)  # noqa: E731
    assert cpe_pos_embed(pos, (8, 8)) is pos
    up = F.interpolate(grid_of(pos, 8), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cpe_pos_embed(pos, (16, 16)), up.flatten(2).transpose(1, 2))
    # non-square: resize to the long side, keep the top-left window (not a plain resize to 4 x 6)
    sq = F.interpolate(grid_of(pos, 8), size=(6, 6), mode="bilinear", align_corners=False)
    out = cpe_pos_embed(pos, (4, 6))
    torch.testing.assert_close(out, sq[..., :4, :].flatten(2).transpose(1, 2))
    plain = F.interpolate(grid_of(pos, 8), size=(4, 6), mode="bilinear", align_corners=False)
    assert not torch.allclose(out, plain.flatten(2).transpose(1, 2))
    # the encoder at 256 px (16 x 16 tokens) adds exactly the resampled stored 8 x 8 grid
    enc = _tiny("c-radio-v2-vit-b")
    twin = copy.deepcopy(enc)
    twin.patch_generator.pos_embed = torch.nn.Parameter(cpe_pos_embed(enc.patch_generator.pos_embed, (16, 16)))
    x = torch.rand(1, 3, 256, 256)
    torch.testing.assert_close(enc(x), twin(x))


def test_c_radio_real_size_path_on_meta(tmp_path, monkeypatch):
    """Full-size build path (meta device, assign) on a fp16 file with the optional parts:
    patch bias, final norm (args.model_norm) and the feature normalizer."""
    from safetensors.torch import save_file

    from irepa.encoders import radio
    monkeypatch.setitem(radio.RADIO_ARCH, "v2-b", radio.RadioArch(32, 1, 2, False, 8))
    torch.manual_seed(3)
    src = radio.RadioViT("c-radio-v2-vit-b", 32, 1, 2, pos_grid=8, prefix_tokens=5, patch_bias=True,
                         final_norm=True, feature_normalizer=True, mean=CLIP_MEAN, std=CLIP_STD).eval()
    src.feature_normalizer.mean.normal_()
    src.feature_normalizer.tx.copy_(torch.linalg.qr(torch.randn(32, 32))[0])
    folder = tmp_path / "c-radio-v2-vit-b"
    folder.mkdir()
    save_file(_radio_file(src, half=True), str(folder / "model.safetensors"))
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    enc = encoders.build("c-radio-v2-vit-b")
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in enc.state_dict().values())
    assert enc.prefix_tokens == 5 and isinstance(enc.norm, torch.nn.LayerNorm)
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(enc(x), src.half().float()(x), atol=1e-5, rtol=1e-5)


def test_c_radio_training_checkpoint_and_refusals(tmp_path):
    import argparse
    src = _tiny("c-radio-v3-vit-h")
    sd = {"base_model." + k: v for k, v in src.state_dict().items()}
    sd["input_conditioner.norm_mean"] = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    sd["input_conditioner.norm_std"] = torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.save({"args": argparse.Namespace(model="vit_huge_patch16_224", cpe_max_size=2048), "state_dict": sd},
               tmp_path / "c-radio_v3-h_half.pth.tar")
    enc = encoders.build("c-radio-v3-vit-h", tiny=True, weights=tmp_path / "c-radio_v3-h_half.pth.tar")
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(enc(x), src(x))
    bad = dict(sd, **{"base_model.blocks.0.mlp.norm.weight": torch.ones(64)})  # RADIO v1's MLP norm
    torch.save({"state_dict": bad}, tmp_path / "other.pth.tar")
    with pytest.raises(ValueError, match="does not use"):
        encoders.build("c-radio-v3-vit-h", tiny=True, weights=tmp_path / "other.pth.tar")
    torch.save({"state_dict": {k: v for k, v in sd.items() if ".1." not in k}}, tmp_path / "short.pth.tar")
    with pytest.raises(ValueError, match="lacks"):
        encoders.build("c-radio-v3-vit-h", tiny=True, weights=tmp_path / "short.pth.tar")
    torch.save({"state_dict": {"blocks.0.norm1.weight": torch.ones(4)}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not a C-RADIO ViT checkpoint"):
        encoders.build("c-radio-v3-vit-h", tiny=True, weights=tmp_path / "foreign.pth")


def test_launcher_lists_encoders(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "launch" / "encoders.py"
    spec = importlib.util.spec_from_file_location("launch_encoders", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.list_encoders()
    out = capsys.readouterr().out
    assert "dinov2-vit-b" in out and "hog" in out and "1536" in out and "c-radio-v3-vit-g" in out
