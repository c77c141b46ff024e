"""REPA-E's VAE, LPIPS, discriminator and VAE losses (irepa.autoencoder).

Compared against: diffusers' own LDM->diffusers converter (key mapping), hand-written
formulas (L1, KL, hinge, LPIPS computed layer by layer in float64 with F.conv2d), and
file layouts written as the reference releases them. A side-by-side run of REPA-E's
loss module on the same inputs (outside the project) agreed bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from irepa.autoencoder.discriminator import PatchDiscriminator, build_discriminator
from irepa.autoencoder.losses import VAELossConfig, discriminator_loss, generator_loss, hinge_d_loss
from irepa.autoencoder.lpips import LPIPS, TAPS, build_lpips
from irepa.autoencoder.sdvae import (SDVAE_TINY, Posterior, build_sdvae, diffusers_to_ldm, ldm_to_diffusers,
                                     load_sdvae)
from irepa.encoders.classical import VGG16_RELU5_3


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    vae = build_sdvae("tiny").eval()
    with torch.no_grad():  # non-trivial GroupNorm affines, so a swapped norm key would show
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def test_ldm_mapping_matches_diffusers_converter(tiny_vae):
    """Our diffusers->LDM layout, converted back by diffusers' own single-file converter, is the original."""
    conv = pytest.importorskip("diffusers.loaders.single_file_utils").convert_ldm_vae_checkpoint
    sd = tiny_vae.state_dict()
    ldm = diffusers_to_ldm(sd)
    assert any(k.startswith("decoder.up.0.block.") for k in ldm) and "encoder.mid.attn_1.q.weight" in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].dim() == 4
    theirs = conv({"first_stage_model." + k: v for k, v in ldm.items()}, dict(SDVAE_TINY))
    assert set(theirs) == set(sd)
    for k in sd:
        assert torch.equal(theirs[k].reshape(sd[k].shape), sd[k]), k
    mine = ldm_to_diffusers(ldm)
    assert set(mine) == set(sd) and all(torch.equal(mine[k], sd[k]) for k in sd)


def test_load_sdvae_from_ldm_file_and_folder(tiny_vae, tmp_path):
    """REPA-E's .pt layout (LDM keys, plain state dict) and a diffusers folder load to the same function."""
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = tiny_vae.decode(tiny_vae.encode(x).latent_dist.mean).sample
    torch.save(diffusers_to_ldm(tiny_vae.state_dict()), tmp_path / "sdvae-f8d4.pt")
    tiny_vae.save_pretrained(tmp_path / "folder")
    for src in (tmp_path / "sdvae-f8d4.pt", tmp_path / "folder"):
        vae = load_sdvae(src, config="tiny").eval()
        assert vae.training is False and all(p.requires_grad for p in vae.parameters())
        with torch.no_grad():
            got = vae.decode(vae.encode(x).latent_dist.mean).sample
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_load_sdvae_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"VAE 'sdvae-f8d4'.*sdvae-f8d4\.pt.*Tried"):
        load_sdvae(None)
    with pytest.raises(FileNotFoundError, match="weights path .*missing.pt does not exist"):
        load_sdvae(tmp_path / "missing.pt")
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_sdvae(tmp_path / "bad.pt", config="tiny")


