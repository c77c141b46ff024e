"""The training loop: recipe-agnostic. The run is built by irepa.train.assemble.build_run; the loop
calls its step and the components around it:

  run folder      irepa.train.run_folder    checked first, written only after every check and the
                                            checkpoint's load (a refused start leaves it as it was)
  checkpoints     irepa.train.checkpointer  resume from the newest good one; save on schedule and signals
  metrics         irepa.train.metrics_log   metrics.jsonl, TensorBoard / W&B, the progress bar
  non-finite      irepa.train.nonfinite     the first NaN / inf step, named with its batch's check
  evaluation      irepa.train.evaluation    sample grids and online FID of the EMA model

A step's randomness comes from a generator seeded by (seed, rank, step), so a resumed run repeats
an uninterrupted one exactly. The hot loop does not synchronize with the device except on log
and checkpoint steps. SIGTERM / SIGINT / SIGUSR1 end the run after the current step with a
checkpoint, on every rank at the same step (irepa.train.preemption); `train` then reports the signal.
"""
from __future__ import annotations

import sys
import time

import torch

from irepa import recipes
from irepa.config import Config
from irepa.dist import barrier, setup, teardown
from irepa.train import run_folder
from irepa.train.assemble import build_run
from irepa.train.checkpointer import Checkpointer
from irepa.train.evaluation import Evaluator
from irepa.train.metrics_log import MetricsLog, summary
from irepa.train.nonfinite import FiniteWatch
from irepa.train.preemption import StopRequest
from irepa.train.world_checks import check_world


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        env = setup(cfg.train.device)
        check_world(cfg, env.rank, env.world)  # batch over the ranks, same setup and run folder on every node
        self.is_main = env.is_main
        self.run_dir = cfg.run_dir
        run_folder.check(cfg, self.run_dir, recipes.get(cfg.train.recipe))  # reads only: a refusal changes nothing
        if cfg.log.wandb and self.is_main:
            from irepa.train.run_log import import_wandb
            import_wandb()  # now, not when the loop opens the log after config.json is written
        self.run = build_run(cfg, rank=env.rank, world=env.world, device=env.device, log=self._log)
        self.watch = FiniteWatch(env.device, env.world)
        self.evaluator = Evaluator(self.run, self.run_dir, self.is_main, self._log)
        self.checkpointer = Checkpointer(self.run, self.run_dir, self._log)
        self.step = self.checkpointer.resume()
        self.stop = StopRequest(env.world)
        if self.is_main:
            run_folder.start(cfg, self.run_dir, self.step, self._log)
        barrier()

    def train_step(self, batch: dict, index: int) -> dict[str, torch.Tensor]:
        """Step `index` (0-based) of the run, noted for the non-finite check."""
        out = self.run.step_fn(batch, index)
        self.watch.note(out["loss"], self.run.default_step.grad_norms, index + 1)
        return out

    def train(self) -> dict:
        """Run to train.steps; a stop signal ends it after the current step with a checkpoint, and the
        returned row then holds "stopped_by" (the signal) and "stopped_at" (the step of that checkpoint)."""
        with self.stop.handlers():  # they point at this trainer only while it runs
            return self._loop()

    def _loop(self) -> dict:
        t, run = self.cfg.train, self.run
        metrics = MetricsLog(self.cfg, self.run_dir, is_main=self.is_main, world=run.world, device=run.device,
                             flops_per_image=run.flops_per_image,
                             lr=lambda index: run.default_step.lr(run.model, index), before_write=self._check_finite)
        metrics.open(self.step)
        it = iter(run.data.loader)
        last: dict = {}
        stopped = 0
        while self.step < t.steps and not stopped:
            t0 = time.perf_counter()
            batch = next(it)
            metrics.waited(time.perf_counter() - t0)
            out = self.train_step(batch, self.step)
            self.step += 1
            metrics.add(out)
            if self.step % t.log_every == 0 or self.step == t.steps:
                last = metrics.write(self.step)
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                self.save()
            if t.sample_every and self.step % t.sample_every == 0 and self.step != t.steps:
                self.evaluator.sample_grid(self.step, metrics)
            if t.fid_every and self.step % t.fid_every == 0:
                self.evaluator.online_fid(self.step, metrics)
            stopped = self.stop.requested()
        metrics.close_bar()
        if stopped and self.step < t.steps:
            self._log(f"signal {stopped}: writing a checkpoint at step {self.step} and exiting")
            self.save()
            last = {**last, "stopped_by": stopped, "stopped_at": self.step}
        else:
            self.evaluator.sample_grid(self.step, metrics)
        metrics.close()
        self._log(f"done: step {self.step}, run folder {self.run_dir}" + (summary(last) if last else ""))
        return last

    def _check_finite(self) -> None:
        self.watch.check(self.run_dir, self.run.data.loader, self.step)

    def save(self) -> None:
        """A checkpoint of the current step; refused (NonFiniteError) after a non-finite step."""
        self._check_finite()
        self.checkpointer.save(self.step)

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[irepa] {msg}", file=sys.stderr, flush=True)


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        teardown()
