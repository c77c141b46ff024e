"""Everything a comparison needs from the trainer and the recipes, in one module.

The rest of irepa.compare never imports irepa.train or irepa.recipes: it resolves configs,
trains a run up to a step, loads the EMA model of a checkpoint, samples and decodes (through
the run's recipe, as the trainer's grids do), and reads the real data through the functions here. Evaluation at fixed steps is done from outside the
trainer: train to s1 (the trainer writes a checkpoint at its last step), evaluate that
checkpoint, then train the same run folder to s2 (the trainer resumes exactly), and so on.
tests/test_compare.py checks that segmenting this way gives the same weights, bit for bit,
as one uninterrupted run.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from irepa.config import Config

# keys the comparison sets itself for every run (a recipe may not override them)
OWNED_KEYS = ("train.steps", "train.seed", "train.out_dir", "train.run_name", "train.resume", "data.cache_dir")


class Interrupted(RuntimeError):
    """Training stopped before its target step (SIGINT / SIGTERM): rerun to continue."""


def run_config(preset: str, overrides: dict, *, seed: int, steps: int, out_dir: str | Path, run_name: str,
               cache_dir: str | Path, sampler: dict | None = None) -> Config:
    """The Config of one run of a comparison. `sampler` (train.sample_method / train.sample_steps
    overrides, CompareSpec.sampler) is the evaluation sampler; it also sets the runs' own sample
    grids, which do not affect training."""
    bad = [k for k in overrides if k in OWNED_KEYS or k in {o.split(".")[1] for o in OWNED_KEYS}]
    if bad:
        raise ValueError(f"recipe overrides {bad}: the comparison sets {', '.join(OWNED_KEYS)} itself")
    from irepa.recipes import resolve
    from irepa.sampling import check_settings

    cfg = resolve(preset, {**overrides, **(sampler or {}), "train.steps": steps, "train.seed": seed,
                            "train.out_dir": str(out_dir), "train.run_name": run_name, "train.resume": True,
                            "data.cache_dir": str(cache_dir)})
    try:
        check_settings(cfg.train.sample_method, cfg.train.sample_steps)
    except ValueError as e:
        raise ValueError(f"preset {preset!r}: evaluation sampler: {e}") from None
    return cfg


@contextmanager
def _one_process_run():
    """Train in this process as a world of one, whatever torchrun set (one run per rank), and
    make sure SIGINT / SIGTERM get their previous handlers back afterwards."""
    keys = ("RANK", "WORLD_SIZE")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_sig = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.update(RANK="0", WORLD_SIZE="1")
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for s, h in saved_sig.items():
            signal.signal(s, h)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / cfg.train.run_name


def checkpoint_at(folder: str | Path, step: int) -> Path | None:
    """The complete checkpoint of `step` in a run folder, or None."""
    from irepa.train.checkpoint import complete_checkpoints
    return next((p for p in complete_checkpoints(folder) if p.name == f"step-{step:07d}"), None)


def latest_step(folder: str | Path) -> int:
    from irepa.train.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(folder)
    return int(ckpt.name.split("-")[1]) if ckpt is not None else 0


def train_to(cfg: Config) -> Path:
    """Train (or resume) the run folder of `cfg` up to cfg.train.steps; -> that step's checkpoint.

    Interrupted when the trainer stopped early on a signal (it wrote a checkpoint first)."""
    from irepa.train.trainer import train

    with _one_process_run():
        train(cfg)
    ckpt = checkpoint_at(run_dir(cfg), cfg.train.steps)
    if ckpt is None:
        raise Interrupted(f"{run_dir(cfg)}: training stopped at step {latest_step(run_dir(cfg))} before step "
                          f"{cfg.train.steps}")
    return ckpt


def load_ema(ckpt: str | Path, device="cpu"):
    """(EMA model in eval mode, its run's Config) of a checkpoint folder."""
    from irepa.train.export import load_for_inference
    return load_for_inference(ckpt, "ema", device)


def latent_shape(cfg: Config) -> tuple[int, int, int]:
    return cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size


@dataclass
class Data:
    """The prepared dataset of a run: where it is, how model outputs decode, the real images."""
    root: Path
    decode: object
    shift: torch.Tensor | None
    scale: torch.Tensor | None
    manifest: dict

    def real(self, device="cpu", batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sample's unmirrored view (record 2 i), decoded like generated samples:
        images [N, 3, H, W] float in [0, 1] on the CPU, labels [N]."""
        mm = self.root / "memmap"
        if not (mm / "label.npy").is_file():
            raise FileNotFoundError(f"{self.root}: the comparison reads the real images from its memmap format "
                                    f"(memmap/label.npy missing); prepare it with --formats memmap")
        labels = torch.from_numpy(np.load(mm / "label.npy", mmap_mode="r")[0::2].copy()).long()
        if self.manifest["kind"] == "pixels":
            arr = np.load(mm / "pixels.npy", mmap_mode="r")
            return torch.from_numpy(arr[0::2].copy()).float().div(255), labels
        lat = np.load(mm / "latent.npy", mmap_mode="r")
        out = []
        for i in range(0, len(labels), batch):
            mean = torch.from_numpy(lat[2 * i:2 * (i + batch):2, 0].copy()).float().to(device)
            out.append(self.decode((mean - self.shift.to(device)) / self.scale.to(device)).float().cpu())
        return torch.cat(out), labels


def prepare_data(cfg: Config, device="cpu") -> Data:
    """Prepare the run's dataset if it is not there yet (built-in digits), check it against the
    model, and return its handle. Needs nothing from the run folder."""
    from irepa.recipes import for_config
    from irepa.train.build import build_data

    recipe = for_config(cfg)
    torch_state = torch.get_rng_state()
    with _one_process_run():
        bundle = build_data(cfg, recipe, recipe.build_model(fused=False), 0, 1, torch.device(device))
    torch.set_rng_state(torch_state)
    decode = recipe.decoder(bundle.manifest, torch.device(device))
    if decode is None:
        raise ValueError(f"{cfg.data.source}: no decoder for this dataset on this machine (its VAE folder is "
                         f"missing); the comparison evaluates decoded samples")
    loader = bundle.loader
    return Data(Path(loader.root), decode, getattr(loader, "shift", None), getattr(loader, "scale", None),
                dict(bundle.manifest))


def sample_quantize(cfg: Config) -> str:
    """How the run's recipe turns decoded samples into uint8 images (irepa.grid.QUANTIZE)."""
    from irepa.recipes import for_config
    return for_config(cfg).sample_quantize


@torch.no_grad()
def sample_images(model, cfg: Config, ckpt: str | Path, data: Data, noise: torch.Tensor, labels: torch.Tensor,
                  method: str, steps: int, batch: int = 256, device="cpu") -> torch.Tensor:
    """EMA samples for `labels` from `noise` (no guidance), drawn and decoded by the run's recipe
    as launch/sample.py does: [N, 3, H, W] in [0, 1] on the CPU. The decoder is the checkpoint's
    (a recipe whose decoder is a trained part, REPA-E's VAE, reads it from `ckpt`)."""
    from irepa.recipes import for_config

    recipe = for_config(cfg)
    decode = recipe.decoder(data.manifest, device, checkpoint=Path(ckpt))
    if decode is None:
        raise ValueError(f"{ckpt}: no decoder for this run's samples on this machine")
    out = []
    for i in range(0, len(labels), batch):
        x = recipe.sample(model, noise[i:i + batch].to(device), labels[i:i + batch].to(device), method=method,
                          steps=steps, null_class=cfg.model.num_classes)
        out.append(decode(x.float()).float().cpu())
    return torch.cat(out)
