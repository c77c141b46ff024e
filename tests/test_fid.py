"""ADM metric definitions: Frechet distance, IS, k-NN precision/recall, Inception network."""
import json

import numpy as np
import pytest
import torch
from scipy import linalg

from irepa.metrics import fid
from irepa.metrics.inception import WEIGHTS_NAME, InceptionV3, load_inception, tf1_resize_bilinear
from irepa.metrics.npz import NpzArrayWriter, iter_npz_array


def _random_stats(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return rng.standard_normal(d), a @ a.T / (2 * d)


def _scipy_fd(mu1, s1, mu2, s2):  # ADM's formula, with scipy's sqrtm
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    for d in (1, 7, 64):
        mu1, s1 = _random_stats(rng, d)
        mu2, s2 = _random_stats(rng, d)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        fid.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_fid_of_a_set_with_itself_is_zero():
    acts = np.random.default_rng(1).standard_normal((500, 32)) @ np.random.default_rng(2).standard_normal((32, 32))
    st = fid.Stats.of(acts)
    assert abs(st.fd(st)) < 1e-8
    other = fid.Stats.of(acts + 1.0)  # a pure shift: FID = ||shift||^2 = 32
    assert st.fd(other) == pytest.approx(32.0, rel=1e-6)


def test_inception_score_limits():
    assert fid.inception_score(np.zeros((100, 10))) == pytest.approx(1.0)
    confident = np.full((100, 10), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0
    assert fid.inception_score(confident) == pytest.approx(10.0, rel=1e-6)


def test_manifold_radii_brute_force():
    x = np.random.default_rng(3).standard_normal((83, 5)).astype(np.float32)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    want = np.partition(d, 3, axis=1)[:, 3]  # ADM: index k with self at index 0
    got = fid.manifold_radii(torch.from_numpy(x), k=3, batch=20).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_precision_recall_toy_manifolds():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((600, 4))
    assert fid.precision_recall(ref, ref) == (1.0, 1.0)
    assert fid.precision_recall(ref, ref + 100.0) == (0.0, 0.0)
    # two far clusters in the reference, samples cover one of them: precision ~1, recall ~1/2
    ref2 = np.concatenate([rng.standard_normal((400, 2)), rng.standard_normal((400, 2)) + 50])
    half = rng.standard_normal((400, 2))
    p, r = fid.precision_recall(ref2, half, batch=128)
    assert p > 0.95 and 0.45 < r < 0.52
    assert fid.precision_recall(ref2, half, batch=10_000) == (p, r)  # blocking does not change it
    # samples half on the manifold, half off it: precision ~1/2
    mixed = np.concatenate([rng.standard_normal((300, 4)), rng.standard_normal((300, 4)) + 30])
    p, r = fid.precision_recall(ref, mixed)
    assert 0.45 < p < 0.52 and r > 0.9


def test_tf1_resize_is_legacy_bilinear():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    y = tf1_resize_bilinear(x, 8)
    # TF1 (align_corners=False, no half-pixel centres): src = dst * 4 / 8, right edge clamped
    np.testing.assert_allclose(y[0, 0, 0].numpy(), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = InceptionV3().eval()
    for m in net.modules():  # non-trivial BN statistics so the round trip is meaningful
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


class _TinyFeatures(torch.nn.Module):
    """Stand-in with InceptionV3's output contract (pool / spatial / logits from uint8 or [0, 255]
    images): the metric plumbing is network-agnostic, and a real Inception forward costs seconds
    on the CI cores (the network itself is tested below)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 64, 4, stride=4)
        self.fc = torch.nn.Linear(64, 16)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2) if x.dtype == torch.uint8 else x
        h = torch.relu(self.conv(x.float() / 128 - 1))
        pool = h.mean((2, 3))
        return {"pool": pool, "spatial": h[:, :7].permute(0, 2, 3, 1).flatten(1), "logits": self.fc(pool)}


@pytest.fixture(scope="module")
def tiny_features():
    return _TinyFeatures().eval()


def test_inception_builds_and_feature_shapes():
    net = InceptionV3().eval()
    n = sum(p.numel() for p in net.parameters())
    assert n == 23_850_960  # pytorch-fid's FID Inception with the 1008-way fc
    assert net.fc.weight.shape == (1008, 2048)
    with torch.no_grad():
        out = net(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17 * 17 * 7)
    assert out["logits"].shape == (2, 1008)
    assert torch.isfinite(out["pool"]).all()


def test_inception_weights_round_trip_and_missing(tmp_path, small_net, monkeypatch):
    path = tmp_path / WEIGHTS_NAME
    torch.save(small_net.state_dict(), path)
    loaded = load_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    want, got = small_net.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:  # identical tensors: the same network (its forward is checked above)
        assert torch.equal(want[k], got[k]), k
    monkeypatch.setenv("IREPA_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_inception()
    torch.save({"fc.weight": torch.zeros(3, 2048)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an FID Inception"):
        load_inception(tmp_path / "bad.pth")


def test_npz_streaming_and_evaluate_cli(tmp_path, tiny_features, monkeypatch):
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, (12, 24, 24, 3), dtype=np.uint8)
    w = NpzArrayWriter(tmp_path / "ref.npz")
    w.write_array("arr_0", imgs.shape, np.uint8, [imgs[:5], imgs[5:]])
    w.close()
    with np.load(tmp_path / "ref.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], imgs)
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_array(tmp_path / "ref.npz", batch=7))), imgs)

    import launch.evaluate as ev
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": tiny_features)
    res = ev.main(str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), out=str(tmp_path / "r.json"),
                  batch=6, logdir=str(tmp_path / "tb"), device="cpu")
    assert abs(res["fid"]) < 1e-4 and abs(res["sfid"]) < 1e-4  # rank-deficient covariances: ~1e-6 rounding
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and res["inception_score"] >= 1.0
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == res["fid"]
    assert any((tmp_path / "tb").iterdir())
    # precomputed statistics in the reference (ADM VIRTUAL_* layout) are used as given
    acts = fid.npz_activations(tiny_features, tmp_path / "ref.npz", batch=6)
    st, sp = fid.Stats.of(acts["pool"]), fid.Stats.of(acts["spatial"])
    np.savez(tmp_path / "stats.npz", mu=st.mu + 1.0, sigma=st.sigma, mu_s=sp.mu, sigma_s=sp.sigma)
    ref = fid.load_reference(None, tmp_path / "stats.npz")
    res2 = fid.evaluate(ref, acts)
    assert res2["fid"] == pytest.approx(64.0, rel=1e-5) and abs(res2["sfid"]) < 1e-4  # mu shifted by 1 in 64 dims
    assert "precision" not in res2  # no reference images, no manifold


@torch.no_grad()
def test_online_fid(tiny_features):
    torch.manual_seed(1)
    batches = [torch.rand(4, 3, 24, 24) for _ in range(3)]
    pools = np.concatenate([tiny_features((b * 255).round())["pool"].double().numpy() for b in batches])
    ref = fid.Stats.of(pools)
    it = iter(batches)
    value = fid.online_fid(lambda b: next(it)[:b], ref, n=12, batch=4, net=tiny_features)
    assert abs(value) < 1e-4


def test_evaluate_checks_inputs_before_inception(tmp_path, tiny_features, monkeypatch):
    import launch.evaluate as ev

    def no_net(weights=None, device="cpu"):
        raise AssertionError("Inception was loaded before the inputs were checked")

    monkeypatch.setattr(fid, "load_inception", no_net)
    imgs = np.random.default_rng(6).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=imgs)
    np.savez(tmp_path / "float.npz", arr_0=imgs.astype(np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ref.npz").read_bytes()[:500])
    ref = str(tmp_path / "ref.npz")
    for samples, err, match in [(tmp_path / "nope.npz", FileNotFoundError, "sample batch not found"),
                                (tmp_path / "cut.npz", ValueError, "cut.npz: not a readable .npz"),
                                (tmp_path / "float.npz", ValueError, "float.npz: 'arr_0' must be uint8")]:
        with pytest.raises(err, match=match):
            ev.main(ref, str(samples), device="cpu")
    with pytest.raises(FileNotFoundError, match="reference batch not found"):
        ev.main(str(tmp_path / "nope.npz"), ref, device="cpu")
    with pytest.raises(ValueError, match="would overwrite"):
        ev.main(ref, ref, out=ref, device="cpu")
    # the result goes into a folder that does not exist yet
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": tiny_features)
    out = tmp_path / "new" / "dir" / "r.json"
    ev.main(ref, ref, out=str(out), batch=3, device="cpu")
    assert json.loads(out.read_text())["num_samples"] == 6


def test_unreadable_weights_file_is_named(tmp_path):
    bad = tmp_path / WEIGHTS_NAME
    torch.save({}, bad)
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated copy
    with pytest.raises(ValueError, match=f"{bad}: a truncated or damaged zip archive.*not the Inception weights"):
        load_inception(bad)
