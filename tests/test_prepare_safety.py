"""Issue 25 (data side): prepare on folders as users have them. --overwrite never deletes what prepare
did not make; bad image files are skipped, listed and counted (or stop the run with --strict);
every mistake on the command line is one line before any work, leaving nothing behind."""
from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from irepa import cli
from irepa.data import prepare, read_manifest
from irepa.data import format as fmt
from irepa.data.sources import IMAGE_EXTENSIONS, center_crop_adm
from irepa.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RES = 16  # the smallest the 16 px encoder patch grid takes
BAD = {"link.jpg": "broken symbolic link", "text.jpg": "not an image file", "trunc.jpg": "truncated or corrupt",
       "zero.jpg": "empty file (0 bytes)"}
CONVERTED = {"L": 1, "RGBA": 1, "CMYK": 1, "P": 1}


def _rgb(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _jpeg_bytes(rng) -> bytes:
    buf = io.BytesIO()
    _rgb(rng, 24, 24).save(buf, format="JPEG")
    return buf.getvalue()


def _corrupt_body_jpeg(rng) -> bytes:
    """Ends with its end marker (passes the cheap check) but its Huffman table is garbage: fails to decode."""
    b = bytearray(_jpeg_bytes(rng))
    dht = b.find(b"\xff\xc4")
    b[dht + 5:dht + 30] = b"\xff" * 25
    return bytes(b)


def _folder(root: Path, bad: bool = True, n_good: int = 3) -> Path:
    """Class a: RGB images plus every kind of trouble; class b: plain RGB images."""
    rng = np.random.default_rng(0)
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    for i in range(n_good):
        _rgb(rng, 20 + i, 24).save(a / f"rgb{i}.png")
        _rgb(rng, 24, 18 + i).save(b / f"rgb{i}.png")
    if bad:
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(a / "gray.png")
        Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)).save(a / "rgba.png")
        _rgb(rng, 20, 20).convert("CMYK").save(a / "cmyk.jpg")
        _rgb(rng, 20, 20).convert("P").save(a / "pal.png")
        _rgb(rng, 10, 10).save(a / "small.png")
        (a / "trunc.jpg").write_bytes(_jpeg_bytes(rng)[:200])
        (a / "zero.jpg").write_bytes(b"")
        (a / "text.jpg").write_text("not an image\n")
        (a / "link.jpg").symlink_to(a / "nowhere.jpg")
    return root


def _kw(**over):
    return {**dict(resolution=RES, kind="pixels", encoders=[], formats=("memmap",), batch_size=2, progress=False,
                   num_threads=1), **over}


def _snapshot(path: Path) -> dict:
    return {p.relative_to(path): (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns) for p in path.rglob("*")}


def _sample_paths(manifest) -> list[str]:
    """Which file each sample holds, from the manifest alone: the listing minus "skipped", with "moved"."""
    root = Path(manifest["source"]["root"])
    listing = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in IMAGE_EXTENSIONS)
    moved = manifest["source"]["moved"]
    away = {s["path"] for s in manifest["skipped"]} | {listing[frm] for _, frm in moved}
    paths = [p for p in listing if p not in away]
    for to, frm in sorted(moved):
        paths.insert(to, listing[frm])
    return paths


def _check_records(out: str, src: Path):
    """Every record is the crop of the file the manifest says, with its class: no empty or stray record."""
    m = read_manifest(out)
    pixels = np.load(Path(out) / fmt.MEMMAP_DIR / "pixels.npy")
    labels = np.load(Path(out) / fmt.MEMMAP_DIR / "label.npy")
    paths = _sample_paths(m)
    assert len(pixels) == len(labels) == 2 * m["num_samples"] == 2 * len(paths)
    for i, p in enumerate(paths):
        with Image.open(src / p) as img:
            crop = center_crop_adm(img, RES).transpose(2, 0, 1)
        assert np.array_equal(pixels[2 * i], crop) and np.array_equal(pixels[2 * i + 1], crop[:, :, ::-1]), p
        assert labels[2 * i] == labels[2 * i + 1] == m["classes"].index(p.split("/")[0]), p
    return m


# -- the feature: bad files skipped, listed and counted ---------------------------------------------

