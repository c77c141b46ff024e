"""Prepared-data loaders: agreement with TensorLoader, exact resume, rank sharding, FFCV = memmap."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from irepa.data import TensorLoader, build_loader, ffcv_available, fp8_cosine_fidelity, prepare, read_manifest
from irepa.data import format as fmt

RES, B = 32, 64
needs_ffcv = pytest.mark.skipif(not ffcv_available(), reason="ffcv is not importable")


def hog():
    from irepa.encoders import build

    return build("hog-patch")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    formats = ("memmap", "ffcv") if ffcv_available() else ("memmap",)
    out = tmp_path_factory.mktemp("digits") / "ds"
    return prepare("digits", str(out), resolution=RES, encoders=[hog()], formats=formats, batch_size=1024,
                   progress=False)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "feats":
            assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
        else:
            assert torch.equal(a[k], b[k]), k


def test_matches_tensor_loader(digits):
    """Same order, same flips and same values as the in-memory loader over the same data."""
    mm = {f: np.load(f"{digits}/{fmt.MEMMAP_DIR}/{f}.npy") for f in ("label", "latent", "feat_0")}
    lat, feat = torch.from_numpy(mm["latent"]), fmt.decode_bf16(torch.from_numpy(mm["feat_0"]))
    ref = TensorLoader(lat[0::2, 0], torch.from_numpy(mm["label"][0::2]), [feat[0::2]], B, seed=5,
                       x_std=lat[0::2, 1], flip_feats=[feat[1::2]])
    ours = build_loader(digits, B, ["hog-patch"], seed=5, backend="memmap", latent_norm="none")
    n = ref.batches_per_epoch + 3  # into the second epoch
    for a, b in zip(take(ref, n), take(ours, n)):
        assert torch.equal(a["y"], b["y"]) and torch.equal(a["feats"][0], b["feats"][0])
        # stored mirrored latent vs flipped latent: the digits codec commutes with the flip
        torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=1e-6)
        assert torch.equal(a["x_std"], b["x_std"])
    assert ref.state_dict() == ours.state_dict() == {"epoch": 1, "index": 3}


def test_latent_normalization(digits):
    m = read_manifest(digits)
    b = take(build_loader(digits, 512, ["hog-patch"], backend="memmap"), 1)[0]
    raw = take(build_loader(digits, 512, ["hog-patch"], backend="memmap", latent_norm="none"), 1)[0]
    mu, sd = m["latent"]["channel_mean"][0], m["latent"]["channel_std"][0]
    torch.testing.assert_close(b["x"], (raw["x"] - mu) / sd)
    assert abs(b["x"].mean().item()) < 0.2 and abs(b["x"].std().item() - 1) < 0.2


@pytest.mark.parametrize("backend", ["memmap", pytest.param("ffcv", marks=needs_ffcv)])
def test_resume_gives_identical_batches(digits, backend):
    first = build_loader(digits, B, ["hog-patch"], seed=1, backend=backend)
    bpe = first.batches_per_epoch
    it = iter(first)
    seen = [next(it) for _ in range(bpe - 2)]
    state = first.state_dict()
    rest = [next(it) for _ in range(4)]  # crosses into epoch 1
    assert first.state_dict() == {"epoch": 1, "index": 2}
    again = build_loader(digits, B, ["hog-patch"], seed=1, backend=backend)
    again.load_state_dict(state)
    for a, b in zip(rest, take(again, 4)):
        assert_same(a, b)
    # reloading a position on the same loader restarts from it; the old iterator stops
    first.load_state_dict({"epoch": 0, "index": 1})
    assert next(it, None) is None
    assert_same(take(first, 1)[0], seen[1])


def test_ranks_cover_disjoint_samples(digits):
    n = read_manifest(digits)["num_samples"]
    loaders = [build_loader(digits, B, ["hog-patch"], seed=2, rank=r, world_size=2, backend="memmap") for r in range(2)]
    for epoch in range(2):
        samples = [set((ld.records(epoch) // 2).tolist()) for ld in loaders]
        assert not samples[0] & samples[1]
        assert len(samples[0]) == len(samples[1]) == loaders[0].batches_per_epoch * B == (n // 2) // B * B
    assert not np.array_equal(loaders[0].records(0), loaders[0].records(1))  # reshuffled per epoch
    labels = np.load(f"{digits}/{fmt.MEMMAP_DIR}/label.npy")
    for ld in loaders:
        batch = take(ld, 1)[0]
        assert torch.equal(batch["y"], torch.from_numpy(labels[ld.records(0)[:B]]))


@needs_ffcv
def test_ffcv_matches_memmap(digits):
    threads = torch.get_num_threads()
    a = build_loader(digits, B, ["hog-patch"], seed=4, backend="ffcv")
    b = build_loader(digits, B, ["hog-patch"], seed=4, backend="memmap")
    n = a.batches_per_epoch + 2
    for x, y in zip(take(a, n), take(b, n)):
        assert_same(x, y)
    assert torch.get_num_threads() == threads  # ffcv sets torch's thread count; the loader restores it


def test_fp8_fidelity_on_hog_digits():
    from irepa.data.digits import load_digits_images

    images, _ = load_digits_images(64)
    fid = fp8_cosine_fidelity(hog()(images[:512]))
    assert fid["mean"] > 0.998 and fid["min"] > 0.99, fid
    bits, scale = fmt.encode_fp8(torch.randn(3, 5, 7))
    assert bits.dtype == np.uint8 and bits.shape == (3, 5, 7) and scale.shape == (3, 5)


def test_manifest_before_the_hog_rename_reads_as_hog_patch(digits, tmp_path):
    """A dataset prepared when "hog" named our patch HOG (its manifest entry has no registry
    family) loads as "hog-patch"; asking it for "hog" (now the release's dense HOG) is refused
    instead of handing back patch-HOG features under the other name."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(digits, old)
    m = json.loads((old / fmt.MANIFEST).read_text())
    assert m["encoders"][0]["name"] == "hog-patch" and m["encoders"][0]["family"] == "hog-patch"
    m["encoders"][0]["name"] = "hog"
    del m["encoders"][0]["family"]
    (old / fmt.MANIFEST).write_text(json.dumps(m))
    assert [e["name"] for e in read_manifest(old)["encoders"]] == ["hog-patch"]
    a = take(build_loader(str(old), B, ["hog-patch"], seed=1, backend="memmap"), 1)[0]
    b = take(build_loader(digits, B, ["hog-patch"], seed=1, backend="memmap"), 1)[0]
    assert_same(a, b)
    with pytest.raises(ValueError, match="encoder 'hog' is not stored"):
        build_loader(str(old), B, ["hog"], seed=1, backend="memmap")
