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
from irepa.errors import UserError

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


def test_strict_stops_at_a_corrupt_image_and_the_repaired_folder_prepares(tmp_path):
    src = _folder(tmp_path / "imgs", corrupt_last=True)
    out = tmp_path / "ds"
    bad = src / "b" / "zz.jpg"
    with pytest.raises(UserError, match="truncated or corrupt") as e:
        prepare(str(src), str(out), **_kw(strict=True))
    assert str(e.value).startswith(f"{bad}:") and "--strict" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not (tmp_path / "ds.partial").exists()  # checked before anything was written
    # without --strict the file is skipped and listed; repaired, the same strict command prepares it all
    kept = prepare(str(src), str(tmp_path / "kept"), **_kw())
    assert [s["path"] for s in read_manifest(kept)["skipped"]] == ["b/zz.jpg"]
    assert read_manifest(kept)["num_samples"] == 6
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(bad, format="JPEG")
    assert prepare(str(src), str(out), **_kw(strict=True)) == str(out)
    assert read_manifest(out)["num_samples"] == 7 and read_manifest(out)["skipped"] == []


def test_default_formats_are_what_this_machine_writes(tmp_path, monkeypatch, capsys):
    """Issue 25 item 4: without FFCV the default writes memmap and says so; --formats ffcv is one line."""
    import irepa.data.loader as loader

    monkeypatch.setattr(loader, "ffcv_available", lambda: False)
    src = _folder(tmp_path / "imgs", n=2)
    out = prepare(str(src), str(tmp_path / "ds"), **{**_kw(), "formats": None})
    assert read_manifest(out)["formats"] == ["memmap"]
    note = [line for line in capsys.readouterr().out.splitlines() if "FFCV" in line]
    assert note == ["prepare: FFCV is not installed here, so only the memmap format is written (the loaders read "
                    "it everywhere; IREPA_WITH_FFCV=1 bash launch/install.sh adds FFCV)"]
    with pytest.raises(UserError, match="ffcv cannot be imported here.*--formats memmap"):
        prepare(str(src), str(tmp_path / "ds2"), **_kw(formats=("ffcv", "memmap")))
    assert not (tmp_path / "ds2.partial").exists()  # not hours later, at the FFCV write
    monkeypatch.setattr(loader, "ffcv_available", lambda: True)
    from irepa.data.prepare import resolve_formats
    assert resolve_formats(None) == ("ffcv", "memmap")
    assert prepare(str(src), out, **{**_kw(), "formats": None}) == out  # the default accepts what is stored


def test_a_dataset_is_never_written_into_the_data_package(tmp_path):
    import irepa.data

    inside = Path(irepa.data.__file__).resolve().parent / "digits-test"
    with pytest.raises(ValueError, match="inside the irepa.data source package"):
        prepare("digits", str(inside), **_kw())
    assert not inside.exists() and not Path(str(inside) + ".partial").exists()