def test_bad_files_are_skipped_listed_and_the_rest_prepared(tmp_path, capsys):
    src = _folder(tmp_path / "imgs")
    out = prepare(str(src), str(tmp_path / "ds"), **_kw())
    m = _check_records(out, src)
    assert {s["path"]: s["reason"][:len(BAD[Path(s["path"]).name])] for s in m["skipped"]} == \
        {f"a/{name}": why for name, why in BAD.items()}
    assert m["num_samples"] == 6 + 5 and m["source"]["count"] == 6 + 5 + len(BAD)
    assert m["converted_to_rgb"] == CONVERTED
    assert m["small_images"] == {"policy": "upscale", "resolution": RES, "upscaled": 1,
                                 "smallest": {"path": "a/small.png", "size": [10, 10]}}
    screen = capsys.readouterr().out.splitlines()
    assert screen[0].startswith(f"prepare: skipped {len(BAD)} of 15 files (a/link.jpg: broken symbolic link") and \
        "and 1 more); all listed in manifest.json" in screen[0]
    assert screen[1] == "prepare: converted to RGB: 4 images (1 CMYK, 1 L, 1 P, 1 RGBA)"
    assert screen[2].startswith("prepare: upscaled 1 image smaller than 16 px (smallest 10x10: a/small.png)")


def test_small_images_skip_and_strict(tmp_path):
    src = _folder(tmp_path / "imgs")
    m = read_manifest(prepare(str(src), str(tmp_path / "ds"), **_kw(small_images="skip")))
    small = next(s for s in m["skipped"] if s["path"] == "a/small.png")
    assert small["reason"].startswith("smaller than the 16 px crop (10x10)")
    assert m["small_images"]["skipped"] == 1 and m["num_samples"] == 10
    with pytest.raises(UserError) as e:
        prepare(str(src), str(tmp_path / "strict"), **_kw(strict=True))
    assert str(e.value).startswith(f"{src / 'a' / 'link.jpg'}: broken symbolic link")  # the first in listing order
    assert not (tmp_path / "strict.partial").exists()
    assert prepare(str(src), str(tmp_path / "resumed"), max_batches=1, **_kw()) is None  # a plan that skips files
    with pytest.raises(UserError, match=r"link.jpg: broken symbolic link .*the unfinished run in .*resumed.partial "
                                        r"skips it"):
        prepare(str(src), str(tmp_path / "resumed"), **_kw(strict=True))
    for name in BAD:
        (src / "a" / name).unlink()
    with pytest.raises(UserError, match=r"small.png: smaller than the 16 px crop \(10x10\)"):
        prepare(str(src), str(tmp_path / "strict"), **_kw(strict=True, small_images="skip"))
    m = read_manifest(prepare(str(src), str(tmp_path / "strict"), **_kw(strict=True)))  # upscaled: usable
    assert m["skipped"] == [] and m["small_images"]["upscaled"] == 1


def test_a_file_that_fails_only_when_decoded_leaves_no_empty_record(tmp_path):
    """It passes the check, so the plan counts it; the rank skips it and the last sample fills its row.
    Two ranks as separate invocations, rank 0 interrupted and resumed on the way."""
    src = _folder(tmp_path / "imgs", bad=False, n_good=4)
    (src / "a" / "rgb1x.jpg").write_bytes(_corrupt_body_jpeg(np.random.default_rng(1)))  # rank 0's block
    out = tmp_path / "ds"
    kw = _kw(world_size=2, wait_timeout=1)
    assert prepare(str(src), str(out), rank=0, max_batches=1, **kw) is None  # plan, then one batch
    assert prepare(str(src), str(out), rank=1, **kw) is None
    assert prepare(str(src), str(out), rank=0, **kw) == str(out)
    m = _check_records(str(out), src)
    assert [(s["path"], s["reason"][:17]) for s in m["skipped"]] == [("a/rgb1x.jpg", "failed when decod")]
    assert m["num_samples"] == 8 and m["source"]["moved"] == [[3, 8]]  # b/rgb3.png into rank 0's last row
    with pytest.raises(UserError, match=r"rgb1x.jpg: failed when decoded .*--strict"):
        prepare(str(src), str(tmp_path / "strict"), **_kw(strict=True))


