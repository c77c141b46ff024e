"""Export of an end-to-end VAE and latent-only training data made with it (prepare with fixed stats).

Compared against: the latent BatchNorm in eval mode (what REPA-E's train_ldm_only holds
fixed) applied to the exported VAE's posterior samples, and REPA-E's file layouts
(sdvae-f8d4.pt in LDM keys, -latents-stats.pt with [1, C, 1, 1] tensors).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from irepa.autoencoder.export import export_vae, read_latent_stats
from irepa.autoencoder.sdvae import build_sdvae, load_sdvae
from irepa.models.latent_norm import LatentNorm


def test_export_and_prepare_use_the_fixed_batchnorm(tmp_path):
    from irepa.data import prepare
    torch.manual_seed(0)
    vae = build_sdvae("tiny")
    ln = LatentNorm(4)
    ln.init_from_stats(torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([0.1, -0.1, 0.2, 0.0]))
    out = export_vae(vae, ln.bn.running_mean, ln.bn.running_var, tmp_path / "e2e-vae")
    with pytest.raises(FileExistsError):
        export_vae(vae, ln.bn.running_mean, ln.bn.running_var, out)
    stats = read_latent_stats(out)
    ref = torch.load(out / "sdvae-f8d4-latents-stats.pt", weights_only=True)
    assert ref["latents_scale"].shape == (1, 4, 1, 1)
    torch.testing.assert_close(ref["latents_scale"].flatten(), torch.tensor([0.5, 1.0, 2.0, 4.0]))
    # the REPA-E layout file loads back into the same VAE
    again = load_sdvae(out / "sdvae-f8d4.pt", config="tiny")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))
    data = prepare("digits", str(tmp_path / "data"), resolution=32, vae=str(out), encoders=["hog-patch"],
                   formats=("memmap",), progress=False, device="cpu", batch_size=256)
    man = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert man["latent"]["stats_from"].startswith("vae")
    assert man["latent"]["channel_mean"] == stats["mean"] and man["latent"]["channel_std"] == stats["std"]
    from irepa.data import build_loader
    loader = build_loader(data, 8, ["hog-patch"], seed=0, backend="memmap", device="cpu")
    lat = np.load(tmp_path / "data" / "memmap" / "latent.npy", mmap_mode="r")
    z = torch.from_numpy(np.array(lat[:16, 0]))
    # the loader's normalization (z - shift) / scale is the latent BatchNorm in eval
    torch.testing.assert_close((z - loader.shift) / loader.scale, ln.eval()(z), rtol=1e-5, atol=1e-6)
    assert next(iter(loader))["x"].shape == (8, 4, 4, 4)
