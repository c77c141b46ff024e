"""The classifier-feature Frechet distance (irepa.metrics.classifier_fd) on real digits."""
import json

import pytest
import torch

from irepa.codec import pixel_codec_decode, pixel_codec_encode
from irepa.data.digits import load_digits_images
from irepa.metrics.classifier_fd import ClassifierSettings, load_or_train, split_indices, train_classifier

FAST = ClassifierSettings(epochs=6)


@pytest.fixture(scope="module")
def digits16():
    """The digits as the default comparison's samples decode: 128 px -> pixel codec 16 x 16 -> [0, 1]."""
    x, y = load_digits_images(128)
    return pixel_codec_decode(pixel_codec_encode(x, 16)), y


@pytest.fixture(scope="module")
def metric(digits16, tmp_path_factory):
    return load_or_train(*digits16, tmp_path_factory.mktemp("cls"), FAST, log=lambda m: None)


def test_split_is_stratified_disjoint_and_seeded(digits16):
    _, y = digits16
    tr, te = split_indices(y, 0.5, 0)
    assert len(set(tr.tolist()) & set(te.tolist())) == 0 and len(tr) + len(te) == len(y)
    for c in range(10):  # every class split about in half
        n_c = int((y == c).sum())
        assert abs(int((y[te] == c).sum()) - n_c / 2) <= 1
    assert torch.equal(split_indices(y, 0.5, 0)[1], te) and not torch.equal(split_indices(y, 0.5, 1)[1], te)


def test_real_data_against_itself_is_near_zero_and_noise_increases_it(metric, digits16):
    """Compared against: the reference statistics of the held-out real images. Their own features
    give 0 (same Gaussian); real images the reference never saw give the small-sample floor;
    Gaussian pixel noise of growing strength gives growing distances, far above the floor."""
    x, y = digits16
    _, te = split_indices(y, FAST.test_fraction, FAST.seed)
    assert metric.test_accuracy > 0.9
    assert abs(metric.frechet(x[te])) < 1e-6
    floor = metric.floor(500)
    assert 0 < floor < 0.2 * metric.frechet(torch.rand_like(x[te]))
    g = torch.Generator().manual_seed(0)
    noisy = [metric.frechet((x[te] + s * torch.randn(x[te].shape, generator=g)).clamp(0, 1)) for s in (0.1, 0.2, 0.4)]
    assert floor < noisy[0] < noisy[1] < noisy[2], (floor, noisy)
    # class accuracy: real test images are recognised, shuffled labels are not
    assert metric.accuracy(x[te], y[te]) == pytest.approx(metric.test_accuracy)
    assert metric.accuracy(x[te], y[te][torch.randperm(len(te), generator=g)]) < 0.3


def test_training_is_deterministic_and_cached(digits16, tmp_path):
    x, y = digits16
    small = ClassifierSettings(epochs=1)
    a, _ = train_classifier(x, y, small)
    b, _ = train_classifier(x, y, small)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    logs = []
    first = load_or_train(x, y, tmp_path, small, log=logs.append)
    assert any("training" in m for m in logs) and len(list(tmp_path.glob("classifier-*.safetensors"))) == 1
    logs.clear()
    again = load_or_train(x, y, tmp_path, small, log=logs.append)
    assert not logs and again.key == first.key and again.report == first.report
    assert json.loads(next(tmp_path.glob("classifier-*.json")).read_text())["report"]["test_accuracy"] > 0
    other = load_or_train(x, y, tmp_path, ClassifierSettings(epochs=1, seed=1), log=logs.append)
    assert other.key != first.key and len(list(tmp_path.glob("classifier-*.safetensors"))) == 2
    (tmp_path / f"classifier-{first.key}.safetensors").write_bytes(b"\0" * 10)  # truncated: retrained, not used
    logs.clear()
    load_or_train(x, y, tmp_path, small, log=logs.append)
    assert any("unreadable" in m for m in logs)


def test_bad_images_are_refused(digits16):
    x, y = digits16
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_classifier(x * 255, y, FAST)
    with pytest.raises(ValueError, match="expected float images"):
        train_classifier((x * 255).byte(), y, FAST)