def test_an_empty_class_folder_or_one_without_usable_images_is_refused(tmp_path):
    src = _folder(tmp_path / "imgs", bad=False)
    (src / "c").mkdir()
    (src / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=f"{src / 'c'}: class folder without image files"):
        prepare(str(src), str(tmp_path / "ds"), **_kw())
    (src / "c" / "zero.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=rf"{src / 'c'}: no usable image in this class folder \(first: c/zero.jpg: "
                                        r"empty file"):
        prepare(str(src), str(tmp_path / "ds"), **_kw())
    assert not (tmp_path / "ds.partial").exists()


# -- item 1: --overwrite replaces only a dataset prepare made, never the source -----------------------

def _refused(src: Path, out: Path, match: str, **over):
    """Refused with one line before any work, the source untouched and no .partial anywhere."""
    before = _snapshot(src.parent)
    with pytest.raises(UserError, match=match) as e:
        prepare(str(src), str(out), **_kw(encoders=["hog-patch"], **over))
    assert "\n" not in str(e.value)
    assert _snapshot(src.parent) == before
    return e.value


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_not_a_prepared_dataset_is_never_replaced(tmp_path, monkeypatch, overwrite):
    prep = sys.modules["irepa.data.prepare"]  # the module (irepa.data.prepare is also the function's name)
    monkeypatch.setattr(prep, "build_encoder", lambda e: pytest.fail("work started before OUT was checked"))
    monkeypatch.setattr(prep, "open_codec", lambda *a: pytest.fail("work started before OUT was checked"))
    src = _folder(tmp_path / "imgs", bad=False)
    out = tmp_path / "out"
    _folder(out / "imgs", bad=False)  # the user's images, and an unrelated file
    (out / "notes.txt").write_text("mine")
    _refused(src, out, "exists and is not a dataset made by prepare", overwrite=overwrite)
    (out / fmt.MANIFEST).write_text(json.dumps({"format": "something else"}))
    _refused(src, out, "exists and is not a dataset made by prepare", overwrite=overwrite)
    _refused(src, tmp_path / "out" / "notes.txt", "a file, not a folder", overwrite=overwrite)
    for where in (src, src / "a", src / "a" / "ds", tmp_path):  # the source, inside it, around it
        _refused(src, where, "is the source folder|inside the source folder|contains the source folder",
                 overwrite=overwrite)
    (tmp_path / "ds.partial").mkdir()  # a folder of that name that prepare did not make
    (tmp_path / "ds.partial" / "keep.txt").write_text("mine")
    _refused(src, tmp_path / "ds", "ds.partial: a folder that is not an unfinished preparation", overwrite=overwrite)


def test_overwrite_replaces_a_prepared_dataset_and_an_empty_out_is_used(tmp_path):
    src = _folder(tmp_path / "imgs", bad=False)
    out = tmp_path / "ds"
    out.mkdir()  # made ahead by the user: empty, so nothing to lose
    assert prepare(str(src), str(out), **_kw()) == str(out)
    with pytest.raises(UserError, match="already holds a prepared dataset with other settings.*--overwrite"):
        prepare(str(src), str(out), **_kw(resolution=32))
    prepare(str(src), str(out), **_kw(resolution=32, overwrite=True))
    assert read_manifest(out)["resolution"] == 32 and not list(tmp_path.glob("ds.*"))


def test_a_folder_that_appears_at_out_meanwhile_is_kept_and_so_is_the_dataset(tmp_path, monkeypatch):
    """OUT is checked again at the final rename: what appeared there is not replaced, even with --overwrite,
    and the finished dataset waits in OUT.partial."""
    src = _folder(tmp_path / "imgs", bad=False)
    out = tmp_path / "ds"
    assert prepare(str(src), str(out), max_batches=1, **_kw()) is None
    _folder(out / "imgs", bad=False)  # appears while the run is interrupted
    before = _snapshot(out)
    # the rerun's first check of OUT refuses it already; without that check the final rename is reached
    monkeypatch.setattr(sys.modules["irepa.data.prepare"], "check_out", lambda *a: False, raising=False)
    with pytest.raises(UserError, match=rf"{out}: appeared while preparing \(not a dataset made by prepare\); the "
                                        rf"finished dataset is kept in {out}.partial"):
        prepare(str(src), str(out), **_kw(overwrite=True))
    assert _snapshot(out) == before and fmt.made_by_prepare(f"{out}.partial")


# -- items 9 and 13: the command line's mistakes are one line, before any work ----------------------------

def _script_main():
    spec = importlib.util.spec_from_file_location("launch_prepare", ROOT / "launch" / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("options,message", [
    ({"--storage": "fp16"}, "--storage fp16: choose from bf16, fp8"),
    ({"--formats": "parquet"}, "--formats parquet: choose from ffcv, memmap"),
    ({"--resolution": "8", "--encoders": "hog-patch"}, "--resolution 8: hog-patch: image size 8x8 is not a multiple "
                                                       "of 16 px; .*the smallest resolution these encoders and VAE "
                                                       "take is 16"),
    ({"--resolution": "0"}, "--resolution 0: a positive number of pixels"),
    ({"--batch_size": "0"}, "--batch_size 0: at least 1 image per batch"),
    ({"--small_images": "shrink"}, "--small_images shrink: choose from upscale, skip"),
    ({"--kind": "latent"}, "--kind latent needs --vae"),
])
def test_bad_options_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch, options, message):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    src = _folder(tmp_path / "imgs", bad=False)
    before = _snapshot(tmp_path)
    opts = {"--resolution": str(RES), "--kind": "pixels", "--encoders": "[]", "--formats": "memmap", **options}
    with pytest.raises(SystemExit) as e:
        cli.run(_script_main(), "prepare.py", [str(src), str(tmp_path / "ds"), *sum(opts.items(), ())])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("prepare.py: "), err
    assert re.search(message, err), err
    assert _snapshot(tmp_path) == before  # no ds.partial, nothing in the source


# -- item 9: under torchrun ----------------------------------------------------------------------------

_SLOW_RANK_1 = """
import sys, time
import torch.distributed as dist
from irepa.data.prepare import prepare
dist.init_process_group("gloo")
module = sys.modules[prepare.__module__]
read = module._progress
if dist.get_rank() == 1:  # a rank that reads the progress files late (a loaded machine)
    module._progress = lambda partial, r: (time.sleep(1.0), read(partial, r))[1]
out = prepare(sys.argv[1], sys.argv[2], resolution={res}, kind="pixels", encoders=[], formats=("memmap",),
              batch_size=2, progress=False, num_threads=1)
open(f"{{sys.argv[3]}}/rank-{{dist.get_rank()}}.txt", "w").write(str(out))  # not stdout: the ranks' lines interleave
dist.destroy_process_group()
"""


def test_torchrun_a_rank_that_reads_progress_late_still_agrees_the_work_is_done(tmp_path):
    """Rank 1 reads the progress files a second later than rank 0: both must still decide the
    preparation is complete before rank 0's finalize moves those files into the dataset (before
    the fix rank 1 saw no files, returned early and exited, and rank 0 failed in its gather)."""
    from test_parallel import _env

    src = _folder(tmp_path / "imgs", bad=False, n_good=2)
    (tmp_path / "w.py").write_text(_SLOW_RANK_1.format(res=RES))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "w.py"), str(src), str(tmp_path / "ds"), str(tmp_path)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [(tmp_path / f"rank-{r}.txt").read_text() for r in range(2)] == [str(tmp_path / "ds")] * 2
    _check_records(str(tmp_path / "ds"), src)


