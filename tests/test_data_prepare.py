"""prepare -> load round trips on a tiny ImageFolder with a tiny random AutoencoderKL."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from irepa.data import build_loader, check_manifest, ffcv_available, prepare, read_manifest
from irepa.data import format as fmt
from irepa.codec import VAE
from irepa.data.sources import center_crop_adm

RES = 32
SIZES = [(40, 52), (64, 64), (33, 70), (90, 48), (32, 32), (48, 100), (77, 41), (50, 50), (36, 60), (64, 40)]


class PatchProbe(nn.Module):
    """Stand-in encoder (used only if irepa.encoders is unavailable): not flip-equivariant."""

    name, dim = "probe", 8

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)), requires_grad=False)

    def forward(self, x):
        return nn.functional.conv2d(x, self.w, stride=16).flatten(2).transpose(1, 2)


def encoder() -> nn.Module:
    try:
        from irepa.encoders import build

        return build("hog-patch")
    except Exception:  # encoders package not there yet
        return PatchProbe()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        d = root / ("cat" if i % 2 else "dog")
        d.mkdir(exist_ok=True)
        yy, xx = np.mgrid[:h, :w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path)


def formats():
    return ("memmap", "ffcv") if ffcv_available() else ("memmap",)


@pytest.fixture(scope="module")
def prepared(folder, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "ds"
    enc = encoder()
    return prepare(str(folder), str(out), resolution=RES, vae=vae_dir, encoders=[enc], store_images=True,
                   formats=formats(), batch_size=4, progress=False), enc


def _arrays(path):
    m = read_manifest(path)
    return {f: np.load(os.path.join(path, fmt.MEMMAP_DIR, f + ".npy")) for f in m["fields"]}


def test_round_trip_and_flips(prepared, folder, vae_dir):
    path, enc = prepared
    m = read_manifest(path)
    assert m["num_samples"] == len(SIZES) and m["num_classes"] == 2 and m["latent"]["shape"] == [4, 16, 16]
    assert m["encoders"] == [{"name": enc.name, "family": "hog-patch", "dim": enc.dim, "tokens": 4, "storage": "bf16"}]
    assert len(m["latent"]["channel_mean"]) == 4 and all(s > 0 for s in m["latent"]["channel_std"])
    check_manifest(m, latent_shape=(4, 16, 16), num_tokens=4, encoder_dims={enc.name: enc.dim})
    arrays = _arrays(path)
    vae = VAE(vae_dir).encode
    files = sorted((p.parent.name, p) for p in folder.rglob("*.png"))
    for i, (cls, p) in enumerate(files):  # listing order: class, then path
        crop = torch.from_numpy(center_crop_adm(Image.open(p), RES)).permute(2, 0, 1)
        for v, view in enumerate([crop, crop.flip(-1)]):
            r = 2 * i + v
            x01 = view[None].float() / 255
            mean, std = vae(x01)
            assert arrays["label"][r] == ["cat", "dog"].index(cls)
            assert np.array_equal(arrays["images"][r], view.numpy())
            torch.testing.assert_close(torch.from_numpy(arrays["latent"][r, 0]), mean[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(arrays["latent"][r, 1]), std[0], rtol=1e-5, atol=1e-5)
            want = enc(x01)[0].to(torch.bfloat16)
            assert torch.equal(fmt.decode_bf16(torch.from_numpy(arrays["feat_0"][r])), want)

    # the loader serves, per sample, the view its flip picks: image, latent and tokens together
    for backend in formats():
        loader = build_loader(path, 5, [enc.name], seed=3, backend=backend, images=True, latent_norm="none")
        recs = loader.records(0)
        batch = next(iter(loader))
        for j, r in enumerate(recs[:5]):
            assert torch.equal(batch["images"][j], torch.from_numpy(arrays["images"][r]).float() / 255)
            assert torch.equal(batch["x"][j], torch.from_numpy(arrays["latent"][r, 0]))
            assert torch.equal(batch["x_std"][j], torch.from_numpy(arrays["latent"][r, 1]))
            assert torch.equal(batch["feats"][0][j], fmt.decode_bf16(torch.from_numpy(arrays["feat_0"][r])))
            assert batch["y"][j] == arrays["label"][r]
        assert {r % 2 for r in loader.records(0)} == {0, 1}  # both views occur


def test_resume_matches_uninterrupted(prepared, folder, vae_dir, tmp_path):
    path, enc = prepared
    out = tmp_path / "ds"
    kw = dict(resolution=RES, vae=vae_dir, encoders=[enc], store_images=True, formats=("memmap",), batch_size=4,
              progress=False)
    assert prepare(str(folder), str(out), max_batches=1, **kw) is None
    assert not out.exists() and (tmp_path / "ds.partial").exists()
    assert json.loads((tmp_path / "ds.partial" / "progress-0.json").read_text())["done"] == 4
    with pytest.raises(FileNotFoundError, match="unfinished preparation"):
        read_manifest(out)
    with pytest.raises(ValueError, match="different settings"):
        prepare(str(folder), str(out), **{**kw, "store_images": False})
    assert prepare(str(folder), str(out), **kw) == str(out)
    assert not (tmp_path / "ds.partial").exists()
    got, ref = _arrays(out), _arrays(path)
    assert got.keys() == ref.keys()
    assert [k for k in ref if not np.array_equal(got[k], ref[k])] == []
    assert read_manifest(out)["latent"] == read_manifest(path)["latent"]


def test_two_ranks_merge(prepared, folder, vae_dir, tmp_path):
    """Ranks run as separate invocations: rank 1 writes its block, rank 0 its own and merges."""
    path, enc = prepared
    out = tmp_path / "ds"
    kw = dict(resolution=RES, vae=vae_dir, encoders=[enc], store_images=True, formats=("memmap",), batch_size=3,
              progress=False, world_size=2, wait_timeout=1)
    with pytest.raises(TimeoutError):  # rank 1 alone waits for rank 0's setup
        prepare(str(folder), str(out), rank=1, **kw)
    assert prepare(str(folder), str(out), rank=0, max_batches=0, **kw) is None  # setup only
    assert prepare(str(folder), str(out), rank=1, **kw) is None  # done, rank 0 merges
    assert prepare(str(folder), str(out), rank=0, **kw) == str(out)
    got, ref = _arrays(out), _arrays(path)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_fp8_storage_and_pixels_kind(tmp_path):
    enc = encoder()
    out = prepare("digits", str(tmp_path / "px"), resolution=RES, kind="pixels", encoders=[enc], storage="fp8",
                  formats=("memmap",), batch_size=512, progress=False)
    m = read_manifest(out)
    assert m["kind"] == "pixels" and m["latent"] is None and m["fields"]["feat_0"]["dtype"] == "uint8"
    check_manifest(m, latent_shape=(3, RES, RES), num_tokens=4, encoder_dims={enc.name: enc.dim})
    loader = build_loader(out, 16, [enc.name], images=True, feats_dtype=torch.float32)
    b = next(iter(loader))
    assert b["x"].shape == (16, 3, RES, RES) and -1 <= b["x"].min() and b["x"].max() <= 1
    torch.testing.assert_close(b["images"], (b["x"] + 1) / 2, rtol=0, atol=1e-6)
    want = enc(b["images"])  # images are the crop of the picked view, so tokens must follow
    cos = nn.functional.cosine_similarity(b["feats"][0], want, dim=-1)
    assert cos[want.norm(dim=-1) > 0].min() > 0.99


def test_bad_files_and_manifest(prepared, tmp_path):
    import shutil

    path, enc = prepared
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    build_loader(bad, 2, [enc.name], backend="memmap")  # intact copy opens
    feat = bad / fmt.MEMMAP_DIR / "feat_0.npy"
    data = feat.read_bytes()
    feat.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        build_loader(bad, 2, [enc.name], backend="memmap")
    feat.write_bytes(data[:-64] + bytes(reversed(data[-64:])))  # same size, other content
    with pytest.raises(ValueError, match="digest"):
        build_loader(bad, 2, [enc.name], backend="memmap")
    feat.write_bytes(data)
    with pytest.raises(ValueError, match="not stored"):
        build_loader(bad, 2, ["dinov2-b"], backend="memmap")
    m = read_manifest(bad)
    with pytest.raises(ValueError, match="latent shape"):
        check_manifest(m, latent_shape=(4, 32, 32))
    with pytest.raises(ValueError, match="tokens"):
        check_manifest(m, num_tokens=256, encoder_dims={enc.name: enc.dim})
    with pytest.raises(ValueError, match="dim"):
        check_manifest(m, encoder_dims={enc.name: 768})
    (bad / fmt.MANIFEST).write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        read_manifest(bad)
    (bad / fmt.MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        build_loader(bad, 2, [enc.name])


def test_full_checksum_dataset_passes_both_verifications(folder, tmp_path):
    """Issue 25 item 3: prepared with full_checksum, the default sampled check refused it as corrupt."""
    kw = dict(resolution=RES, kind="pixels", encoders=[], formats=("memmap",), batch_size=4, progress=False)
    out = prepare(str(folder), str(tmp_path / "ds"), full_checksum=True, **kw)
    for verify in ("sampled", "full"):
        assert next(iter(build_loader(out, 2, [], backend="memmap", verify=verify)))["y"].shape == (2,)
    m = read_manifest(out)
    assert all(r["digest"].startswith("sampled:") and r["full_digest"].startswith("full:") for r in m["files"].values())
    assert "every byte" in fmt.scan_dataset(out, m)
    label = tmp_path / "ds" / fmt.MEMMAP_DIR / "label.npy"
    data = label.read_bytes()
    label.write_bytes(data[:-8] + bytes(8))  # the last label changed, same size
    for verify in ("sampled", "full"):
        with pytest.raises(ValueError, match="label.npy: content digest does not match"):
            build_loader(out, 2, [], backend="memmap", verify=verify)
    # a manifest written before "full_digest": its full digest under "digest" is checked in full by either mode
    label.write_bytes(data)
    old = {**m, "files": {n: {"bytes": r["bytes"], "digest": r["full_digest"]} for n, r in m["files"].items()}}
    (tmp_path / "ds" / fmt.MANIFEST).write_text(json.dumps(old))
    for verify in ("sampled", "full"):
        build_loader(out, 2, [], backend="memmap", verify=verify)
