"""Export a (sharded) checkpoint to the single-file layout of irepa/train/checkpoint.py.

    python -m irepa.train.export RUN                 # newest checkpoint -> RUN/export/
    python -m irepa.train.export RUN/checkpoints/step-0400000 --out /models/xl-irepa

The output folder is itself a run folder (config.json + checkpoints/step-N/ with
model, ema, optimizer and trainer safetensors), so
`irepa.train.checkpoint.load_for_inference(OUT)` gives the full EMA model and a
single-process run pointed at it (`--out_dir PARENT --run_name NAME`) resumes from it.
Runs in one process on CPU: torch.distributed.checkpoint reassembles every shard into
full tensors, whatever world size wrote them. Encoder weights are not needed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from irepa.config import Config
from irepa.train import checkpoint as ckpt_io
from irepa.train import sharded_checkpoint


def _find_checkpoint(path: Path) -> Path:
    ckpt = path if (path / "manifest.json").is_file() else ckpt_io.latest_checkpoint(path)
    if ckpt is None:
        raise ckpt_io.CheckpointError(
            f"{path}: no complete checkpoint (expected {path}/checkpoints/step-N/manifest.json)")
    return ckpt


def _encoder_dims(ckpt: Path, tr: dict) -> list[int]:
    if "encoder_dims" in tr:
        return list(tr["encoder_dims"])
    raise ckpt_io.CheckpointError(f"{ckpt}/trainer.safetensors: no encoder_dims in the trainer state")


def load_sharded_offline(ckpt: str | Path, verify: bool = True):
    """A sharded checkpoint -> (plain trained tree, optimizer, EMA, trainer state, rng, Config), one process."""
    from irepa.train.build import DiffusionWithAlignment, build_head, build_model
    from irepa.train.ema import EMA

    ckpt = Path(ckpt)
    cfg_path = ckpt.parent.parent / "config.json"
    if not cfg_path.is_file():
        raise ckpt_io.CheckpointError(f"{cfg_path}: missing; it is needed to rebuild the model")
    cfg = Config.from_dict(json.loads(cfg_path.read_text()))
    tr, _ = sharded_checkpoint.read_trainer_state(ckpt)
    model = build_model(cfg, fused=False)
    head = build_head(cfg, model.dim, _encoder_dims(ckpt, tr), fused=False)
    net = DiffusionWithAlignment(model, head)  # same parameter names as the trainer's AlignedDiffusion
    params = [p for p in net.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    ema = EMA(net.model, cfg.train.ema_decays)
    tr, rng = sharded_checkpoint.load_sharded(ckpt, net, optimizer, ema, verify=verify)
    return net, optimizer, ema, tr, rng, cfg


def export(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the single-file layout of the newest (or the given) checkpoint; returns its step folder."""
    path = Path(path)
    ckpt = _find_checkpoint(path)
    run_dir = ckpt.parent.parent
    out = Path(out) if out is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "config.json", out / "config.json")
    if not sharded_checkpoint.is_sharded(ckpt):  # already one file per part: verify and copy
        ckpt_io.verify_checkpoint(ckpt)
        dst = out / "checkpoints" / ckpt.name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ckpt, dst)
        return dst
    net, optimizer, ema, tr, rng, _ = load_sharded_offline(ckpt)
    step = int(tr.pop("step"))
    tr.pop("sharded", None)
    return ckpt_io.save_checkpoint(out, step, model_sd=net.state_dict(), ema_sds=ema.state_dicts(),
                                   optimizer_sd=optimizer.state_dict(), trainer_state=tr, rng_tensors=rng, keep=0)


def main(run: str, out: str | None = None) -> None:
    dst = export(run, out)
    print(f"[irepa] exported {dst}", flush=True)


if __name__ == "__main__":
    import fire
    fire.Fire(main)