def test_torchrun_skips_bad_files_and_an_error_on_one_rank_ends_both_with_one_line(tmp_path):
    from test_parallel import _env

    src = _folder(tmp_path / "imgs", bad=False, n_good=4)
    (src / "a" / "text.jpg").write_text("not an image\n")  # found by rank 0's check
    (src / "b" / "rgb2x.jpg").write_bytes(_corrupt_body_jpeg(np.random.default_rng(1)))  # fails in rank 1's block

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "launch/prepare.py"), str(src), str(out), "--resolution", str(RES), "--kind", "pixels",
               "--encoders", "[]", "--formats", "memmap", "--batch_size", "2", *extra]
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)

    p = torchrun(tmp_path / "ds")
    assert p.returncode == 0, p.stdout + p.stderr
    m = _check_records(str(tmp_path / "ds"), src)
    assert [s["path"] for s in m["skipped"]] == ["a/text.jpg", "b/rgb2x.jpg"] and m["num_samples"] == 8
    assert p.stdout.splitlines()[0].startswith("prepare: skipped 2 of 10 files (a/text.jpg: not an image file")

    (src / "a" / "text.jpg").unlink()
    p = torchrun(tmp_path / "strict", "--strict", "true")
    out = p.stdout + p.stderr
    msg = f"prepare.py: {src / 'b' / 'rgb2x.jpg'}: failed when decoded"
    assert p.returncode != 0
    assert [line for line in out.splitlines() if line.startswith(msg)] != [] and \
        sum(line.startswith(msg) for line in out.splitlines()) == 1, out  # printed by rank 0 only
    assert f"traceback : {msg}" in out, out  # both ranks' error files, in torchrun's summary
    assert "data/prepare.py\", line" not in out and "Connection closed" not in out, out
    assert (tmp_path / "strict.partial" / "failed-1").exists()  # what stops rank 0 at its next batch
    # the same request without --strict continues the unfinished run (here as separate invocations)
    kw = _kw(world_size=2, wait_timeout=1)
    assert prepare(str(src), str(tmp_path / "strict"), rank=1, **kw) is None
    assert prepare(str(src), str(tmp_path / "strict"), rank=0, **kw) == str(tmp_path / "strict")
    assert [s["path"] for s in _check_records(str(tmp_path / "strict"), src)["skipped"]] == ["b/rgb2x.jpg"]
    assert not list((tmp_path / "strict").glob("failed-*"))
