"""The trainer end to end on tiny digits runs: exact resume after a kill, SIGTERM, bad checkpoints."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irepa.config import resolve
from irepa.train import checkpoint as ckpt_io

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.name", "SiT-Tiny/2", "--model.input_size", "8", "--data.resolution", "64",
        "--batch_size", "16", "--log_every", "1", "--ckpt_every", "3", "--sample_steps", "4",
        "--ema_decays", "[0.9]", "--warmup_steps", "0"]


_CACHE = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_dataset_cache(tmp_path_factory):
    """The digits are prepared once for the module, not once per run folder."""
    _CACHE["dir"] = str(tmp_path_factory.mktemp("datasets"))


def run_train(out_dir, name, *extra, env_extra=None, check=True):
    # CPU even on a GPU host: exact-resume checks need deterministic kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *TINY, "--out_dir", str(out_dir), "--run_name", name,
           "--data.cache_dir", _CACHE["dir"], *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, tuple]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = (r["loss"], r["denoise"], r["align"], r["grad_norm"])  # last entry per step wins
    return out


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    run_train(tmp_path, "full", "--steps", "8")
    killed = run_train(tmp_path, "killed", "--steps", "8", env_extra={"IREPA_SIGNAL_AT": f"5:{int(signal.SIGKILL)}"},
                       check=False)
    assert killed.returncode == -signal.SIGKILL
    ckpts = [p.name for p in ckpt_io.complete_checkpoints(tmp_path / "killed")]
    assert ckpts == ["step-0000003"]
    resumed = run_train(tmp_path, "killed", "--steps", "8")
    assert "resumed from" in resumed.stderr and "step 3" in resumed.stderr
    full, res = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(full) == sorted(res) == list(range(1, 9))
    for step in full:
        assert full[step] == pytest.approx(res[step], rel=1e-6, abs=1e-7), step
    # losses fall and the alignment term is live: from ~0 (random projector) clearly down
    assert full[8][0] < full[1][0] and full[8][2] < full[1][2] - 0.1
    assert (tmp_path / "full" / "samples" / "step-0000008.png").stat().st_size > 0
    assert list((tmp_path / "full").glob("events.out.tfevents.*"))


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path):
    proc = run_train(tmp_path, "term", "--steps", "50", env_extra={"IREPA_SIGNAL_AT": f"4:{int(signal.SIGTERM)}"})
    assert proc.returncode == 0
    last = ckpt_io.latest_checkpoint(tmp_path / "term")
    assert last.name == "step-0000004"
    state = ckpt_io.load_checkpoint(last)
    assert state["trainer"]["step"] == 4 and state["trainer"]["data"]["index"] == 4


def test_prepared_data_must_fit_the_model(tmp_path):
    proc = run_train(tmp_path, "mismatch", "--steps", "1", "--model.input_size", "16", check=False)
    assert proc.returncode != 0 and "stored latent shape (1, 8, 8) (prepared at 64 px) != model input shape " \
        "(1, 16, 16)" in proc.stderr
    prepared = str(Path(_CACHE["dir"]) / "digits-latent-64px-hog")
    res = run_train(tmp_path, "res", "--steps", "1", "--data.source", prepared, "--data.resolution", "128", check=False)
    assert res.returncode != 0 and "prepared at 64 px but data.resolution is 128" in res.stderr


def test_jit_digits_preset_trains_and_samples(tmp_path):
    run_train(tmp_path, "jit", "--preset", "digits-jit-irepa", "--model.name", "JiT-T/16", "--model.input_size", "64",
              "--steps", "2", "--ema_decays", "[0.9,0.8]")
    assert (tmp_path / "jit" / "samples" / "step-0000002.png").stat().st_size > 0


def _finished_run(tmp_path):
    run_train(tmp_path, "bad", "--steps", "3")
    return ckpt_io.latest_checkpoint(tmp_path / "bad")


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    ckpt = _finished_run(tmp_path)
    target = ckpt / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    proc = run_train(tmp_path, "bad", "--steps", "6", check=False)
    assert proc.returncode != 0
    assert str(target) in proc.stderr and "truncated" in proc.stderr
    assert target.stat().st_size == len(data) // 2  # nothing rewritten over it


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    ckpt = _finished_run(tmp_path)
    target = ckpt / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ckpt_io.CheckpointError, match=str(target).replace(".", r"\.") + ".*corrupt"):
        ckpt_io.load_checkpoint(ckpt)
    (ckpt / "manifest.json").unlink()  # an interrupted writer leaves no manifest: it is skipped, not loaded
    assert ckpt_io.latest_checkpoint(tmp_path / "bad") is None


def test_unparseable_safetensors_names_file(tmp_path):
    ckpt = _finished_run(tmp_path)
    target = ckpt / "ema.safetensors"
    target.write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt_io.CheckpointError, match="ema.safetensors"):
        ckpt_io.load_checkpoint(ckpt, verify=False)


def test_run_folder_with_other_model_is_refused(tmp_path):
    run_train(tmp_path, "r", "--steps", "1")
    proc = run_train(tmp_path, "r", "--steps", "2", "--model.align_depth", "1", check=False)
    assert proc.returncode != 0 and "different model/align/data config" in proc.stderr


def test_load_for_inference_gives_ema_model(tmp_path):
    run_train(tmp_path, "inf", "--steps", "3")
    model, cfg = ckpt_io.load_for_inference(tmp_path / "inf")
    assert cfg.model.name == "SiT-Tiny/2" and not model.training
    out, hidden = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 8, 8) and hidden.shape[1] == 16


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
    fid_args = ["--fid_every", "2", "--fid_samples", "4", "--fid_weights", str(weights)]
    missing = run_train(tmp_path, "nofile", "--steps", "2", *fid_args, "--fid_ref", str(tmp_path / "none.npz"),
                        check=False)
    assert missing.returncode != 0 and "none.npz" in missing.stderr
    assert not (tmp_path / "nofile" / "metrics.jsonl").exists()  # refused before step 0
    run_train(tmp_path, "fid", "--steps", "2", *fid_args, "--fid_ref", str(ref))
    rows = [json.loads(line) for line in (tmp_path / "fid" / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in rows if "fid_online" in r]
    assert len(fids) == 1 and fids[0]["step"] == 2 and fids[0]["fid_online"] > 0


def test_help_lists_every_key_and_bad_keys_suggest_the_right_one():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--help", "--preset", "sit-xl2-irepa"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--model.name = 'SiT-XL/2'" in out.stdout and "--train.micro_batch_size = 0" in out.stdout
    assert "gradients accumulate" in out.stdout  # the field's documentation
    bad = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--train.micro_bach_size", "2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "did you mean train.micro_batch_size" in bad.stderr
    assert "Traceback" not in bad.stderr
