"""irepa.train.run_log: TensorBoard and (optional) Weights & Biases get the same scalars and sample grids.

Compared against: what the TensorBoard sink receives in the same tiny run (the W&B sink must
receive exactly those tags, values, steps and images), and wandb's own offline run folder.
"""
import importlib.util
import sys

import numpy as np
import pytest

from irepa.errors import UserError
from irepa.recipes import resolve
from irepa.train import run_log
from irepa.train.trainer import Trainer

TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "data.resolution": 64, "train.batch_size": 8,
        "train.log_every": 1, "train.ckpt_every": 100, "train.sample_steps": 2, "train.ema_decays": [0.9],
        "train.device": "cpu", "train.steps": 2}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


def _cfg(tmp_path, digits_cache, **over):
    return resolve("digits-sit-irepa", {**TINY, "train.out_dir": str(tmp_path), "train.run_name": "r",
                                        "data.cache_dir": digits_cache, **over})


class _Recorder:
    def __init__(self):
        self.scalars, self.images = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, image_HWC, step):
        self.images.append((tag, np.array(image_HWC), step))

    def close(self):
        self.closed = True


def test_wandb_sink_gets_what_tensorboard_gets(tmp_path, digits_cache, monkeypatch):
    """A fake W&B sink and a recording TensorBoard sink in one 2-step run: identical calls."""
    seen = {}
    real_tb = run_log.TensorBoardSink

    class TB(real_tb, _Recorder):
        def __init__(self, log_dir, purge_step=None):
            real_tb.__init__(self, log_dir, purge_step)
            _Recorder.__init__(self)
            seen["tb"] = self

        def add_scalar(self, tag, value, step):
            _Recorder.add_scalar(self, tag, value, step)
            super().add_scalar(tag, value, step)

        def add_image(self, tag, image_HWC, step):
            _Recorder.add_image(self, tag, image_HWC, step)
            super().add_image(tag, image_HWC, step)

        def close(self):
            _Recorder.close(self)
            super().close()

    class FakeWandb(_Recorder):
        def __init__(self, cfg, run_dir):
            super().__init__()
            seen["wandb"] = self

    monkeypatch.setattr(run_log, "TensorBoardSink", TB)
    monkeypatch.setattr(run_log, "WandbSink", FakeWandb)
    monkeypatch.setattr(run_log, "import_wandb", lambda: None)  # the trainer's check before it writes
    Trainer(_cfg(tmp_path, digits_cache, **{"log.wandb": "true"})).train()
    tb, wb = seen["tb"], seen["wandb"]
    tags = {t for t, _, _ in tb.scalars}
    assert {"loss/loss", "loss/denoise", "loss/align", "optim/grad_norm", "optim/lr", "perf/img_per_s"} <= tags
    assert {s for _, _, s in tb.scalars} == {1, 2}
    assert wb.scalars == tb.scalars
    assert len(tb.images) == len(wb.images) == 1
    (t1, a, s1), (t2, b, s2) = tb.images[0], wb.images[0]
    assert (t1, s1) == (t2, s2) == ("samples", 2) and a.dtype == np.uint8 and a.ndim == 3
    np.testing.assert_array_equal(a, b)
    assert wb.closed and tb.closed
    assert list((tmp_path / "r").glob("events.out.tfevents.*"))


def test_wandb_off_by_default_and_missing_wandb_is_one_clear_error(tmp_path, digits_cache, monkeypatch):
    cfg = _cfg(tmp_path, digits_cache)
    assert cfg.log.wandb is False
    log = run_log.open_run_log(cfg, tmp_path)
    assert [type(s).__name__ for s in log.sinks] == ["TensorBoardSink"]
    log.close()
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match="log.wandb is on but wandb is not installed: pip install wandb"):
        run_log.open_run_log(_cfg(tmp_path, digits_cache, **{"log.wandb": "yes"}), tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_without_network(tmp_path, digits_cache, monkeypatch):
    """log.wandb_mode offline: a real wandb run written under the run folder; a resume continues its id."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "")  # offline needs no account
    over = {"log.wandb": "true", "log.wandb_mode": "offline", "log.wandb_project": "irepa-test"}
    Trainer(_cfg(tmp_path, digits_cache, **over)).train()
    run_dir = tmp_path / "r"
    run_id = (run_dir / run_log.WANDB_ID_FILE).read_text().strip()
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and list(runs[0].glob("*.wandb")), list((run_dir / "wandb").iterdir())
    Trainer(_cfg(tmp_path, digits_cache, **{**over, "train.steps": 3})).train()  # resumes: same W&B run id
    assert (run_dir / run_log.WANDB_ID_FILE).read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
