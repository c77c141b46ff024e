"""Fault probes of issue 15 (items 2, 3, 4, 5, 7, 8), in process on tiny digits runs or tiny parts.

Each test names the fault it injects and what must happen; each failed on the commit before the
fix (54c0d58): a fresh start in an old folder pruned its own checkpoints and mixed config.json /
metrics.jsonl, a NaN gradient was reported at the next log step and its checkpoint loaded and
sampled, a crafted DCP `.metadata` ran code, a corrupt newest checkpoint stopped the run with no
fallback, a disk-full error named no file and left step-N.tmp behind, and metrics.jsonl repeated
the steps after a resume. What a test compares against is said in its docstring.
"""
import errno
import hashlib
import json
import math
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from irepa.recipes import resolve
from irepa.train import checkpoint
from irepa.train.step import Part
from irepa.train.trainer import Trainer

TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "data.resolution": 64, "train.batch_size": 16,
        "train.log_every": 1, "train.ckpt_every": 3, "train.sample_steps": 2, "train.ema_decays": [0.9],
        "optim.warmup_steps": 0, "train.device": "cpu", "train.sample_every": 0}
_CACHE = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_dataset_cache(digits_cache):
    _CACHE["dir"] = digits_cache


@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


def _cfg(out_dir, name, **over):
    return resolve("digits-sit-irepa", {**TINY, "train.out_dir": str(out_dir), "train.run_name": name,
                                        "data.cache_dir": _CACHE["dir"], **over})


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rehash(ckpt: Path, name: str) -> None:
    """Make the manifest agree with an altered file: whoever alters a folder can rewrite it too."""
    m = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _poison(ckpt: Path, name: str) -> None:
    """NaN into the first weight of a safetensors file, manifest updated (a checkpoint of older code)."""
    path = ckpt / name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    k = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, str(path), metadata=meta)
    _rehash(ckpt, name)


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6: tests work on copies."""
    out = tmp_path_factory.mktemp("faults")
    Trainer(_cfg(out, "run", **{"train.steps": 6})).train()
    return out / "run"


def _copy(src: Path, tmp_path: Path, name="run") -> Path:
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def _tiny_parts(seed=0) -> dict:
    torch.manual_seed(seed)
    m = nn.Linear(3, 2)
    return {"model": Part(m, m, torch.optim.AdamW(m.parameters(), lr=1e-3), list(m.parameters()), 1e-3)}


_STATE = {"data": {"epoch": 0, "index": 0}}


# -- item 2: a fresh start in a folder holding another run -------------------------------------
def test_fresh_start_moves_the_old_run_aside_and_keeps_both(two_ckpts, tmp_path):
    """Compared against the old run's own files: after `train.resume false` (a different lr) the old
    config.json, both checkpoints and metrics.jsonl are intact in previous-*/, and the folder holds only
    the new run (its step-3 checkpoint kept, its own config and metrics)."""
    run = _copy(two_ckpts, tmp_path)
    old_cfg = (run / "config.json").read_text()
    old_model = (run / "checkpoints/step-0000003/model.safetensors").read_bytes()
    Trainer(_cfg(tmp_path, "run", **{"train.steps": 3, "train.resume": False, "optim.lr": 3e-4})).train()
    prev = list(run.glob("previous-*"))
    assert len(prev) == 1
    prev = prev[0]
    assert (prev / "config.json").read_text() == old_cfg
    assert [p.name for p in checkpoint.complete_checkpoints(prev)] == ["step-0000003", "step-0000006"]
    assert (prev / "checkpoints/step-0000003/model.safetensors").read_bytes() == old_model
    assert _steps(prev) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-0000003"]  # not pruned away
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 3e-4
    assert _steps(run) == [1, 2, 3]
    assert (run / "checkpoints/step-0000003/model.safetensors").read_bytes() != old_model
    resumed = Trainer(_cfg(tmp_path, "run", **{"train.steps": 3, "optim.lr": 3e-4}))
    assert resumed.step == 3  # resumes the new run, not the old step 6


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A folder of a higher step (another run's) is present: keep=1 still keeps the new step-3."""
    parts = _tiny_parts()
    checkpoint.save(tmp_path, 9, parts, trainer_state=_STATE, rng={"cpu": torch.get_rng_state()}, keep=1)
    checkpoint.save(tmp_path, 2, parts, trainer_state=_STATE, rng={"cpu": torch.get_rng_state()}, keep=1)
    checkpoint.save(tmp_path, 3, parts, trainer_state=_STATE, rng={"cpu": torch.get_rng_state()}, keep=1)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-0000003", "step-0000009"]


