"""The study's targets: raw patches, the digits CNN trained here, and the two controls
(irepa.encoders.raw-patch / digits_cnn / controls)."""
import math

import pytest
import torch

from irepa import analysis, encoders
from irepa.analysis.spatial import spatial_metrics
from irepa.encoders import digits_cnn
from irepa.encoders.controls import image_permutations
from irepa.metrics.classifier_fd import split_indices


@pytest.fixture(scope="module")
def digits():
    return analysis.digits_set(128, limit=300)


def _measure(name_or_fn, images):
    fn = encoders.build(name_or_fn, tiny=True) if isinstance(name_or_fn, str) else name_or_fn
    rows, _ = analysis.measure_encoders({"t": fn}, images, batch_size=300)
    return rows[0]


def test_raw_patch_tokens_are_the_patch_pixels():
    x = torch.rand(2, 3, 64, 64)
    y = encoders.build("raw-patch")(x)
    gray = (x * torch.tensor([0.2125, 0.7154, 0.0721]).view(1, 3, 1, 1)).sum(1)
    assert y.shape == (2, 16, 256)
    torch.testing.assert_close(y[1, 4 + 2], gray[1, 16:32, 32:48].flatten())  # row 1, column 2 of the 4x4 grid


def test_global_control_has_no_structure_and_the_base_probe(digits):
    """Every token is the image's mean token: LDS, CDS, SRSS, RMSC at their no-structure value 0,
    global share 1, and the probe of the base's mean-pooled features (the classifier's pooled
    feature for digits-cnn-l4, whose head reads that mean)."""
    base, ctrl = _measure("digits-cnn-l4", digits), _measure("digits-cnn-l4+global", digits)
    for k in ("lds", "lds_paper", "cds", "srss", "rmsc"):
        assert ctrl[k] == pytest.approx(0.0, abs=1e-6), k
    assert ctrl["global_share"] == pytest.approx(1.0, abs=1e-6) and base["global_share"] < 0.99
    assert base["lds"] > 0.005 and base["rmsc"] > 0.05  # the base has structure to remove
    assert ctrl["probe_acc"] == base["probe_acc"] and ctrl["probe_acc"] > 0.3  # chance: 0.1
    enc = encoders.build("digits-cnn-l4+global", tiny=True)
    x = digits.load(range(4))
    y = enc(x)
    net = enc.base.net
    pooled = net.maps(digits_cnn.DigitsCNN.grid_input(x))[-1].mean((2, 3))  # what the classifier head reads
    torch.testing.assert_close(y, pooled[:, None].expand_as(y), rtol=1e-5, atol=1e-6)


def test_permuted_control_keeps_each_image_mean_and_breaks_the_layout(digits):
    x = digits.load(range(16))
    base, perm = encoders.build("hog-patch"), encoders.build("hog-patch+perm")
    yb, yp = base(x), perm(x)
    torch.testing.assert_close(yp.mean(1), yb.mean(1))  # the same global content per image
    torch.testing.assert_close(yp.sort(1).values, yb.sort(1).values)  # the same tokens
    sb, sp = spatial_metrics(yb), spatial_metrics(yp)
    torch.testing.assert_close(sp["global_share"], sb["global_share"])  # permutation invariant, like RMSC
    torch.testing.assert_close(sp["rmsc"], sb["rmsc"])
    mb, mp = sb["lds"], sp["lds"]
    assert mb.mean() > 0.05 and mp.mean().abs() < 0.03 and (mb - mp).abs().min() > 0.02  # LDS changes, every image
    # the order is fixed by the image: the same image again (alone, mirrored batch position) gets the same one
    torch.testing.assert_close(perm(x[5:6]), yp[5:6])
    orders = image_permutations(x, yb.shape[1])
    assert len({tuple(o.tolist()) for o in orders}) == 16  # each image its own order
    assert all(not torch.equal(o, torch.arange(yb.shape[1])) for o in orders)


def test_controls_resolve_by_name():
    s = encoders.get_spec("hog-dense+perm")
    assert (s.name, s.family, s.base, s.dim, s.needs_weights) == ("hog+perm", "control", "hog", 128, False)
    assert encoders.get_spec("dinov2-vit-b+global").needs_weights  # a control needs its base's weights
    with pytest.raises(ValueError, match=r"unknown encoder.*\+global or \+perm"):
        encoders.get_spec("hog+shuffle")


def test_digits_cnn_trains_deterministically_on_the_metric_reference_half(tmp_path, monkeypatch):
    """Trained on the half the metric classifier does not train on; trained twice (no cache) it gives
    the same weights bit for bit; a third build reads the cache."""
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    s = digits_cnn.DigitsCNNSettings(epochs=1, width=8)
    x, labels = digits_cnn.grid_digits()
    metric_train, metric_test = split_indices(labels, 0.5, 0)
    mine, heldout = digits_cnn.split(labels, s)
    assert torch.equal(mine, metric_test) and torch.equal(heldout, metric_train)
    a, rep = digits_cnn.train(s, x, labels)
    b, _ = digits_cnn.train(s, x, labels)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert rep["num_train"] == len(metric_test) and 0.1 < rep["heldout_accuracy"] <= 1
    net, _ = digits_cnn.load_or_train(s, log=lambda m: None)
    files = sorted(p.name for p in (tmp_path / "trained").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    assert all(torch.equal(net.state_dict()[k], a.state_dict()[k]) for k in a.state_dict())
    logged = []
    digits_cnn.load_or_train(s, log=logged.append)
    assert logged == []  # read from the cache, not trained again


def test_digits_cnn_init_target_is_the_untrained_start(tmp_path, monkeypatch):
    monkeypatch.setenv("IREPA_ENCODER_DIR", str(tmp_path))
    enc = encoders.build("digits-cnn-l2-init")
    start = digits_cnn.initial(digits_cnn.DigitsCNNSettings())
    assert all(torch.equal(enc.net.state_dict()[k], start.state_dict()[k]) for k in start.state_dict())
    assert not (tmp_path / "trained").exists()  # nothing trained for it
    y = enc(torch.rand(2, 3, 128, 128))
    assert y.shape == (2, 64, 32) and math.isfinite(float(y.sum())) and (y >= 0).all()  # post-ReLU maps
