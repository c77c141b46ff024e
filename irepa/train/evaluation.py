"""Evaluation during training, of the first EMA model: sample grids (one row per class, to
samples/step-N.png and the run's log) and the online FID monitor (train.fid_every, against
train.fid_ref: a small-N FID, biased upward against a 50K evaluation; eval/fid_online and a
metrics.jsonl row). Samples are drawn and decoded by the run's recipe, as launch/sample.py
draws them. Under FSDP the EMA is gathered first (collective: every rank calls these)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from irepa.errors import InputError
from irepa.train.assemble import Run
from irepa.train.ema import ShardedEMA
from irepa.train.metrics_log import MetricsLog


class Evaluator:
    def __init__(self, run: Run, run_dir: Path, is_main: bool, log: Callable[[str], None]):
        """Loads the FID reference now (train.fid_every): a missing reference or weights fail before step 0."""
        self.run, self.run_dir, self.is_main, self.log = run, run_dir, is_main, log
        self.fid_ref = None
        t = run.cfg.train
        if t.fid_every and is_main:
            if run.decode is None:
                raise InputError("train.fid_every needs a decoder for samples (the dataset's VAE folder)")
            from irepa.metrics.fid import reference_stats
            self.fid_ref = reference_stats(t.fid_ref, weights=t.fid_weights, device=run.device)

    @torch.no_grad()
    def sample_grid(self, step: int, metrics: MetricsLog | None = None, per_class: int = 8,
                    max_classes: int = 10) -> Path | None:
        if self.run.decode is None:
            self.log("no sample grid: the dataset's VAE folder is not on this machine")
            return None
        model = self._full_ema_model()  # collective under FSDP
        if not self.is_main:
            return None
        from irepa.grid import save_grid
        cfg, device = self.run.cfg, self.run.device
        classes = min(cfg.model.num_classes, max_classes)
        labels = torch.arange(classes, device=device).repeat_interleave(per_class)
        g = torch.Generator(device=device).manual_seed(cfg.train.seed)
        images = self._sample_images(model, labels, g)
        path = save_grid(images, self.run_dir / "samples" / f"step-{step:07d}.png", nrow=per_class)
        if metrics is not None and metrics.writer is not None:
            import numpy as np
            from PIL import Image
            metrics.writer.add_image("samples", np.asarray(Image.open(path)), step, dataformats="HWC")
        self.log(f"samples {path}")
        return path

    @torch.no_grad()
    def online_fid(self, step: int, metrics: MetricsLog | None = None) -> float | None:
        """FID of train.fid_samples EMA samples (random labels) against train.fid_ref."""
        model = self._full_ema_model()  # collective under FSDP
        if not self.is_main:
            return None
        from irepa.metrics.fid import online_fid
        cfg, device = self.run.cfg, self.run.device
        g = torch.Generator(device=device).manual_seed(cfg.train.seed + 17)
        n_cls = cfg.model.num_classes

        def sample_fn(b):
            return self._sample_images(model, torch.randint(n_cls, (b,), generator=g, device=device), g)

        t = cfg.train
        fid = online_fid(sample_fn, self.fid_ref, n=t.fid_samples, weights=t.fid_weights, device=device,
                         quantize=self.run.recipe.sample_quantize)  # as launch/sample.py writes the recipe's samples
        if metrics is not None:
            metrics.row({"step": step, "fid_online": fid, "fid_samples": t.fid_samples})
            if metrics.writer is not None:
                metrics.writer.add_scalar("eval/fid_online", fid, step)
        self.log(f"online FID ({t.fid_samples} samples) at step {step}: {fid:.2f}")
        return fid

    def _sample_images(self, model, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """EMA samples for `labels`, decoded to images in [0, 1] (train.sample_method / sample_steps)."""
        m, t = self.run.cfg.model, self.run.cfg.train
        noise = torch.randn(labels.shape[0], m.in_channels, m.input_size, m.input_size, generator=generator,
                            device=self.run.device)
        x = self.run.recipe.sample(model, noise, labels, method=t.sample_method, steps=t.sample_steps,
                                   generator=generator)
        return self.run.decode(x.float())

    def _full_ema_model(self):
        ema = self.run.model.ema
        if not isinstance(ema, ShardedEMA):
            return ema.models[0]
        sd = ema.full_state_dict(0)
        if not self.is_main:
            return None
        model = self.run.recipe.build_model(fused=False).to(self.run.device).eval()
        model.load_state_dict(sd)
        return model
