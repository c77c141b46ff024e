"""The digits SiT presets: never trained on mirrored digits, and REPA / iREPA alike but for the alignment."""
import numpy as np

from irepa.compare import backend
from irepa.recipes import resolve

TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "data.resolution": 64, "train.batch_size": 16}


def test_repa_and_irepa_digits_presets_differ_only_in_the_alignment():
    a, b = resolve("digits-sit-irepa").to_dict(), resolve("digits-sit-repa").to_dict()
    assert {k for k in a if a[k] != b[k]} == {"align", "preset"}
    assert a["align"]["encoders"] == b["align"]["encoders"] == ["hog-patch"]


def test_digits_presets_read_only_unmirrored_views(tmp_path, digits_cache):
    """A mirrored digit is not a digit of its class (the metric classifier recognizes 38% of mirrored
    real digits, 99% of unmirrored ones): data.hflip false reads record 2i of every sample, never 2i + 1."""
    from irepa.data import build_loader

    for preset in ("digits-sit-irepa", "digits-sit-repa", "digits-meanflow-irepa"):
        assert resolve(preset).data.hflip is False, preset
    assert resolve("digits-jit-irepa").data.hflip is True  # pixel-space JiT keeps its own data settings
    cfg = backend.run_config("digits-sit-irepa", TINY, seed=0, steps=1, out_dir=tmp_path, run_name="r",
                             cache_dir=digits_cache)
    root = backend.prepare_data(cfg).root
    for hflip in (False, True):
        loader = build_loader(root, 16, ["hog-patch"], seed=3, hflip=hflip)
        rec = np.concatenate([loader.records(e) for e in range(3)])
        assert (rec % 2 == 1).any() == hflip, hflip
