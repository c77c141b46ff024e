"""Encoder registry: every name builds (tiny random-init, same architecture), keeps the
(res/16)^2 row-major token grid, stays frozen, and loads / refuses local weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from irepa import encoders
from irepa.encoders import hf

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
CLASSICAL = ["hog", "sift", "vgg16"]

# documented widths of the real models (SPEC.md section 7 and the model cards)
REAL_DIMS = {
    "dinov2-vit-b": 768, "dinov2-vit-l": 1024, "dinov2-vit-g": 1536, "dinov3-vit-7b16": 4096,
    "webssl-vit-dino2b_full2b_224": 2688, "clip-vit-L": 1024, "jepa-vit-h": 1280, "siglip-vit-so400m": 1152,
    "pe-vit-g": 1536, "sam2-vit-s": 768, "sam2-vit-l": 1152, "hog": 128, "sift": 128, "vgg16": 512,
}
RES_AT_256 = {"dinov2-vit-b": 224, "dinov3-vit-b16": 256, "clip-vit-L": 224, "siglip-vit-b": 256,
              "siglip-vit-so400m": 224, "sam2-vit-s": 512, "pe-vit-b": 256, "pe-vit-l": 224}

_CACHE: dict[str, encoders.Encoder] = {}


def _tiny(name: str) -> encoders.Encoder:
    if name not in _CACHE:
        _CACHE[name] = encoders.build(name, tiny=True)
    return _CACHE[name]


def test_registry_lists_every_paper_encoder():
    assert set(README_NAMES + CLASSICAL) <= set(encoders.names())
    for name, d in REAL_DIMS.items():
        assert encoders.get_spec(name).dim == d, name
    for name, r in RES_AT_256.items():
        assert encoders.get_spec(name).resolution == r, name
    with pytest.raises(ValueError, match="unknown encoder"):
        encoders.get_spec("dinov9-vit-z")


@pytest.mark.parametrize("name", README_NAMES + CLASSICAL)
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
                                  "jepa-vit-h", "mae-vit-l", "mocov3-vit-b", "pe-vit-l", "sam2-vit-s", "hog", "vgg16"])
def test_512px_gives_1024_tokens(name):
    enc = _tiny(name)
    assert enc(torch.rand(1, 3, 512, 512)).shape == (1, 1024, enc.dim)


@pytest.mark.parametrize("name", ["dinov2-vit-b", "dinov3-vit-b16", "mae-vit-l", "siglip-vit-b",
                                  "mocov3-vit-b", "pe-vit-b", "sam2-vit-s"])
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


def test_launcher_lists_encoders(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "launch" / "encoders.py"
    spec = importlib.util.spec_from_file_location("launch_encoders", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.list_encoders()
    out = capsys.readouterr().out
    assert "dinov2-vit-b" in out and "hog" in out and "1536" in out
