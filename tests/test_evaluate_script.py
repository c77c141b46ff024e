"""launch/evaluate.py: one-line errors about its inputs and weights, and the offline classifier metric.

The classifier metric is compare.py's (irepa.metrics.classifier_fd: a small CNN trained once,
cached, on half of the labelled real images; Frechet distance in its features against the other
half), here on any ADM batch, the digits or an image folder as REF.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from irepa import cli
from irepa.errors import InputError, InputNotFound
from irepa.metrics import fid
from irepa.metrics.inception import WEIGHTS_NAME, load_inception

from test_sample_script import _load_launch


def _evaluate():
    return _load_launch("evaluate")


def _one_line_error(argv, capsys):
    ev = _evaluate()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(ev._cli, "evaluate.py", [str(a) for a in argv], signature=ev.main)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("evaluate.py: "), err
    return err


def _classes(n_per_class: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes a small CNN separates: a bright row band, a bright column band, a dark image."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for c in range(3):
        x = rng.integers(0, 60, (n_per_class, side, side, 3))
        if c == 0:
            x[:, side // 3:2 * side // 3] += 180
        elif c == 1:
            x[:, :, side // 3:2 * side // 3] += 180
        imgs.append(x)
        labels += [c] * n_per_class
    return np.concatenate(imgs).astype(np.uint8), np.asarray(labels)


@pytest.fixture
def batches(tmp_path):
    ref, ref_labels = _classes(20, 12, seed=0)
    smp, smp_labels = _classes(10, 12, seed=1)
    np.savez(tmp_path / "ref.npz", arr_0=ref, arr_1=ref_labels)
    np.savez(tmp_path / "good.npz", arr_0=smp, arr_1=smp_labels)
    np.savez(tmp_path / "noise.npz", arr_0=np.random.default_rng(2).integers(0, 256, smp.shape, dtype=np.uint8),
             arr_1=smp_labels)
    np.savez(tmp_path / "unlabelled.npz", arr_0=ref)
    return tmp_path


def test_missing_or_wrong_inception_weights_are_one_line(batches, capsys, monkeypatch):
    """Missing weights were 29 lines of traceback; a wrong file six lines of torch.load's text."""
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.delenv("IREPA_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("HOME", str(batches / "home"))
    monkeypatch.setenv("TORCH_HOME", str(batches / "home" / "torch"))
    args = [batches / "ref.npz", batches / "good.npz", "--device", "cpu"]
    err = _one_line_error(args, capsys)
    assert f"Inception weights not found; expected {WEIGHTS_NAME}" in err
    assert "Without them, --metric classifier scores offline" in err
    Image.new("RGB", (4, 4)).save(batches / "x.png")
    torch.save({"fc.weight": torch.zeros(3, 2048)}, batches / "other.pth")
    for weights, message in ((batches / "x.png", "x.png: a PNG image, not the Inception weights"),
                             (batches / "good.npz", "good.npz: a numpy .npz archive, not the Inception weights"),
                             (batches / "other.pth", "other.pth: not an FID Inception-v3 state dict")):
        assert message in _one_line_error([*args, "--weights", weights], capsys)
    with pytest.raises(InputNotFound):  # a UserError for every caller (compare.py, the trainer's online FID)
        load_inception()


def test_options_of_the_other_metric_are_refused(batches, capsys):
    args = [batches / "ref.npz", batches / "good.npz", "--device", "cpu"]
    assert "--weights does not apply to --metric classifier" in _one_line_error(
        [*args, "--metric", "classifier", "--weights", "w.pth"], capsys)
    assert "--cache_dir does not apply to --metric inception" in _one_line_error([*args, "--cache_dir", "c"], capsys)
    assert "--pr_dtype does not apply to --metric classifier" in _one_line_error(
        [*args, "--metric", "classifier", "--pr_dtype", "float32"], capsys)
    assert "--pr_dtype" in _one_line_error([*args, "--pr_dtype", "float64"], capsys)
    assert "no labels under 'arr_1'" in _one_line_error(
        [batches / "unlabelled.npz", batches / "good.npz", "--metric", "classifier"], capsys)


def test_classifier_metric_scores_offline_and_caches_its_network(batches, capsys):
    ev = _evaluate()
    kw = dict(metric="classifier", cache_dir=str(batches / "cache"), device="cpu")
    good = ev.main(str(batches / "ref.npz"), str(batches / "good.npz"), **kw)
    assert "training the metric classifier on 60 real images (3, 12, 12)" in capsys.readouterr().out
    noise = ev.main(str(batches / "ref.npz"), str(batches / "noise.npz"), **kw)
    assert "training" not in capsys.readouterr().out  # the cached network
    assert good["metric"] == noise["metric"] == "fd_classifier" and good["resolution"] == 12  # below 32: as is
    assert good["classifier_test_accuracy"] > 0.9 and good["class_accuracy"] > 0.9
    assert good["fd_classifier"] < noise["fd_classifier"] and noise["class_accuracy"] < 0.8
    assert good["floor_images"] == 30 and np.isfinite(good["real_floor"])
    saved = json.loads((batches / "good.eval.json").read_text())
    assert saved["fd_classifier"] == good["fd_classifier"] and "not comparable with FID" in saved["note"]
    small = ev.main(str(batches / "ref.npz"), str(batches / "good.npz"), out=str(batches / "r8.json"),
                    classifier_resolution=8, **kw)
    assert small["resolution"] == 8 and small["fd_classifier"] != good["fd_classifier"]


def test_an_image_folder_is_a_reference(tmp_path, capsys, monkeypatch):
    """REF as prepare.py reads a folder: sorted class sub-folders are labels 0, 1, ...; ADM's center
    crop at the samples' resolution. Both metrics take it."""
    from test_fid import _TinyFeatures

    imgs, labels = _classes(6, 16, seed=3)
    for i, (x, y) in enumerate(zip(imgs, labels)):
        folder = tmp_path / "photos" / ["a-rows", "b-cols", "c-dark"][y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(x, np.ones((2, 2, 1), dtype=np.uint8))).save(folder / f"{i}.png")  # 32 px files
    np.savez(tmp_path / "s.npz", arr_0=imgs, arr_1=labels)
    ev = _evaluate()
    res = ev.main(str(tmp_path / "photos"), str(tmp_path / "s.npz"), metric="classifier",
                  cache_dir=str(tmp_path / "cache"), device="cpu")
    assert res["resolution"] == 16 and res["num_reference_test"] == 9 and res["class_accuracy"] > 0.5
    monkeypatch.setattr(fid, "load_inception", lambda weights=None, device="cpu": _TinyFeatures().eval())
    res = ev.main(str(tmp_path / "photos"), str(tmp_path / "s.npz"), out=str(tmp_path / "i.json"), device="cpu")
    assert res["metric"] == "fid_inception" and np.isfinite(res["fid"]) and 0 <= res["precision"] <= 1
    with pytest.raises(InputError, match="no class sub-folders"):
        ev.main(str(tmp_path / "photos" / "a-rows"), str(tmp_path / "s.npz"), device="cpu")
