"""Where a comparison keeps things (OUT is the comparison folder):

  spec.json                             the spec (irepa.compare.spec)
  setup.json                            the metric used, the classifier's accuracy, the real-data floor
  runs/<recipe>-s<seed>/                trainer run folders (checkpoints, TensorBoard, sample grids)
  evals/<recipe>-s<seed>/step-N.json    one evaluation, written atomically
  evals/<recipe>-s<seed>/step-N-eval-seed-E.json   the same checkpoint scored with another
                                        evaluation noise batch (--eval_noise: the metric's sampling noise)
  results.csv, summary.md, convergence.png, tb/   the report (irepa.compare.report)
"""
from __future__ import annotations

import os
from pathlib import Path

SPEC = "spec.json"
SETUP = "setup.json"


def run_name(recipe, seed: int) -> str:
    return f"{recipe.name}-s{seed}"


def eval_path(out: Path, recipe, seed: int, step: int) -> Path:
    return Path(out) / "evals" / run_name(recipe, seed) / f"step-{step:07d}.json"


def noise_path(out: Path, recipe, seed: int, step: int, eval_seed: int) -> Path:
    return Path(out) / "evals" / run_name(recipe, seed) / f"step-{step:07d}-eval-seed-{eval_seed}.json"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
