"""The trainer end to end on tiny digits runs, in this process: exact resume after a crash, SIGTERM,
bad checkpoints and run folders refused with their path, the recipes' registry and presets.

A crash and a signal are injected through the loader (the batch before which they happen), so
the production loop carries no test hook; launch/train.py itself is run by test_parallel.py
(torchrun) and by the --help test here.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irepa.recipes import resolve
from irepa.train import checkpoint
from irepa.train.trainer import Trainer

from interrupts import Crash, Interrupt, crash

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "data.resolution": 64, "train.batch_size": 16,
        "train.log_every": 1, "train.ckpt_every": 3, "train.sample_steps": 4, "train.ema_decays": [0.9],
        "optim.warmup_steps": 0, "train.device": "cpu"}
_CACHE = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_dataset_cache(digits_cache):
    """The digits are prepared once for the session, not once per run folder."""
    _CACHE["dir"] = digits_cache


@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


def _cfg(out_dir, name, preset="digits-sit-irepa", **over):
    return resolve(preset, {**TINY, "train.out_dir": str(out_dir), "train.run_name": name,
                            "data.cache_dir": _CACHE["dir"], **over})


def losses(run_dir: Path) -> dict[int, tuple]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = (r["loss"], r["denoise"], r["align"], r["grad_norm"])  # last entry per step wins
    return out


def test_resume_after_a_crash_matches_uninterrupted(tmp_path):
    Trainer(_cfg(tmp_path, "full", **{"train.steps": 8})).train()
    tr = Trainer(_cfg(tmp_path, "killed", **{"train.steps": 8}))
    tr.run.data.loader = Interrupt(tr.run.data.loader, 5, crash)  # dies during step 6: nothing saved after step 3
    with pytest.raises(Crash):
        tr.train()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "killed")] == ["step-0000003"]
    resumed = Trainer(_cfg(tmp_path, "killed", **{"train.steps": 8}))
    assert resumed.step == 3
    resumed.train()
    full, res = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(full) == sorted(res) == list(range(1, 9))
    for step in full:
        assert full[step] == pytest.approx(res[step], rel=1e-6, abs=1e-7), step
    # losses fall and the alignment term is live: from ~0 (random projector) clearly down
    assert full[8][0] < full[1][0] and full[8][2] < full[1][2] - 0.1
    assert (tmp_path / "full" / "samples" / "step-0000008.png").stat().st_size > 0
    assert list((tmp_path / "full").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])  # SIGUSR1: SLURM's --signal warning
def test_stop_signal_writes_checkpoint_and_exits_cleanly(tmp_path, sig):
    before = signal.getsignal(sig)
    tr = Trainer(_cfg(tmp_path, "term", **{"train.steps": 50}))
    tr.run.data.loader = Interrupt(tr.run.data.loader, 3, lambda: os.kill(os.getpid(), sig))
    last = tr.train()  # returns normally after the step the signal arrived in
    assert last["step"] == 4 and last["stopped_by"] == sig and last["stopped_at"] == 4
    assert signal.getsignal(sig) is before  # the handler is put back
    ckpt = checkpoint.latest_checkpoint(tmp_path / "term")
    assert ckpt.name == "step-0000004"
    state = checkpoint.read_checkpoint(ckpt)
    assert state["trainer"]["step"] == 4 and state["trainer"]["data"]["index"] == 4


def test_prepared_data_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"stored latent shape \(1, 8, 8\) \(prepared at 64 px\) != model input "
                                         r"shape \(1, 16, 16\)"):
        Trainer(_cfg(tmp_path, "mismatch", **{"model.input_size": 16}))
    prepared = str(Path(_CACHE["dir"]) / "digits-latent-64px-hog-patch")
    with pytest.raises(ValueError, match="prepared at 64 px but data.resolution is 128"):
        Trainer(_cfg(tmp_path, "res", **{"data.source": prepared, "data.resolution": 128}))


def test_jit_digits_preset_trains_and_samples(tmp_path):
    cfg = _cfg(tmp_path, "jit", "digits-jit-irepa", **{"model.name": "JiT-T/16", "model.input_size": 64,
                                                       "train.steps": 2, "train.ema_decays": [0.9, 0.8]})
    tr = Trainer(cfg)
    assert tr.run.recipe.name == "jit" and tr.run.data.manifest["kind"] == "pixels"
    tr.train()
    assert (tmp_path / "jit" / "samples" / "step-0000002.png").stat().st_size > 0
    assert len(checkpoint.read_checkpoint(checkpoint.latest_checkpoint(tmp_path / "jit"))["ema"]) == 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run folder after 3 steps, with one checkpoint: the tests below work on copies."""
    out = tmp_path_factory.mktemp("finished")
    Trainer(_cfg(out, "run", **{"train.steps": 3})).train()
    return out / "run"