def test_config_mismatch_names_the_move_aside(two_ckpts, tmp_path):
    _copy(two_ckpts, tmp_path)
    from irepa.errors import UserError  # printed as one line by the launch scripts
    with pytest.raises(UserError, match=r"holds another run.*--train.resume false to move that run "
                                         r"aside into .*previous-<time>"):
        Trainer(_cfg(tmp_path, "run", **{"model.align_depth": 2}))


# -- item 3: non-finite values ---------------------------------------------------------------------
def test_nonfinite_gradient_is_reported_at_its_step_and_never_saved(tmp_path):
    """A NaN gradient with a finite loss at step 3 (a hook on one weight), logging and checkpoints
    every 5 steps: the error names step 3 and the gradient, and no checkpoint exists."""
    tr = Trainer(_cfg(tmp_path, "nan", **{"train.steps": 6, "train.log_every": 5, "train.ckpt_every": 5}))
    calls = {"n": 0}
    step_fn = tr.run.step_fn

    def step(batch, index):
        calls["n"] = index
        return step_fn(batch, index)

    tr.run.step_fn = step
    model = tr.run.model.module.model
    w = model.final_layer.linear.weight if hasattr(model, "final_layer") else tr.run.model.params[-1]
    w.register_hook(lambda g: g * float("nan") if calls["n"] == 2 else g)
    with pytest.raises(checkpoint.NonFiniteError, match=r"non-finite gradient of model at step 3 .*Last good "
                                                         r"checkpoint: None"):
        tr.train()
    assert checkpoint.complete_checkpoints(tmp_path / "nan") == []
    assert not list((tmp_path / "nan" / "checkpoints").glob("*")) if (tmp_path / "nan/checkpoints").exists() else True


def test_nan_on_one_rank_stops_every_rank_at_its_step(tmp_path, digits_cache):
    """2 ranks (torchrun, gloo, FSDP; tests/test_parallel.py's tiny run): rank 1's batch of step 3
    holds a NaN latent (tests/interrupts.py), logs every 4 steps, checkpoints every 2. Both ranks
    must stop at the step-4 checkpoint with the same error, naming step 3, the loss (non-finite on
    rank 1 only) and the gradient (non-finite on both after the reduce); nothing of step 3 or later
    is written; step 2's checkpoint verifies against its manifest and one process resumes from it
    and trains to step 4 with finite weights and loss. On f06bd2e the ranks agreed but the error
    named only the gradient: the ranks' findings were merged by min over (step, names), which kept
    rank 0's list and dropped rank 1's non-finite loss."""
    from test_parallel import WORLD, _cfg as parallel_cfg, _launch
    cache = {"data.cache_dir": digits_cache}
    proc = _launch(tmp_path, "nan", script="tests/interrupts.py", timeout=300,
                   args=("--nan_rank", "1", "--nan_at", "2", "--nan_key", "x"), **cache, **{"train.log_every": 4})
    assert proc.returncode != 0, proc.stderr[-3000:]
    said = sorted(line for line in proc.stdout.splitlines() if line.startswith("[rank "))
    assert [line[:8] for line in said] == [f"[rank {r}]" for r in range(WORLD)], proc.stdout + proc.stderr[-3000:]
    messages = {line[9:] for line in said}
    assert len(messages) == 1, said  # every rank raises the same error
    run = tmp_path / "nan"
    assert re.fullmatch(rf"NonFiniteError: non-finite loss and gradient of model at step 3 in {re.escape(str(run))} "
                        r".*; no checkpoint was written after it\. Last good checkpoint: "
                        rf"{re.escape(str(run / 'checkpoints/step-0000002'))}", messages.pop())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]  # no step-4, no .tmp
    assert not (run / "metrics.jsonl").exists() or _steps(run) == []
    checkpoint.verify_checkpoint(run / "checkpoints/step-0000002")
    tr = Trainer(parallel_cfg(tmp_path, "nan", **cache))
    assert tr.step == 2 and all(torch.isfinite(p).all() for p in tr.run.model.params)
    last = tr.train()
    assert last["step"] == 4 and math.isfinite(last["loss"])
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-0000002", "step-0000004"]


