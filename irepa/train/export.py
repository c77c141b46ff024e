"""Export a checkpoint to single files, and load one back for inference.

    python -m irepa.train.export RUN                 # newest checkpoint -> RUN/export/
    python -m irepa.train.export RUN/checkpoints/step-0400000 --out /models/xl-irepa

The output folder is itself a run folder (config.json + checkpoints/step-N/ with every part's
weights, EMA and optimizer state and the trainer state as safetensors, irepa.train.checkpoint),
so `load_for_inference(OUT)` gives the full EMA model and a single-process run pointed at it
(`--out_dir PARENT --run_name NAME`) resumes from it. Runs in one process on CPU:
torch.distributed.checkpoint reassembles every shard into full tensors, whatever world size
wrote them (DCP metadata through irepa.train.checkpoint's restricted unpickler: nothing in
the folder can run code). Encoder weights are not needed. Both refuse non-finite weights.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from irepa import recipes
from irepa.config import Config
from irepa.errors import InputError, InputNotFound
from irepa.train import checkpoint
from irepa.train.assemble import offline_parts
from irepa.train.run_folder import read_config
from irepa.train.checkpoint import CheckpointError


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete one of a run folder."""
    path = Path(path)
    if not path.is_dir():
        raise InputNotFound(f"{path}: {'not found' if not path.exists() else 'a file'} (expected a run folder or a "
                            f"checkpoint folder RUN/checkpoints/step-N)")
    ckpt = path if (path / "manifest.json").is_file() else checkpoint.latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete checkpoint (expected {path}/checkpoints/step-N/manifest.json)")
    return ckpt


def run_config(ckpt: Path) -> Config:
    """The Config of the run a checkpoint folder belongs to (its config.json)."""
    cfg_path = ckpt.parent.parent / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing; it is needed to rebuild the model")
    return read_config(cfg_path)


def export(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the single-file layout of the newest (or the given) checkpoint; returns its step folder."""
    ckpt = find_checkpoint(path)
    run_dir = ckpt.parent.parent
    out = Path(out) if out is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    cfg = run_config(ckpt)
    shutil.copyfile(run_dir / "config.json", out / "config.json")
    if not checkpoint.read_manifest(ckpt).get("sharded"):  # already one file per part: verify and copy
        manifest = checkpoint.verify_checkpoint(ckpt)
        for name in manifest["files"]:
            if name.endswith(".safetensors") and name != "trainer.safetensors":
                checkpoint.require_finite(checkpoint.read_tensors(ckpt / name), ckpt / name)
        dst = out / "checkpoints" / ckpt.name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ckpt, dst)
        return dst
    tr, _ = checkpoint.read_trainer_state(ckpt)
    if "encoder_dims" not in tr:
        raise CheckpointError(f"{ckpt}/trainer.safetensors: no encoder_dims in the trainer state")
    parts = offline_parts(cfg, list(tr["encoder_dims"]))
    tr, rng = checkpoint.load(ckpt, parts)
    step = int(tr.pop("step"))
    for key in ("sharded", "parts"):
        tr.pop(key, None)
    return checkpoint.save(out, step, parts, trainer_state=tr, rng=rng, keep=0)


def load_for_inference(path: str | Path, which: str = "ema", device: str | torch.device = "cpu",
                       model_name: str | None = None):
    """A run folder (newest checkpoint) or a checkpoint folder -> (diffusion model in eval mode, Config).

    which: "ema" (first EMA), "ema-1", ... or "model" (raw trained weights). The recipe
    (irepa.recipes.for_config(cfg)) turns the model into velocities and samples.
    model_name: the model the caller was told to expect (a tool's --model_name); another one
    than the run's config.json names is refused before any weight is read.
    """
    ckpt = find_checkpoint(path)
    cfg = run_config(ckpt)
    if model_name is not None and model_name != cfg.model.name:
        raise InputError(f"--model_name {model_name}: {path} holds a {cfg.model.name} model "
                         f"({ckpt.parent.parent / 'config.json'}, recipe {cfg.train.recipe}); a run's model comes "
                         f"from its config, so drop --model_name (it names the model of a released .pt file)")
    if checkpoint.read_manifest(ckpt).get("sharded"):
        raise CheckpointError(f"{ckpt}: a sharded (FSDP) checkpoint; export it to single files first: "
                              f"python -m irepa.train.export {ckpt.parent.parent}")
    checkpoint.verify_checkpoint(ckpt)
    fname = {"ema": "ema.safetensors", "model": "model.safetensors"}.get(which, f"{which}.safetensors")
    sd = checkpoint.require_finite(checkpoint.read_tensors(ckpt / fname), ckpt / fname)
    if which == "model":  # the trained tree holds model.* and head.*
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    model = recipes.for_config(cfg).build_model(fused=False)
    model.load_state_dict(sd)
    return model.to(device).eval(), cfg


def main(run: str, out: str | None = None) -> None:
    dst = export(run, out)
    print(f"[irepa] exported {dst}", flush=True)


if __name__ == "__main__":
    import fire
    fire.Fire(main)