def _copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "bad")
    return checkpoint.latest_checkpoint(tmp_path / "bad")


def test_truncated_checkpoint_is_refused_naming_the_file(finished, tmp_path):
    ckpt = _copy(finished, tmp_path)
    target = ckpt / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=str(target).replace(".", r"\.") + ": truncated"):
        Trainer(_cfg(tmp_path, "bad", **{"train.steps": 6}))  # resuming reads it first
    assert target.stat().st_size == len(data) // 2  # nothing rewritten over it


def test_corrupt_checkpoint_is_refused_naming_the_file(finished, tmp_path):
    ckpt = _copy(finished, tmp_path)
    target = ckpt / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=str(target).replace(".", r"\.") + ".*corrupt"):
        Trainer(_cfg(tmp_path, "bad", **{"train.steps": 6}))
    with pytest.raises(checkpoint.CheckpointError, match=str(target).replace(".", r"\.") + ".*corrupt"):
        checkpoint.read_checkpoint(ckpt)
    (ckpt / "manifest.json").unlink()  # an interrupted writer leaves no manifest: it is skipped, not loaded
    assert checkpoint.latest_checkpoint(tmp_path / "bad") is None


def test_unparseable_safetensors_names_file(finished, tmp_path):
    ckpt = _copy(finished, tmp_path)
    target = ckpt / "ema.safetensors"
    target.write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoint.CheckpointError, match="ema.safetensors"):
        checkpoint.read_checkpoint(ckpt, verify=False)


def test_run_folder_with_other_model_is_refused(finished, tmp_path):
    _copy(finished, tmp_path)
    with pytest.raises(ValueError, match="settings a resume cannot change differ: model.align_depth"):
        Trainer(_cfg(tmp_path, "bad", **{"model.align_depth": 2}))


def test_load_for_inference_gives_ema_model(finished):
    from irepa.train.export import load_for_inference
    model, cfg = load_for_inference(finished)
    assert cfg.model.name == "SiT-Tiny/2" and not model.training
    out, hidden = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 8, 8) and hidden.shape[1] == 16
    ema = checkpoint.read_checkpoint(checkpoint.latest_checkpoint(finished))["ema"][0]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("nope")
    with pytest.raises(ValueError, match="unknown config key"):
        resolve(overrides={"train.nope": 1})
    with pytest.raises(ValueError, match="unknown config key 'eps_typo'"):
        resolve(overrides={"eps_typo": 1})
    with pytest.raises(ValueError, match="projector"):
        resolve(overrides={"align.projector": "linear"})
    cfg = resolve("sit-xl2-irepa", {"batch_size": 32})
    assert (cfg.model.name, cfg.model.align_depth, cfg.align.gamma, cfg.align.weight) == ("SiT-XL/2", 8, 0.6, 1.0)
    repa = resolve("sit-b2-repa")
    assert (repa.align.projector, repa.align.gamma, repa.align.weight, repa.model.align_depth) == ("mlp", None, 0.5, 4)


def test_online_fid_is_logged_and_checked_before_step_0(tmp_path):
    import numpy as np

    from irepa.metrics.inception import InceptionV3

    weights = tmp_path / "inception.pth"
    torch.save(InceptionV3().eval().state_dict(), weights)  # random init: checks the plumbing, not the value
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 2048))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=a.mean(0), sigma=np.cov(a, rowvar=False))
    fid = {"train.steps": 2, "train.fid_every": 2, "train.fid_samples": 4, "train.fid_weights": str(weights)}
    with pytest.raises(FileNotFoundError, match="none.npz"):
        Trainer(_cfg(tmp_path, "nofile", **fid, **{"train.fid_ref": str(tmp_path / "none.npz")}))
    assert not (tmp_path / "nofile" / "metrics.jsonl").exists()  # refused before step 0
    Trainer(_cfg(tmp_path, "fid", **fid, **{"train.fid_ref": str(ref)})).train()
    rows = [json.loads(line) for line in (tmp_path / "fid" / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in rows if "fid_online" in r]
    assert len(fids) == 1 and fids[0]["step"] == 2 and fids[0]["fid_online"] > 0


def test_help_lists_every_key_and_bad_keys_suggest_the_right_one():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--help", "--preset", "sit-xl2-irepa"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--model.name = 'SiT-XL/2'" in out.stdout and "--train.micro_batch_size = 0" in out.stdout
    assert "--train.recipe = 'sit'" in out.stdout and "gradients accumulate" in out.stdout  # the field's documentation
    bad = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--train.micro_bach_size", "2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "did you mean train.micro_batch_size" in bad.stderr
    assert "Traceback" not in bad.stderr
