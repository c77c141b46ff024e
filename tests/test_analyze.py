"""irepa.analysis and its CLI launch/analyze.py: metrics over encoders, correlation with gFID,
spatial-norm pictures."""
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from irepa import analysis

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_analyze", ROOT / "launch" / "analyze.py")
cli = sys.modules["launch_analyze"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def patch_pixels(images):
    """A weight-free 'encoder': each 16 px patch as 4x4 averaged pixels, [B, (H/16)^2, 3*16]."""
    return F.unfold(F.avg_pool2d(images, 4), 4, stride=4).transpose(1, 2)


def white_noise(images):
    g = torch.Generator().manual_seed(int(images.sum().item() * 1000) % 2**31)
    return torch.randn(images.shape[0], (images.shape[-1] // 16) ** 2, 32, generator=g)


FAKE = {"pixels": patch_pixels, "noise": white_noise}


def _png_ok(path):
    data = Path(path).read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_measure_encoders_digits_256():
    data = analysis.digits_set(256, limit=40)
    rows, per_image = analysis.measure_encoders(FAKE, data, batch_size=40)
    by = {r["encoder"]: r for r in rows}
    assert set(by) == {"pixels", "noise"}
    for r in rows:
        assert r["tokens"] == 256 and r["images"] == 40
        assert all(k in r for k in ("lds", "lds_paper", "cds", "rmsc", "srss", "srss_images", "probe_acc"))
    assert by["pixels"]["dim"] == 48 and by["noise"]["dim"] == 32
    # strokes are spatially smooth; noise has no structure
    assert by["pixels"]["lds"] > 0.2 > abs(by["noise"]["lds"])
    assert by["pixels"]["cds"] > 0.01 > abs(by["noise"]["cds"])
    assert by["pixels"]["srss_images"] > 0 and by["pixels"]["srss"] > 0
    assert all(0 <= r["probe_acc"] <= 1 for r in rows)
    assert per_image["pixels"]["lds"].shape == (40,)


def test_linear_probe():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    centers = rng.normal(0, 5, (4, 16))
    x = centers[labels] + rng.normal(0, 1, (40, 16))
    assert analysis.linear_probe(x, labels) == 1.0
    assert analysis.linear_probe(rng.normal(size=(40, 16)), labels) < 0.7
    assert analysis.linear_probe(x[:3], np.array([0, 1, 2])) >= 0  # one image per class: no stratified split


def test_digits_128_have_srss():
    """SRSS is NaN only where the release's metric_srss is (< 2 fg or < 1 bg token): the 8x8 token
    grid at 128 px is measured (it was always NaN under a 64-token rule inside the metric)."""
    data = analysis.digits_set(128, limit=8)
    data.labels = None  # no probe
    rows, per_image = analysis.measure_encoders({"pixels": patch_pixels}, data)
    assert "probe_acc" not in rows[0]
    assert rows[0]["tokens"] == 64 and rows[0]["srss_images"] == 8 and rows[0]["srss"] > 0
    assert np.isfinite(per_image["pixels"]["srss"]).all()


def test_metrics_cli_writes_files(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_build_encoders", lambda names, device: {n: FAKE[n] for n in cli._names(names)})
    path = cli.metrics(encoders="pixels,noise", out=str(tmp_path), limit=20, batch_size=10, device="cpu")
    summary = json.loads(Path(path).read_text())
    assert [r["encoder"] for r in summary["encoders"]] == ["pixels", "noise"]
    with open(tmp_path / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    with open(tmp_path / "per_image.csv") as f:
        assert len(list(csv.DictReader(f))) == 40


def _table(tmp_path):
    rng = np.random.default_rng(0)
    lds = np.linspace(0.1, 0.6, 7)
    rows = []
    for i, v in enumerate(lds):
        rows.append({"encoder": f"enc{i}", "lds": v, "cds": v / 10 + rng.normal(0, 0.01),
                     "rmsc": 0.5 + rng.normal(0, 0.1), "probe_acc": rng.uniform(0.2, 0.8),
                     "srss": "nan" if i == 0 else v, "gfid": 40 - 30 * v + rng.normal(0, 1)})
    p = tmp_path / "table.csv"
    analysis.write_rows(rows, p)
    return p, rows


def test_correlate_table_and_figure(tmp_path):
    table, rows = _table(tmp_path)
    png = cli.correlate(str(table), out=str(tmp_path / "out"))
    assert _png_ok(png)
    with open(tmp_path / "out" / "correlation.csv") as f:
        got = {r["metric"]: r for r in csv.DictReader(f)}
    assert set(got) == {"lds", "cds", "srss", "rmsc", "probe_acc"}
    g = [r["gfid"] for r in rows]
    want = stats.pearsonr([r["lds"] for r in rows], g)[0]
    assert float(got["lds"]["pearson_r"]) == pytest.approx(want, abs=1e-9) and want < -0.9
    assert float(got["lds"]["spearman_r"]) == pytest.approx(stats.spearmanr([r["lds"] for r in rows], g)[0])
    assert int(got["srss"]["n"]) == 6  # the NaN row is left out


def test_correlate_joins_gfid(tmp_path):
    table, rows = _table(tmp_path)
    metrics_only = [{k: v for k, v in r.items() if k != "gfid"} for r in rows]
    analysis.write_rows(metrics_only, tmp_path / "m.csv")
    analysis.write_rows([{"encoder": r["encoder"], "gfid": r["gfid"]} for r in rows[::-1]], tmp_path / "g.csv")
    cli.correlate(str(tmp_path / "m.csv"), gfid=str(tmp_path / "g.csv"), metrics="lds,cds",
                  out=str(tmp_path / "j"))
    with open(tmp_path / "j" / "correlation.csv") as f:
        got = {r["metric"]: float(r["pearson_r"]) for r in csv.DictReader(f)}
    assert set(got) == {"lds", "cds"} and got["lds"] < -0.9
    with pytest.raises(ValueError, match="gfid"):
        analysis.correlate_rows([{"encoder": "a", "lds": 1.0}])
    analysis.write_rows([{"encoder": r["encoder"], "gfid": r["gfid"]} for r in rows[1:]], tmp_path / "g1.csv")
    with pytest.raises(ValueError, match=r"g1\.csv has no gfid for encoders \['enc0'\]"):
        cli.correlate(str(tmp_path / "m.csv"), gfid=str(tmp_path / "g1.csv"), out=str(tmp_path / "k"))


def test_anchor_maps_and_spatialnorm_png(tmp_path, monkeypatch):
    f = torch.randn(1, 16, 8) + 3.0  # a large shared component: all cosines near 1 before the norm
    before = analysis.anchor_maps(f, [(1, 2)], None)
    after = analysis.anchor_maps(f, [(1, 2)], 1.0)
    assert before.shape == (1, 4, 4) and before[0, 1, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert before.mean() > 0.8 and after.mean() < 0.3  # removing the mean exposes the local contrast
    with pytest.raises(ValueError, match="outside"):
        analysis.anchor_maps(f, [(4, 0)], None)
    monkeypatch.setattr(cli, "_build_encoders", lambda names, device: {n: FAKE[n] for n in cli._names(names)})
    png = cli.spatialnorm(image=3, encoders="pixels,noise", anchors="8,8;2,3", out=str(tmp_path))
    assert _png_ok(png)


def test_folder_set_labels_and_masks(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        (tmp_path / "mask" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 60, 3), 50 * i, np.uint8)).save(tmp_path / "img" / cls / f"{i}.jpg")
            m = np.zeros((40, 60), np.uint8)
            m[:, 30:] = 255
            Image.fromarray(m).save(tmp_path / "mask" / cls / f"{i}.png")
    s = analysis.folder_set(tmp_path / "img", resolution=32, masks=tmp_path / "mask")
    assert s.count == 4 and s.labels.tolist() == [0, 0, 1, 1]
    x = s.load([0, 3])
    assert x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    m = s.load_masks([0, 3], x)
    assert m.shape == (2, 32, 32) and 0.3 < m.float().mean() < 0.7  # center crop keeps half of the right part
    with pytest.raises(FileNotFoundError):
        analysis.folder_set(tmp_path / "nothing")


def test_with_real_encoder(tmp_path):
    encoders = pytest.importorskip("irepa.encoders")
    if not hasattr(encoders, "build"):
        pytest.skip("irepa.encoders.build is not available yet")
    hog = encoders.build("hog-patch")
    data = analysis.digits_set(256, limit=24)
    rows, _ = analysis.measure_encoders({"hog-patch": hog}, data, batch_size=12)
    r = rows[0]
    assert r["tokens"] == 256 and r["dim"] == hog.dim
    assert all(math.isfinite(r[k]) for k in ("lds", "lds_paper", "cds", "rmsc", "probe_acc"))
    png = cli.spatialnorm(image=0, encoders="hog-patch", out=str(tmp_path))
    assert _png_ok(png)
    with pytest.raises(ValueError, match="tiny"):
        cli._build_encoders("hog:big", "cpu")


# ---------------------------------------------------------------------------- bad input


def _fake_encoders(monkeypatch):
    monkeypatch.setattr(cli, "_build_encoders", lambda names, device: {n: FAKE[n] for n in cli._names(names)})


def test_cli_refuses_unknown_options_before_running(tmp_path, monkeypatch):
    # fire binds what it knows, runs the command with defaults (writing outputs), then complains
    _fake_encoders(monkeypatch)
    out = tmp_path / "out"
    for argv, msg in [(["metrics", "--encoder", "pixels", "--out", str(out)], r"unknown option --encoder \(did you mean --encoders\?\)"),
                      (["metric", "--out", str(out)], r"unknown command 'metric' \(did you mean 'metrics'\?\)"),
                      (["metrics", "-q", "1", "--out", str(out)], r"unknown option -q"),
                      (["correlate", "t.csv", "g.csv", "gfid", "lds", str(out), "extra"], "6 positional values for 5"),
                      (["spatialnorm", "--gama", "0.6", "--out", str(out)], r"did you mean --gamma")]:
        with pytest.raises(cli.UsageError, match=msg):
            cli.main(argv)
    assert not out.exists()
    for ok in (["metrics", "--encoders=pixels", "--limit", "4", "-b", "4"], ["metrics", "pixels", "--limit=4"],
               ["spatialnorm", "--gamma", "-0.5"], ["correlate", "--help"], ["--help"]):
        cli.check_args(ok)
    cli.main(["metrics", "--encoders", "pixels", "--limit", "4", "--batch_size", "4", "--out", str(out)])
    assert (out / "metrics.csv").is_file()


def test_cli_argument_checks_write_nothing(tmp_path, monkeypatch):
    _fake_encoders(monkeypatch)
    out = tmp_path / "out"
    cases = [(dict(masks=str(tmp_path)), "--masks .* needs --images"), (dict(encoders=""), "--encoders is empty"),
             (dict(limit=0), "--limit must be >= 1"), (dict(batch_size=0), "--batch_size must be >= 1"),
             (dict(resolution=100), "multiple of 16")]
    for kw, msg in cases:
        with pytest.raises(cli.UsageError, match=msg):
            cli.metrics(**{"encoders": "pixels", "out": str(out), "limit": 4, **kw})
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.spatialnorm(image=str(tmp_path / "missing.png"), encoders="pixels", out=str(out))
    with pytest.raises(cli.UsageError, match=r"digits have images 0\.\.1796"):
        cli.spatialnorm(image=99999, encoders="pixels", out=str(out))
    with pytest.raises(cli.UsageError, match="row,col"):
        cli.spatialnorm(image=3, anchors="1;2", encoders="pixels", out=str(out))
    with pytest.raises(cli.UsageError, match="outside the 8x8"):
        cli.spatialnorm(image=3, anchors="8,0", resolution=128, encoders="pixels", out=str(out))
    assert not out.exists()
    # one anchor "--anchors 4,1" reaches the function as the tuple (4, 1)
    assert _png_ok(cli.spatialnorm(image=3, anchors=(4, 1), resolution=128, encoders="pixels", out=str(out)))


def _folder(tmp_path, classes=("a", "b"), n=2, size=(60, 40), masks=True):
    from PIL import Image

    for cls in classes:
        (tmp_path / "img" / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "mask" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(tmp_path / "img" / cls / f"{i}.jpg")
            if masks:
                m = np.zeros((size[1], size[0]), np.uint8)
                m[:, size[0] // 2:] = 255
                Image.fromarray(m).save(tmp_path / "mask" / cls / f"{i}.png")
    return tmp_path / "img", tmp_path / "mask"


def test_folder_masks_checked_before_any_encoder_runs(tmp_path):
    img, mask = _folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="mask folder .*nowhere does not exist"):
        analysis.folder_set(img, 32, masks=tmp_path / "nowhere")
    (mask / "b" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images have no mask .*b/1\.jpg needs .*mask/b/1\.png"):
        analysis.folder_set(img, 32, masks=mask)
    from PIL import Image  # a mask with another aspect ratio would be cropped differently from its image
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(mask / "b" / "1.png")
    s = analysis.folder_set(img, 32, masks=mask)
    s.load_masks([0], s.load([0]))
    with pytest.raises(ValueError, match=r"mask .*b/1\.png is 40x40 but its image .*b/1\.jpg is 60x40"):
        s.load_masks([3], s.load([3]))


def test_folder_limit_spreads_over_classes_and_names_files(tmp_path):
    img, _ = _folder(tmp_path, classes=("a", "b", "c"), n=4, masks=False)
    s = analysis.folder_set(img, 32, limit=6)
    assert s.count == 6 and sorted(set(s.labels.tolist())) == [0, 1, 2]  # not just the first classes
    assert s.names[0] == "a/0.jpg" and s.names[-1] == "c/3.jpg"


def test_unreadable_image_is_named(tmp_path):
    img, _ = _folder(tmp_path, masks=False)
    bad = img / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    s = analysis.folder_set(img, 32)
    with pytest.raises(ValueError, match=r"b/1\.jpg: cannot read image"):
        s.load([3])


def test_metrics_cli_explains_missing_srss_and_names_files(tmp_path, monkeypatch):
    _fake_encoders(monkeypatch)
    img, mask = _folder(tmp_path, n=2, size=(64, 64))
    path = cli.metrics(encoders="pixels", images=str(img), out=str(tmp_path / "o1"), resolution=32)
    summary = json.loads(Path(path).read_text())
    assert summary["masks"] is None and "--masks" in summary["srss_note"]
    assert "srss" not in summary["encoders"][0]
    with open(tmp_path / "o1" / "per_image.csv") as f:
        assert [r["file"] for r in csv.DictReader(f)] == ["a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg"]
    path = cli.metrics(encoders="pixels", images=str(img), masks=str(mask), out=str(tmp_path / "o2"), resolution=32)
    summary = json.loads(Path(path).read_text())
    assert summary["masks"] == str(mask) and summary["encoders"][0]["srss_images"] == 0
    assert "2x2 token grid at 32 px has no token pairs at distance >= 6" in summary["srss_note"]
    path = cli.metrics(encoders="pixels", images=str(img), masks=str(mask), out=str(tmp_path / "o4"), resolution=128)
    summary = json.loads(Path(path).read_text())
    assert summary["srss_note"] is None and summary["encoders"][0]["srss_images"] == 4


def test_mask_filter_drops_images_before_every_metric(tmp_path, monkeypatch):
    """--mask_min_tokens N is the release's dataset filter (spatial_metrics_comparison.py@99ad4ac,
    64 tokens): images whose max-pooled token mask has < N fg or < N bg tokens are left out of
    every metric; nothing is filtered by default."""
    from PIL import Image

    _fake_encoders(monkeypatch)
    img, mask = _folder(tmp_path, n=2, size=(64, 64))  # right half foreground: 32 + 32 tokens at 128 px
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask / "b" / "1.png")  # all foreground: 0 background
    path = cli.metrics(encoders="pixels", images=str(img), masks=str(mask), out=str(tmp_path / "all"), resolution=128)
    summary = json.loads(Path(path).read_text())
    assert summary["count"] == 4 and summary["images_dropped_by_mask_filter"] == 0
    assert summary["encoders"][0]["srss_images"] == 3  # b/1 has no background: NaN
    path = cli.metrics(encoders="pixels", images=str(img), masks=str(mask), out=str(tmp_path / "f"), resolution=128,
                       mask_min_tokens=32)
    summary = json.loads(Path(path).read_text())
    assert summary["count"] == 3 and summary["images_dropped_by_mask_filter"] == 1 and summary["mask_min_tokens"] == 32
    assert summary["encoders"][0]["images"] == 3 and summary["encoders"][0]["srss_images"] == 3
    with open(tmp_path / "f" / "per_image.csv") as f:
        assert [r["file"] for r in csv.DictReader(f)] == ["a/0.jpg", "a/1.jpg", "b/0.jpg"]
    with pytest.raises(cli.UsageError, match="no image passes the mask filter.*33 foreground"):
        cli.metrics(encoders="pixels", images=str(img), masks=str(mask), out=str(tmp_path / "g"), resolution=128,
                    mask_min_tokens=33)
    with pytest.raises(cli.UsageError, match="pass --masks"):
        cli.metrics(encoders="pixels", images=str(img), out=str(tmp_path / "h"), resolution=128, mask_min_tokens=8)
    assert not (tmp_path / "g").exists() and not (tmp_path / "h").exists()


def test_correlate_bad_tables_are_named(tmp_path):
    table, rows = _table(tmp_path)
    metrics_only = [{k: v for k, v in r.items() if k != "gfid"} for r in rows]
    analysis.write_rows(metrics_only, tmp_path / "m.csv")
    m = str(tmp_path / "m.csv")

    def gfid_csv(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    names = [r["encoder"] for r in rows]
    fid = gfid_csv("fid.csv", "encoder,fid\n" + "".join(f"{n},{i}\n" for i, n in enumerate(names)))
    with pytest.raises(ValueError, match=r"fid\.csv has no column 'gfid' \(columns: \['encoder', 'fid'\]\)"):
        cli.correlate(m, gfid=fid, out=str(tmp_path / "o"))
    noenc = gfid_csv("noenc.csv", "name,gfid\n" + "".join(f"{n},{i}\n" for i, n in enumerate(names)))
    with pytest.raises(ValueError, match=r"noenc\.csv has no column 'encoder'"):
        cli.correlate(m, gfid=noenc, out=str(tmp_path / "o"))
    dup = gfid_csv("dup.csv", "encoder,gfid\n" + "".join(f"{n},{i}\n" for i, n in enumerate(names + names[:1])))
    with pytest.raises(ValueError, match=r"dup\.csv lists encoder 'enc0' twice"):
        cli.correlate(m, gfid=dup, out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"metrics \['foo'\] are not columns of"):
        cli.correlate(str(table), metrics="lds,foo", out=str(tmp_path / "o"))
    empty = gfid_csv("empty.csv", "")
    with pytest.raises(ValueError, match=r"table .*empty\.csv has no rows"):
        cli.correlate(empty, out=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match=r"table .*nope\.csv does not exist"):
        cli.correlate(str(tmp_path / "nope.csv"), out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    # spaces after the commas (a hand-written CSV) are fine
    g = [r["gfid"] for r in rows]
    spaced = gfid_csv("spaced.csv", "encoder, gfid\n" + "".join(f"{n}, {v}\n" for n, v in zip(names, g)))
    cli.correlate(m, gfid=spaced, metrics="lds", out=str(tmp_path / "s"))
    with open(tmp_path / "s" / "correlation.csv") as f:
        got = list(csv.DictReader(f))
    assert float(got[0]["pearson_r"]) == pytest.approx(stats.pearsonr([r["lds"] for r in rows], g)[0])


def test_mask_encodings_agree(tmp_path):
    # 0/255 gray, 0/1 bytes (a common export: looks black), palette indices, 16-bit, RGB
    from PIL import Image

    m = np.zeros((40, 60), np.uint8)
    m[5:35, 20:50] = 1
    pal = Image.fromarray(m, mode="P")
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # index 1 is dark red (luminance < 0.5)
    files = {"gray.png": Image.fromarray(m * 255), "bytes01.png": Image.fromarray(m),
             "palette.png": pal, "i16.png": Image.fromarray(m.astype(np.uint16) * 65535),
             "rgb.png": Image.fromarray(np.stack([m * 255] * 3, -1))}
    got = {}
    for name, im in files.items():
        im.save(tmp_path / name)
        got[name] = analysis.read_mask(tmp_path / name, 32)
    ref = got["gray.png"]
    assert 0.3 < ref.float().mean() < 0.7
    for name, v in got.items():
        assert torch.equal(v, ref), name
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"bad\.png: cannot read mask"):
        analysis.read_mask(tmp_path / "bad.png", 32)
