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
from irepa.errors import InputError
from irepa.models.latent_norm import LatentNorm


def test_export_and_prepare_use_the_fixed_batchnorm(tmp_path):
    from irepa.data import prepare
    torch.manual_seed(0)
    vae = build_sdvae("tiny")
    ln = LatentNorm(4)
    ln.init_from_stats(torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([0.1, -0.1, 0.2, 0.0]))
    out = export_vae(vae, ln.bn.running_mean, ln.bn.running_var, tmp_path / "e2e-vae")
    with pytest.raises(InputError, match="exists; choose another folder, or pass --overwrite true"):
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


def test_export_replaces_only_an_earlier_export(tmp_path, capsys, monkeypatch):
    """--overwrite replaced whatever OUT held; a missing RUN said "no complete checkpoint" of a folder
    that is not there. Both are one line before any checkpoint is read, and nothing is deleted."""
    from irepa import cli
    from test_sample_script import _load_launch
    torch.manual_seed(0)
    vae, ln = build_sdvae("tiny"), LatentNorm(4)
    out = export_vae(vae, ln.bn.running_mean, ln.bn.running_var, tmp_path / "e2e-vae")
    again = export_vae(vae, ln.bn.running_mean, ln.bn.running_var, out, overwrite=True)
    assert again == out and read_latent_stats(out) is not None
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="is not an exported VAE.*replaces only an earlier export"):
        export_vae(vae, ln.bn.running_mean, ln.bn.running_var, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    mod = _load_launch("export_vae")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    for argv, message in (([tmp_path / "no-run", tmp_path / "x"], f"{tmp_path / 'no-run'}: not found (expected a run "
                                                                  f"folder or a checkpoint folder"),
                          ([tmp_path / "no-run", mine, "--overwrite", "true"], f"OUT {mine} is not an exported VAE")):
        with pytest.raises(SystemExit) as e:
            cli.run(mod.main, "export_vae.py", [str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(f"export_vae.py: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
