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


def test_digits_128_excluded_from_srss():
    data = analysis.digits_set(128, limit=8)
    data.labels = None  # no probe
    rows, per_image = analysis.measure_encoders({"pixels": patch_pixels}, data)
    assert "probe_acc" not in rows[0]
    assert rows[0]["tokens"] == 64 and rows[0]["srss_images"] == 0 and math.isnan(rows[0]["srss"])
    assert np.isnan(per_image["pixels"]["srss"]).all()


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
    hog = encoders.build("hog")
    data = analysis.digits_set(256, limit=24)
    rows, _ = analysis.measure_encoders({"hog": hog}, data, batch_size=12)
    r = rows[0]
    assert r["tokens"] == 256 and r["dim"] == hog.dim
    assert all(math.isfinite(r[k]) for k in ("lds", "lds_paper", "cds", "rmsc", "probe_acc"))
    png = cli.spatialnorm(image=0, encoders="hog", out=str(tmp_path))
    assert _png_ok(png)
    with pytest.raises(ValueError, match="tiny"):
        cli._build_encoders("hog:big", "cpu")