def test_save_refuses_nonfinite_weights_and_ema():
    """checkpoint.save checks what it stores: a NaN weight, or an inf in the EMA, writes nothing."""
    from irepa.train.ema import EMA
    import tempfile
    for where in ("weights", "ema"):
        parts = _tiny_parts()
        p = parts["model"]
        p.ema = EMA(p.module, [0.9])
        target = p.module.weight if where == "weights" else next(iter(p.ema.state_dicts()[0].values()))
        with torch.no_grad():
            target.view(-1)[0] = float("nan") if where == "weights" else float("inf")
        with tempfile.TemporaryDirectory() as d:
            with pytest.raises(checkpoint.NonFiniteError, match="non-finite value in " +
                               ("model: weight" if where == "weights" else "ema: ")):
                checkpoint.save(d, 1, parts, trainer_state=_STATE, rng={"cpu": torch.get_rng_state()})
            assert checkpoint.complete_checkpoints(d) == [] and not list(Path(d).rglob("*.safetensors"))


def test_resume_skips_a_nonfinite_checkpoint(two_ckpts, tmp_path, capsys):
    """Step 6's weights hold a NaN (written by older code, manifest consistent): resume takes step 3,
    says so, and keeps step 6 as step-0000006.nonfinite."""
    run = _copy(two_ckpts, tmp_path)
    _poison(run / "checkpoints/step-0000006", "model.safetensors")
    tr = Trainer(_cfg(tmp_path, "run", **{"train.steps": 6}))
    assert tr.step == 3 and all(torch.isfinite(p).all() for p in tr.run.model.params)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-0000006" in err and "non-finite" in err
    assert (run / "checkpoints/step-0000006.nonfinite/model.safetensors").is_file()
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-0000003"]


def test_sampling_refuses_nonfinite_weights(two_ckpts, tmp_path):
    """load_for_inference (launch/sample.py's loader) on a NaN EMA: an error naming the file."""
    from irepa.train.export import load_for_inference
    run = _copy(two_ckpts, tmp_path)
    ckpt = run / "checkpoints/step-0000006"
    _poison(ckpt, "ema.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"ema\.safetensors: non-finite weights"):
        load_for_inference(run)


# -- item 4: DCP metadata must not run code --------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling creates the marker file: the code ran
        return open, (self.marker, "w")


def _crafted_sharded(run: Path, marker: Path) -> Path:
    """Turn the newest checkpoint into a 'sharded' one whose dcp/.metadata pickle opens `marker` for writing."""
    ckpt = checkpoint.latest_checkpoint(run)
    (ckpt / "dcp").mkdir()
    (ckpt / "dcp/.metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    m = json.loads((ckpt / "manifest.json").read_text())
    m["sharded"], m["world_size"] = True, 2
    (ckpt / "manifest.json").write_text(json.dumps(m))
    _rehash(ckpt, "dcp/.metadata")
    return ckpt


def test_crafted_dcp_metadata_is_refused_by_resume_and_export(two_ckpts, tmp_path):
    from irepa.train.export import export
    run = _copy(two_ckpts, tmp_path)
    marker = tmp_path / "pwned"
    _crafted_sharded(run, marker)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"dcp/\.metadata: refers to .*open"):
        Trainer(_cfg(tmp_path, "run", **{"train.steps": 6}))
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"dcp/\.metadata"):
        export(run, tmp_path / "out")
    assert not marker.exists()


