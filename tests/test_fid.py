"""ADM metric definitions: Frechet distance, IS, k-NN precision/recall, Inception network."""
import json

import numpy as np
import pytest
import torch
from scipy import linalg

from irepa.errors import InputError
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
    got = fid.manifold_radii(torch.from_numpy(x), k=3, batch=20, dtype="float32").numpy()
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


@np.errstate(over="ignore")  # an fp16 norm may overflow (ADM's fp32 fallback then takes the block)
def _tf_gpu_fp16_row_sums(sq):
    """reduce_sum over rows of an fp16 array as TF does on GPU (reduction_gpu_kernels.cu.h: fp16
    accumulation; a warp per row below 1024 columns, else CUB with 256 threads): lane/thread l
    adds columns l, l + T, ... in turn, each warp reduces by shuffle-down (offsets 1..16), the
    warp results are added in turn."""
    n, d = sq.shape
    threads = 32 if d < 1024 else 256
    lanes = np.zeros((n, threads), np.float16)
    for start in range(0, d, threads):
        chunk = sq[:, start:start + threads]
        lanes[:, :chunk.shape[1]] = lanes[:, :chunk.shape[1]] + chunk
    total = None
    for w in range(0, threads, 32):
        lane = lanes[:, w:w + 32].copy()
        for off in (1, 2, 4, 8, 16):
            lane[:, :32 - off] = lane[:, :32 - off] + lane[:, off:]
        total = lane[:, 0] if total is None else total + lane[:, 0]
    return total


def _adm_precision_recall(ref, samples, k=3, rows=10000, cols=10000):
    """ADM's rule in numpy float16, written from guided-diffusion 22e0df8 evaluations/evaluator.py
    (ManifoldEstimator, DistanceBlock): both sides cast to fp16; (|u|^2 - 2 u.v) + |v|^2 in fp16
    ops, the GEMM accumulating in fp32 (TF's cuBLAS default) rounded to fp16, the norms summed in
    fp16 as TF does on GPU; a rows x cols block with a non-finite value redone in fp32; radius =
    the (k+1)-th smallest of a point's row, itself included; inside = distance <= radius."""
    @np.errstate(over="ignore", invalid="ignore")
    def block(u, v):
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        nu = _tf_gpu_fp16_row_sums(u16 * u16)[:, None]
        nv = _tf_gpu_fp16_row_sums(v16 * v16)[None]
        uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = np.maximum(nu - np.float16(2) * uv + nv, np.float16(0))
        if np.isfinite(d).all():
            return d.astype(np.float32)
        u, v = u.astype(np.float32), v.astype(np.float32)
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)

    def radii(x):
        return np.concatenate([np.partition(np.concatenate([block(x[i:i + rows], x[j:j + cols])
                                                            for j in range(0, len(x), cols)], 1), k, axis=1)[:, k]
                               for i in range(0, len(x), rows)])

    r_ref, r_smp = radii(ref), radii(samples)
    ref_in, smp_in = np.zeros(len(ref), bool), np.zeros(len(samples), bool)
    for i in range(0, len(ref), rows):
        for j in range(0, len(samples), cols):
            d = block(ref[i:i + rows], samples[j:j + cols])
            ref_in[i:i + rows] |= (d <= r_smp[None, j:j + cols]).any(1)
            smp_in[j:j + cols] |= (d <= r_ref[i:i + rows, None]).any(0)
    return float(smp_in.mean()), float(ref_in.mean())


def _grid_features(rng, n, d, scale=1.0, center=80, spread=12):
    """Points around a common offset (as Inception's non-negative pool_3 features: norms well
    above the distances), on multiples of 1/4 below 32: every fp32 sum of their products is
    exact (for these sizes), so any summation order gives the same value and the fp16 roundings
    are the only ones."""
    return np.clip(np.round(center + rng.normal(0, spread * scale, (n, d))), 0, 127).astype(np.float32) / 4


def test_fp16_row_sums_follow_tf_gpu_order():
    rng = np.random.default_rng(8)
    for d in (48, 1000, 1024, 2048):
        sq = (rng.random((64, d)) * 2).astype(np.float16) ** 2
        got = fid._tf_gpu_row_sum(torch.from_numpy(sq).float()).numpy()
        np.testing.assert_array_equal(got, _tf_gpu_fp16_row_sums(sq).astype(np.float32))
    once = sq.astype(np.float32).sum(1).astype(np.float16).astype(np.float32)
    assert (got != once).mean() > 0.1  # fp16 accumulation is not an fp32 sum rounded once


def test_precision_recall_computes_distances_as_adm_fp16():
    rng = np.random.default_rng(7)
    ref, smp = _grid_features(rng, 300, 48), _grid_features(rng, 280, 48, scale=1.1)
    want = _adm_precision_recall(ref, smp, rows=128, cols=128)
    assert fid.precision_recall(ref, smp, batch=128) == want
    assert fid.precision_recall(ref, smp, batch=128, dtype="float32") != want  # fp16 moves the result
    # ADM's 2048-d rows (norms through CUB's 256 threads)
    ref, smp = (_grid_features(rng, 160, 2048, scale=s, center=8, spread=4) for s in (1.0, 1.05))
    want = _adm_precision_recall(ref, smp)
    assert fid.precision_recall(ref, smp) == want
    assert fid.precision_recall(ref, smp, dtype="float32") != want
    # rows far out overflow fp16 (norms > 65504): their blocks, and only those, are redone in fp32
    far = ref.copy()
    far[:5] *= 8
    assert np.isinf(_tf_gpu_fp16_row_sums(far[:5].astype(np.float16) ** 2)).all()
    want = _adm_precision_recall(far, smp, rows=128, cols=128)
    assert fid.precision_recall(far, smp, batch=128) == want


def test_precision_recall_adm_fp16_at_inception_scale():
    # 2,000 x 2048 non-negative features with Inception pool_3's norms (~|x|^2 = 550), two draws of one law
    rng = np.random.default_rng(2)
    basis = rng.standard_normal((16, 2048)).astype(np.float32) / 4
    def feats(noise):
        return np.abs(0.4 + 0.3 * rng.standard_normal((2000, 16)) @ basis
                      + noise * rng.standard_normal((2000, 2048))).astype(np.float32)
    ref, smp = feats(0.15), feats(0.15)
    p16, r16 = fid.precision_recall(ref, smp)
    p_adm, r_adm = _adm_precision_recall(ref, smp)
    # the GEMM's fp32 summation order (BLAS vs numpy) flips ~1 in 6000 fp16 roundings: a point or two at most
    assert abs(p16 - p_adm) <= 2 / 2000 and abs(r16 - r_adm) <= 2 / 2000
    p32, r32 = fid.precision_recall(ref, smp, dtype="float32")
    assert p16 - p32 >= 6 / 2000  # measured 12 / 2000: not below rounding


def test_precision_recall_dtype_is_checked():
    x = np.zeros((5, 2))
    with pytest.raises(InputError, match="float16, float32"):
        fid.precision_recall(x, x, dtype="bfloat16")
    with pytest.raises(InputError, match="got 'fp16'"):
        fid.evaluate(fid.Reference(fid.Stats.of(x + np.eye(5, 2)), None, x), {"pool": x, "logits": x},
                     pr_dtype="fp16")


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
