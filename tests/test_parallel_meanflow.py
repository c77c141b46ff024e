"""MeanFlow under train.parallel ddp and fsdp (2 ranks, gloo) against one process replaying the run.

torch.func.jvp cannot take a DDP module, and FSDP2 gathers parameters in forward hooks. Here
the JVP runs inside the wrapped module's forward (the recipe's loss is called from
AlignedDiffusion.forward), on the inner model: DDP's autograd hooks still reduce the
gradients of u, FSDP2's hooks gather the blocks for every pass (the JVP included). The replay
is the test_parallel.py one: each rank's batch and per-rank draws, gradients averaged over the
two shards, one AdamW step. Losses and gradient norms must agree to float32 round-off, which
they would not if a rank's gradients were left unsynchronized.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from irepa.recipes import resolve

from test_parallel import WORLD, _env, replay_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 2, 8
TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 4, "data.resolution": 32, "train.batch_size": BATCH,
        "train.precision": "fp32", "train.log_every": 1, "train.ckpt_every": 2, "train.sample_steps": 1,
        "train.ema_decays": [0.9], "optim.warmup_steps": 0, "train.device": "cpu", "train.steps": STEPS}


def _cfg(out_dir: Path, name: str, cache: str, **extra):
    return resolve("digits-meanflow-irepa", {**TINY, "data.cache_dir": cache, "train.out_dir": str(out_dir),
                                             "train.run_name": name, **extra})


def _torchrun(out_dir: Path, name: str, cache: str, **extra) -> list[dict]:
    over = {**TINY, "data.cache_dir": cache, "train.out_dir": str(out_dir), "train.run_name": name, **extra}
    args = []
    for k, v in over.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(ROOT / "launch/train.py"), "--preset", "digits-meanflow-irepa", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]


def _replay(out_dir: Path, cache: str) -> list[dict]:
    from irepa.train.trainer import Trainer

    return replay_steps(Trainer(_cfg(out_dir, "replay", cache)), STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("mf-parallel")
    cache = str(tmp_path_factory.mktemp("mf-datasets"))
    return out, cache, _replay(out, cache)  # first: it also prepares the digits set, in one process


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_single_process(reference, mode):
    out, cache, ref = reference
    logs = _torchrun(out, mode, cache, **{"train.parallel": mode})
    assert [m["step"] for m in logs] == list(range(1, STEPS + 1))
    for got, want in zip(logs, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5), (mode, logs, ref)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4, abs=1e-5), (mode, logs, ref)