def test_dcp_round_trip_through_the_restricted_reader(tmp_path):
    """A real DCP save (weights, Adam state with its param groups as byte items, EMA) loads back
    through the restricted unpickler and planner bit for bit."""
    from irepa.train.ema import EMA
    a, b = _tiny_parts(0), _tiny_parts(1)
    for parts in (a, b):
        parts["model"].ema = EMA(parts["model"].module, [0.9])
    a["model"].module(torch.randn(4, 3)).sum().backward()
    a["model"].optimizer.step()
    checkpoint._write_dcp(tmp_path, a, 0)
    checkpoint._load_dcp(tmp_path, b)
    for k, v in a["model"].module.state_dict().items():
        assert torch.equal(v, b["model"].module.state_dict()[k])
    sa, sb = a["model"].optimizer.state_dict(), b["model"].optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert all(torch.equal(sa["state"][i]["exp_avg"], sb["state"][i]["exp_avg"]) for i in sa["state"])


def test_dcp_byte_items_load_without_pickle_code():
    """A byte item (torch 2.13 unpickles these with weights_only=False) holding an object is refused."""
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem
    buf = io.BytesIO()
    torch.save(_Evil("/nonexistent/never"), buf)
    buf.seek(0)
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("x"), dest_offsets=torch.Size([0]),
                    storage_index=MetadataIndex("x"), storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="'x' is not plain data"):
        checkpoint._SafePlanner().load_bytes(item, buf)


# -- item 5: corrupt newest checkpoint --------------------------------------------------------------
def test_invalid_manifest_json_falls_back_to_the_older_checkpoint(two_ckpts, tmp_path, capsys):
    run = _copy(two_ckpts, tmp_path)
    (run / "checkpoints/step-0000006/manifest.json").write_text('{"format_version": 1, "files": {')
    tr = Trainer(_cfg(tmp_path, "run", **{"train.steps": 6}))
    assert tr.step == 3
    err = capsys.readouterr().err
    assert "step-0000006/manifest.json: corrupt manifest, not valid JSON" in err and "resuming from" in err
    assert (run / "checkpoints/step-0000006.corrupt/manifest.json").is_file()


def test_garbage_trainer_state_with_a_valid_hash_falls_back(two_ckpts, tmp_path, capsys):
    run = _copy(two_ckpts, tmp_path)
    ckpt = run / "checkpoints/step-0000006"
    rng = load_file(str(ckpt / "trainer.safetensors"))
    save_file(rng, str(ckpt / "trainer.safetensors"), metadata={"format": "pt", "state": '{"step": 6, "data": {"x": 1}}'})
    _rehash(ckpt, "trainer.safetensors")
    tr = Trainer(_cfg(tmp_path, "run", **{"train.steps": 6}))
    assert tr.step == 3
    assert "trainer.safetensors: invalid trainer state" in capsys.readouterr().err


def test_corrupt_only_checkpoint_is_refused_with_the_ways_on(two_ckpts, tmp_path):
    run = _copy(two_ckpts, tmp_path)
    shutil.rmtree(run / "checkpoints/step-0000003")
    (run / "checkpoints/step-0000006/manifest.json").write_text("not json")
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"manifest\.json: corrupt manifest.*No older "
                                                                r"complete checkpoint.*--train.resume false"):
        Trainer(_cfg(tmp_path, "run", **{"train.steps": 6}))
    assert (run / "checkpoints/step-0000006/manifest.json").read_text() == "not json"  # nothing moved or rewritten


# -- item 7: data verification -----------------------------------------------------------------
def _prepared(tmp_path: Path) -> Path:
    """The session's prepared digits of the TINY config (prepared here if no test did yet)."""
    from irepa.recipes import for_config
    from irepa.train.build import dataset_dir
    cfg = _cfg(tmp_path, "prep", **{"train.steps": 1})
    path = Path(dataset_dir(cfg, for_config(cfg).data_kind))
    if not (path / "manifest.json").is_file():
        Trainer(cfg)
    return path


