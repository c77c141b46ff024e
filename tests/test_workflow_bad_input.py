"""The prepare -> train-data workflow fed bad input on purpose: each mistake stops with a message
that names what is wrong and where, and nothing already prepared is lost or changed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from irepa.data import check_manifest, prepare, read_manifest
from irepa.data import format as fmt
from irepa.data.loader import FFCVLoader

RES = 32


def _folder(root, n=6, corrupt_last=False):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("a" if i < n // 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        h, w = 30 + 7 * i, 50 - 3 * i  # varied sizes and aspect ratios
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    if corrupt_last:  # sorts last: the run fails after earlier batches were written
        (root / "b" / "zz.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 8)
    return root


def _kw(**over):
    return {**dict(resolution=RES, kind="pixels", encoders=["hog-patch"], formats=("memmap",), batch_size=2,
                   progress=False, num_threads=1), **over}


def _snapshot(path):
    return {p.relative_to(path): (p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    src = _folder(root / "imgs")
    return src, prepare(str(src), str(root / "ds"), **_kw())


def test_complete_output_with_other_settings_is_refused(prepared):
    src, out = prepared
    before = _snapshot(Path(out))
    assert prepare(str(src), out, **_kw()) == out  # the same request: a no-op
    for over, what in [({"resolution": 48}, "resolution: 32 -> 48"), ({"storage": "fp8"}, "('hog-patch', 'fp8')"),
                       ({"encoders": ["sift"]}, "sift"), ({"formats": ("memmap", "ffcv")}, "formats")]:
        with pytest.raises(ValueError, match="already holds a prepared dataset") as e:
            prepare(str(src), out, **_kw(**over))
        assert out in str(e.value) and what in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(ValueError, match="source"):
        prepare("digits", out, **_kw())
    assert _snapshot(Path(out)) == before  # nothing was touched


def test_model_mismatch_names_the_prepared_folder(prepared):
    src, out = prepared
    m = read_manifest(out)
    with pytest.raises(ValueError, match="prepared at 32 px") as e:
        check_manifest(m, latent_shape=(3, 64, 64))
    assert str(e.value).startswith(f"{out}:")  # the dataset folder, not the image folder it came from
    with pytest.raises(ValueError, match="'sift' is not stored") as e:
        check_manifest(m, encoder_dims={"sift": 128})
    assert str(e.value).startswith(f"{out}:")


def test_loader_for_a_missing_format_says_which_backend_to_use(prepared):
    _, out = prepared
    with pytest.raises(ValueError, match="prepared without the ffcv format.*--data.backend"):
        FFCVLoader(out, 2, ["hog-patch"])  # refused before ffcv itself is needed


def test_corrupt_image_stops_with_its_path_and_a_way_on(tmp_path):
    src = _folder(tmp_path / "imgs", corrupt_last=True)
    out = tmp_path / "ds"
    bad = src / "b" / "zz.jpg"
    with pytest.raises(ValueError, match="cannot read image") as e:
        prepare(str(src), str(out), **_kw())
    msg = str(e.value)
    assert str(bad) in msg and "run the same command again" in msg and "--overwrite" in msg
    progress = json.loads((tmp_path / "ds.partial" / "progress-0.json").read_text())
    assert progress["done"] >= 4 and not out.exists()  # finished batches are kept
    # the suggested way on: a readable file under the same name, the same command, and the run continues
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(bad, format="JPEG")
    assert prepare(str(src), str(out), **_kw()) == str(out)
    ref = prepare(str(src), str(tmp_path / "ref"), **_kw())  # the uninterrupted run
    for f in read_manifest(out)["fields"]:
        a, b = (np.load(os.path.join(p, fmt.MEMMAP_DIR, f + ".npy")) for p in (out, ref))
        assert np.array_equal(a, b), f


def test_ffcv_format_without_ffcv_fails_before_any_work(tmp_path, monkeypatch):
    import irepa.data.loader as loader

    monkeypatch.setattr(loader, "ffcv_available", lambda: False)
    src = _folder(tmp_path / "imgs", n=2)
    with pytest.raises(ImportError, match="--formats memmap"):
        prepare(str(src), str(tmp_path / "ds"), **_kw(formats=("ffcv", "memmap")))
    assert not (tmp_path / "ds.partial").exists()  # not hours later, at the FFCV write


def test_a_dataset_is_never_written_into_the_data_package(tmp_path):
    import irepa.data

    inside = Path(irepa.data.__file__).resolve().parent / "digits-test"
    with pytest.raises(ValueError, match="inside the irepa.data source package"):
        prepare("digits", str(inside), **_kw())
    assert not inside.exists() and not Path(str(inside) + ".partial").exists()