def _lpips_by_hand(net: LPIPS, x, y):
    """LPIPS in float64 from the raw weights: F.conv2d / relu / max_pool per layer of VGG16_RELU5_3."""
    sd = {k: v.double() for k, v in net.state_dict().items()}
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    feats = []
    for img in (x.double(), y.double()):
        h, idx, taps = (img - shift) / scale, 0, []
        for v in VGG16_RELU5_3:
            if v == "M":
                h, idx = F.max_pool2d(h, 2), idx + 1
            else:
                h = F.relu(F.conv2d(h, sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"], padding=1))
                idx += 2
                if idx - 1 in TAPS:
                    taps.append(h)
        feats.append(taps)
    total = 0
    for k, (a, b) in enumerate(zip(*feats)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + (sd[f"heads.{k}.weight"] * (a - b).pow(2)).sum(1).mean((1, 2))
    return total


def test_lpips_against_hand_computation_and_head_file(tmp_path):
    net = build_lpips(tiny=True)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    got = net(x, y)
    torch.testing.assert_close(got.double(), _lpips_by_hand(net, x, y), rtol=1e-4, atol=1e-6)
    assert torch.all(net(x, x).abs() < 1e-6)
    # heads in the LPIPS v0.1 file layout (lin{k}.model.1.weight) and a torchvision-keyed VGG file
    heads = {f"lin{k}.model.1.weight": net.heads[k].weight.detach() * 2 for k in range(5)}
    torch.save(heads, tmp_path / "vgg.pth")
    torch.save({k: v for k, v in net.state_dict().items() if k.startswith("features.")}, tmp_path / "vgg16.pth")
    loaded = LPIPS(width_div=16).load(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    torch.testing.assert_close(loaded(x, y), 2 * got, rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_lpips_missing_heads_error(tmp_path, monkeypatch):
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    torch.save({}, tmp_path / "vgg16-397923af.pth")
    import irepa.autoencoder.lpips as mod
    monkeypatch.setattr(mod, "_lpips_package_heads", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"LPIPS heads 'lpips-vgg'.*vgg\.pth"):
        build_lpips()


def test_discriminator_layout_init_and_file(tmp_path):
    """taming's NLayerDiscriminator(3, n_layers=3, BatchNorm) keys; weights_init statistics."""
    torch.manual_seed(0)
    d = PatchDiscriminator()
    keys = set(d.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.bias"} <= keys
    assert "main.2.bias" not in keys and d.main[8].stride == (1, 1)
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 1e-3
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # the 70x70 PatchGAN grid at 256 px
    torch.save(d.state_dict(), tmp_path / "sdvae-f8d4-discriminator-ckpt.pt")
    d2 = build_discriminator(tmp_path / "sdvae-f8d4-discriminator-ckpt.pt")
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), d2.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="discriminator"):
        build_discriminator(tmp_path / "nope.pt")


def test_generator_and_discriminator_losses_by_hand():
    """REPA-E's reductions: L1 mean, LPIPS batch mean, KL sum / B with weight 1e-6, -0.1 mean D(recon)."""
    torch.manual_seed(1)
    lp, disc = build_lpips(tiny=True), build_discriminator(tiny=True)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    rec = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    mean, logvar = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    cfg = VAELossConfig()
    disc_copy = copy.deepcopy(disc)
    total, parts = generator_loss(x, rec, Posterior(mean, logvar), disc, lp, step=0, cfg=cfg)
    l1 = (x - rec).abs().mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum() / 3
    lpips_ref = lp(x * 2 - 1, rec * 2 - 1).mean()  # the reference maps its [-1, 1] inputs by 2x - 1
    gan = -disc_copy(rec).mean()
    want = l1 + lpips_ref + 1e-6 * kl + 0.1 * gan
    torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts["kl"], 1e-6 * kl.detach())
    total.backward()
    assert rec.grad is not None and all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again for its own update
    d, _ = discriminator_loss(x, rec, disc, step=0, cfg=cfg)
    lr, lf = disc(x), disc(rec.detach())
    want_d = 0.5 * (torch.clamp(1 - lr, min=0).mean() + torch.clamp(1 + lf, min=0).mean())
    torch.testing.assert_close(d, want_d, rtol=1e-6, atol=1e-7)
    assert hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])).item() == pytest.approx(0.5 * (0.5 + 0.75))
    late = VAELossConfig(gan_start=5)
    t_late, p_late = generator_loss(x, rec, Posterior(mean, logvar), disc, lp, step=4, cfg=late)
    assert p_late["gan"].item() == 0.0 and discriminator_loss(x, rec, disc, 4, late)[0].item() == 0.0