def _corrupt_dataset(tmp_path: Path, record: int | None = None) -> tuple[Path, int]:
    """A copy of the prepared digits with a NaN in one latent record; the manifest digest rewritten to
    match, as when the bad value was there at preparation (or in bytes outside the sampled blocks)."""
    from irepa.data import format as fmt
    src = _prepared(tmp_path)
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    a = np.load(dst / "memmap/latent.npy", mmap_mode="r+")
    record = (len(a) // 2) | 1 if record is None else record  # an odd record: a mirrored view
    a[record, 0, 0, 3, 4] = np.nan
    a.flush()
    del a
    m = json.loads((dst / "manifest.json").read_text())
    m["files"].update(fmt.record_files(dst, ["memmap/latent.npy"]))
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst, record


def test_full_data_verification_names_the_bad_record(tmp_path):
    ds, rec = _corrupt_dataset(tmp_path)
    over = {"train.steps": 1, "data.source": str(ds), "data.backend": "memmap"}
    with pytest.raises(ValueError, match=rf"memmap/latent\.npy record {rec} \(sample {rec // 2}, mirrored\): "
                                         r"non-finite value in 'latent'"):
        Trainer(_cfg(tmp_path, "full", **over, **{"data.verify": "full"}))
    Trainer(_cfg(tmp_path, "sampled", **over))  # the sampled check cannot see it


def test_first_nonfinite_loss_checks_its_batch_and_names_the_record(tmp_path):
    """The NaN record sits in step 2's batch: the error names step 2, the file and the record."""
    src = _prepared(tmp_path)
    over = {"train.steps": 4, "train.log_every": 4, "train.ckpt_every": 4, "data.backend": "memmap"}
    probe = Trainer(_cfg(tmp_path, "probe", **over, **{"data.source": str(src)}))
    rec = int(probe.run.data.loader.records(0, 1)[5])  # 6th sample of the 2nd batch
    ds, _ = _corrupt_dataset(tmp_path, rec)
    tr = Trainer(_cfg(tmp_path, "bad", **over, **{"data.source": str(ds)}))
    with pytest.raises(checkpoint.NonFiniteError, match=rf"non-finite loss .*at step 2 .*the data is bad: "
                                                         rf".*memmap/latent\.npy record {rec} "):
        tr.train()


# -- item 8: disk full, metrics after a resume -------------------------------------------------
def test_disk_full_names_the_file_and_removes_the_partial_checkpoint(tmp_path, monkeypatch):
    parts = _tiny_parts()
    checkpoint.save(tmp_path, 1, parts, trainer_state=_STATE, rng={"cpu": torch.get_rng_state()})
    real = checkpoint.save_file

    def full_disk(tensors, path, metadata=None):
        if path.endswith("optimizer.safetensors"):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"cannot write .*step-0000002\.tmp/optimizer"
                                                               r"\.safetensors: No space left on device") as e:
        checkpoint.save(tmp_path, 2, parts, trainer_state=_STATE, rng={"cpu": torch.get_rng_state()})
    assert e.value.errno == errno.ENOSPC
    assert not (tmp_path / "checkpoints/step-0000002.tmp").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-0000001"]
    checkpoint.verify_checkpoint(tmp_path / "checkpoints/step-0000001")  # the older one is intact


def test_metrics_have_no_duplicate_steps_after_a_resume(tmp_path):
    """Killed during step 6 after logging steps 4 and 5, resumed from step 3: every step once."""
    class Crash(Exception):
        pass

    tr = Trainer(_cfg(tmp_path, "k", **{"train.steps": 7}))
    step_fn = tr.run.step_fn

    def step(batch, index):
        if index == 5:
            raise Crash()
        return step_fn(batch, index)

    tr.run.step_fn = step
    with pytest.raises(Crash):
        tr.train()
    assert _steps(tmp_path / "k") == [1, 2, 3, 4, 5]
    Trainer(_cfg(tmp_path, "k", **{"train.steps": 7})).train()
    assert _steps(tmp_path / "k") == [1, 2, 3, 4, 5, 6, 7]
