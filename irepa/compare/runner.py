"""Run a comparison: every (recipe, seed) trained in segments and evaluated at each eval step.

Layout of the comparison folder: irepa.compare.layout. Resume: an evaluation whose file
exists is never redone; a run continues from its newest checkpoint (the trainer resumes
exactly), so an interrupted comparison continues where it stopped and gives the same
numbers. With torchrun, rank r takes runs r, r + W, ... (each a one-process training);
rank 0 prepares the data and the metric first, and writes the report once every run is
evaluated.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import backend
from .evaluate import Evaluator, build_evaluator
from .layout import SETUP, SPEC, eval_path, noise_path, run_name, write_atomic
from .report import write_report
from .spec import CompareSpec, Recipe


def _write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _wait_for(pred, what: str, log, poll: float = 2.0) -> None:
    t0 = last = time.monotonic()
    while not pred():
        if time.monotonic() - last > 60:
            log(f"[compare] still waiting for {what} ({time.monotonic() - t0:.0f} s)")
            last = time.monotonic()
        time.sleep(poll)


def check_spec(out: Path, spec: CompareSpec, rank: int, log) -> None:
    """Write OUT/spec.json (rank 0), or refuse a spec that differs from the one the folder holds
    once it holds evaluations or trained runs (before that, the new spec replaces the old)."""
    path = out / SPEC
    if rank != 0:
        _wait_for(lambda: path.is_file() and CompareSpec.load(path).to_dict() == spec.to_dict(), path, log)
        return
    started = any((out / "evals").rglob("step-*.json")) or any((out / "runs").glob("*/checkpoints"))
    if path.is_file() and started:
        old = CompareSpec.load(path)
        diff = spec.incompatible_with(old)
        if diff:
            raise ValueError(f"{path}: this comparison folder was started with other settings ({', '.join(diff)}); "
                             f"use another --out, or the same settings (recipes and seeds may be added)")
        if old.to_dict() != spec.to_dict():
            _write_json(path, spec.to_dict())
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, spec.to_dict())


class Comparison:
    def __init__(self, spec: CompareSpec, out: str | Path, cache_dir: str | Path | None = None, device="auto",
                 rank: int = 0, world_size: int = 1, inception_weights: str | Path | None = None, log=print):
        self.spec, self.out = spec, Path(out)
        self.cache_dir = Path(cache_dir) if cache_dir else self.out / "datasets"
        self.rank, self.world = rank, world_size
        if device == "auto":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.inception_weights = inception_weights
        self.log = log
        self.evaluator: Evaluator | None = None
        self.data: dict[str, backend.Data] = {}

    # -- configs and data -------------------------------------------------------------------
    def config(self, recipe: Recipe, seed: int, steps: int):
        return backend.run_config(recipe.preset, {**self.spec.common, **recipe.overrides}, seed=seed, steps=steps,
                                  out_dir=self.out / "runs", run_name=run_name(recipe, seed),
                                  cache_dir=self.cache_dir,
                                  sampler=self.spec.sampler(recipe))

    def _data(self) -> dict[str, backend.Data]:
        """Each recipe's prepared data (prepared here if needed); refuses recipes that do not share data."""
        out, first = {}, None
        for r in self.spec.recipes:
            cfg = self.config(r, self.spec.seeds[0], self.spec.steps)
            d = backend.prepare_data(cfg, "cpu")
            m = d.manifest
            lat = m.get("latent") or {}  # None for pixel data
            key = (m["kind"], m["num_samples"], m["resolution"], (m.get("source") or {}).get("listing_sha256"),
                   json.dumps(lat.get("channel_mean")), json.dumps(lat.get("channel_std")),
                   backend.latent_shape(cfg), cfg.model.num_classes)
            if first is None:
                first = (r.name, key)
            elif key != first[1]:
                raise ValueError(f"recipes {first[0]!r} and {r.name!r} do not train on the same data ({d.root}: "
                                 f"{key} vs {first[1]}); a comparison needs one data set and model input shape")
            out[r.name] = d
        return out

    def setup(self) -> Evaluator:
        """Prepare data and metric (rank 0 first; the other ranks then load what it cached)."""
        marker = self.out / SETUP
        if self.rank != 0:  # rank 0 rewrites the marker for this spec once it has prepared everything
            _wait_for(lambda: marker.is_file() and json.loads(marker.read_text()).get("spec") == self.spec.to_dict(),
                      marker, self.log)
        data = self._data()
        images, labels = data[self.spec.recipes[0].name].real()
        self.evaluator = build_evaluator(images, labels, self.spec.metric, self.spec.classifier,
                                         self.cache_dir / "classifiers", self.inception_weights, self.device,
                                         log=self.log)
        self.data = data
        if self.rank == 0:
            ev = self.evaluator
            _write_json(marker, {"spec": self.spec.to_dict(), "metric": ev.metric, "description": ev.describe(),
                                 "classifier": ev.classifier.report, "classifier_key": ev.classifier.key,
                                 "floor": ev.floor(self.spec.num_samples), "floor_num_samples": self.spec.num_samples,
                                 "samplers": {r.name: self.sampler(r) for r in self.spec.recipes},
                                 "device": str(self.device), "torch_threads": torch.get_num_threads(),
                                 "world_size": self.world})
        self.log(f"[compare] {self.evaluator.describe()}")
        return self.evaluator

    # -- evaluation -------------------------------------------------------------------------
    def eval_batch(self, num_classes: int, shape: tuple[int, ...], eval_seed: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed evaluation noise and class-balanced labels (the same for every run and step)."""
        g = torch.Generator().manual_seed(self.spec.eval_seed if eval_seed is None else eval_seed)
        n = self.spec.num_samples
        labels = torch.arange(n) % num_classes
        return torch.randn((n, *shape), generator=g), labels

    def sampler(self, recipe: Recipe) -> list:
        """[method, steps]: how `recipe`'s EMA models are sampled for evaluation (the spec's choice,
        else its preset's own, e.g. MeanFlow's 1-step euler)."""
        train = self.config(recipe, self.spec.seeds[0], self.spec.steps).train
        return [train.sample_method, int(train.sample_steps)]

    def evaluate_checkpoint(self, ckpt: Path, recipe: Recipe, eval_seed: int | None = None) -> dict:
        model, cfg = backend.load_ema(ckpt, self.device)
        noise, labels = self.eval_batch(cfg.model.num_classes, backend.latent_shape(cfg), eval_seed)
        method, steps = self.sampler(recipe)
        images = backend.sample_images(model, cfg, ckpt, self.data[recipe.name], noise, labels, method, steps,
                                       device=self.device)
        return self.evaluator(images, labels, quantize=backend.sample_quantize(cfg))

    def run_one(self, recipe: Recipe, seed: int) -> None:
        name = run_name(recipe, seed)
        for step in self.spec.eval_steps:
            path = eval_path(self.out, recipe, seed, step)
            if path.is_file():
                continue
            cfg = self.config(recipe, seed, step)
            folder = backend.run_dir(cfg)
            ckpt = backend.checkpoint_at(folder, step)
            t0, c0 = time.perf_counter(), time.process_time()
            start = backend.latest_step(folder)
            if ckpt is None:
                if start > step:
                    raise RuntimeError(f"{folder}: trained to step {start} but the checkpoint of step {step} is gone; "
                                       f"delete the run folder to retrain it")
                self.log(f"[compare] {name}: training steps {start} -> {step}")
                ckpt = backend.train_to(cfg)
            t1, c1 = time.perf_counter(), time.process_time()
            res = self.evaluate_checkpoint(ckpt, recipe)
            t2, c2 = time.perf_counter(), time.process_time()
            res.update(recipe=recipe.name, seed=seed, step=step, trained_from=start,
                       train_seconds=t1 - t0, train_cpu_seconds=c1 - c0, eval_seconds=t2 - t1,
                       eval_cpu_seconds=c2 - c1, torch_threads=torch.get_num_threads(), rank=self.rank)
            _write_json(path, res)
            self.log(f"[compare] {name} step {step}: {res['metric']} {res['value']:.3f}, "
                     f"class acc {100 * res['class_acc']:.1f}% (train {t1 - t0:.0f} s, eval {t2 - t1:.0f} s)")

    def noise_seeds(self, extra: int) -> list[int]:
        return [self.spec.eval_seed + j for j in range(1, extra + 1)]

    def run_noise(self, recipe: Recipe, seed: int, extra: int) -> None:
        """Score the run's last checkpoint again with `extra` other evaluation noise batches."""
        step = self.spec.steps
        for e in self.noise_seeds(extra):
            path = noise_path(self.out, recipe, seed, step, e)
            if path.is_file():
                continue
            ckpt = backend.checkpoint_at(self.out / "runs" / run_name(recipe, seed), step)
            if ckpt is None:
                raise RuntimeError(f"{self.out / 'runs' / run_name(recipe, seed)}: no checkpoint of step {step}")
            res = self.evaluate_checkpoint(ckpt, recipe, e)
            _write_json(path, {**res, "recipe": recipe.name, "seed": seed, "step": step, "eval_seed": e})
            self.log(f"[compare] {run_name(recipe, seed)} step {step}, eval seed {e}: {res['metric']} "
                     f"{res['value']:.3f}, class acc {100 * res['class_acc']:.1f}%")

    def missing(self, eval_noise: int = 0) -> list[Path]:
        out = [eval_path(self.out, r, s, st) for r, s in self.spec.runs() for st in self.spec.eval_steps]
        out += [noise_path(self.out, r, s, self.spec.steps, e) for r, s in self.spec.runs()
                for e in self.noise_seeds(eval_noise)]
        return [p for p in out if not p.is_file()]

    def run(self, eval_noise: int = 0, while_waiting=None) -> Path | None:
        """This rank's runs (and, with eval_noise = K, K more scores of each run's last checkpoint);
        rank 0 then calls `while_waiting()` (other work of a caller: irepa.study measures its
        targets there), waits for the others and writes the report (-> summary.md)."""
        for recipe in self.spec.recipes:  # a bad preset or override fails here, before anything is written
            self.config(recipe, self.spec.seeds[0], self.spec.steps)
        check_spec(self.out, self.spec, self.rank, self.log)
        self.setup()
        mine = [rs for i, rs in enumerate(self.spec.runs()) if i % self.world == self.rank]
        for recipe, seed in mine:
            self.run_one(recipe, seed)
        for recipe, seed in mine if eval_noise else []:
            self.run_noise(recipe, seed, eval_noise)
        if self.rank != 0:
            return None
        if while_waiting is not None:
            while_waiting()
        _wait_for(lambda: not self.missing(eval_noise), "the other ranks' evaluations", self.log, poll=5.0)
        return write_report(self.out, self.spec)
