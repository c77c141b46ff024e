"""The training loop: recipe-agnostic. Logging, checkpoints, signals, EMA, resume, samples.

The run's recipe (irepa.recipes) builds the model, draws and scores each step, samples and
decodes; the step itself is irepa.train.step.TrainStep (or the recipe's replacement). Its
randomness comes from a generator seeded by (seed, rank, step), so a resumed run repeats an
uninterrupted one exactly. The hot loop does not synchronize with the device except on log
and checkpoint steps.

Run folder (irepa.train.run_folder): checked first and written only after every check and the
checkpoint's load, so a refused start leaves it as it was; a fresh start (train.resume false)
in a folder that holds another run moves that run aside into previous-<time>/; a resume from
step N drops metrics.jsonl rows of steps after N (they are logged again). Non-finite values: every step notes, on the device, whether
its loss and each part's gradient norm are finite; the log / checkpoint steps read that note,
and the first non-finite step is reported by number (with a check of that step's batch in the
dataset files); checkpoint.save refuses non-finite state.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from irepa import recipes
from irepa.config import Config
from irepa.dist import all_gather_object, barrier, setup, teardown
from irepa.errors import InputError
from irepa.train import checkpoint, memory, parallelize, run_folder
from irepa.train.build import AlignedDiffusion, adamw, base_lr, build_data, build_head, extra_parts
from irepa.train.ema import ShardedEMA, make_ema
from irepa.train.flops import peak_tflops, train_flops_per_image
from irepa.train.loss_scale import LossScaler
from irepa.train.step import Part, TrainStep


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        env = setup(cfg.train.device)
        self.rank, self.local_rank, self.world, self.device = env.rank, env.local_rank, env.world, env.device
        self.is_main = env.is_main
        self.run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or cfg.preset or "run")
        self.amp_dtype = self._amp_dtype()
        on_cuda = self.device.type == "cuda"
        fused_adaln = on_cuda if cfg.model.fused_kernels is None else cfg.model.fused_kernels
        fused_loss = on_cuda if cfg.align.fused_loss is None else cfg.align.fused_loss
        self.recipe = recipes.for_config(cfg)
        run_folder.check(cfg, self.run_dir, self.recipe)  # reads only: a refused start changes nothing
        if cfg.log.wandb and self.is_main:
            from irepa.train.run_log import import_wandb
            import_wandb()  # now, not when the loop opens the log after config.json is written

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and in every rerun
        model = self.recipe.build_model(fused_adaln)
        self.data = build_data(cfg, self.recipe, model, self.rank, self.world, self.device)
        torch.manual_seed(cfg.train.seed + 1)
        head = build_head(cfg, model.dim, self.data.encoder_dims, fused_loss)
        net = AlignedDiffusion(model, head, self.recipe).to(self.device)
        self.flops_per_image = train_flops_per_image(model, head)
        self.parallel = parallelize.resolve_mode(cfg.train.parallel, self.world)
        if cfg.train.activation_checkpointing:  # before the memory plan, which then sees its savings
            parallelize.apply_activation_checkpointing(net.model)
        self.micro_batch = self._plan_micro_batch(net)
        # plain EMA copies are taken before wrapping; FSDP's shard-local EMA after sharding
        ema = make_ema(net.model, cfg.train.ema_decays, sharded=False) if self.parallel != "fsdp" else None
        train_module = self._wrap(net)
        if ema is None:
            ema = make_ema(net.model, cfg.train.ema_decays, sharded=True)
        params = [p for p in net.parameters() if p.requires_grad]
        lr = base_lr(cfg)
        self.parts = {"model": Part(net, train_module, adamw(cfg, params, lr, self.device), params, lr, ema,
                                    net.model, cfg.optim.grad_clip, self.parallel)}
        self.parts.update(extra_parts(cfg, self.recipe, self.device, self.parallel))
        o = cfg.optim
        # epochs -> steps with this run's dataset and global batch (loader batches are per rank)
        self.warmup_steps = (round(o.warmup_epochs * self.data.loader.batches_per_epoch) if o.warmup_epochs > 0
                             else o.warmup_steps)
        self.scaler = LossScaler(self.amp_dtype == torch.float16)  # fp16 only; a no-op otherwise
        self.default_step = TrainStep(self.recipe, self.parts, features=self.data.features, micro_batch=self.micro_batch,
                                      amp_dtype=self.amp_dtype, scaler=self.scaler, align_weight=cfg.align.weight,
                                      warmup_steps=self.warmup_steps, seed=cfg.train.seed, rank=self.rank,
                                      device=self.device)
        self.step_fn = self.recipe.make_step(self.default_step)
        self.step = 0
        self._stop_signal: int | None = None
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        """first step (1-based, as metrics.jsonl counts) whose loss or a gradient norm was non-finite; -1: none"""
        self._bad_what: torch.Tensor | None = None
        self._bad_names: list[str] = []
        if cfg.data.verify == "full":
            self._verify_data_full()
        self._fid_ref = None
        if cfg.train.fid_every and self.is_main:  # fail before step 0 on a missing reference or weights
            if self.data.decode is None:
                raise InputError("train.fid_every needs a decoder for samples (the dataset's VAE folder)")
            from irepa.metrics.fid import reference_stats
            self._fid_ref = reference_stats(cfg.train.fid_ref, weights=cfg.train.fid_weights, device=self.device)
        self._maybe_resume()
        # the first write to the run folder, after every check and the checkpoint's load
        if self.is_main:
            run_folder.write_config(cfg, self.run_dir, self._log)
            run_folder.drop_logged_steps_after(self.run_dir, self.step, self._log)
        barrier()

    # the diffusion model's part, by the names tests and tools use
    net = property(lambda self: self.parts["model"].module)
    train_module = property(lambda self: self.parts["model"].train_module)
    optimizer = property(lambda self: self.parts["model"].optimizer)
    ema = property(lambda self: self.parts["model"].ema)
    params = property(lambda self: self.parts["model"].params)
    base_lr = property(lambda self: self.parts["model"].base_lr)

    # -- setup ---------------------------------------------------------------------------
    def _amp_dtype(self):
        p = self.cfg.train.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]

    def _wrap(self, net):
        """Compile per block -> FSDP2 / DDP (irepa.train.parallelize); checkpointing was applied in __init__."""
        t = self.cfg.train
        if t.compile and self.data.online_encoders:
            parallelize.compile_encoders(self.data.online_encoders)
        return parallelize.parallelize(net, self.parallel, self.device, compile=t.compile, compile_mode=t.compile_mode,
                                       param_dtype=self.amp_dtype)

    def _plan_micro_batch(self, net) -> int:
        """train.micro_batch_size, or (0) the largest divisor of the per-rank batch that fits (irepa.train.memory)."""
        t = self.cfg.train
        local = t.batch_size // self.world
        if t.micro_batch_size:
            if local % t.micro_batch_size:
                raise InputError(f"train.micro_batch_size={t.micro_batch_size} must divide the per-rank batch "
                                 f"{local} (batch_size {t.batch_size} over {self.world} ranks)")
            return t.micro_batch_size
        budget = None if t.memory_budget_gib is None else int(t.memory_budget_gib * 2**30)
        if budget is None and self.device.type != "cuda":
            return local  # no device limit to plan against
        dims = self.data.encoder_dims if net.head is not None else []
        static = memory.static_bytes(net, len(t.ema_decays), self.world, self.parallel == "fsdp", self.device)
        plan = memory.plan_train_step(net, self.recipe, dims, self.amp_dtype, local, static, self.device, budget)
        self._log(f"memory plan: {plan.describe()}")
        return plan.micro_batch

    def _maybe_resume(self) -> None:
        """Load the newest good checkpoint (train.resume); reads the run folder, except that a damaged
        newer checkpoint is renamed once an older one has loaded (irepa.train.checkpoint.load_newest)."""
        found = checkpoint.load_newest(self.run_dir, self.parts, log=self._log) if self.cfg.train.resume else None
        if found is None:
            return
        latest, tr, rng = found  # either layout, any world size
        self.step = int(tr["step"])
        self.scaler.load_state_dict(tr.get("loss_scale"))
        data = tr["data"]
        if "epoch" not in data:  # one position per rank; a new world size continues from rank 0's (same epoch, batch)
            data = data.get(str(self.rank), data["0"])
        self.data.loader.load_state_dict(data)
        torch.set_rng_state(rng["cpu"])
        self._log(f"resumed from {latest} at step {self.step}")

    def _verify_data_full(self) -> None:
        """data.verify full: every byte against a full digest where prepare recorded one (the loader
        did that), and every record of the dataset scanned for non-finite values and bad labels."""
        from irepa import data as data_pkg
        loader = self.data.loader
        done = data_pkg.scan_dataset(loader.root, loader.manifest, fields=loader.fields) if self.is_main else None
        self._log(f"data.verify full: {done}")

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[irepa] {msg}", file=sys.stderr, flush=True)

    # -- the step ------------------------------------------------------------------------
    def _generator(self, step: int) -> torch.Generator:
        return self.default_step.generator(step)

    def _lr(self, step: int) -> float:
        return self.default_step.lr(self.parts["model"], step)

    def train_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        out = self.step_fn(batch, step)
        self._note_finite(out["loss"], step + 1)
        return out

    def _note_finite(self, loss: torch.Tensor, step: int) -> None:
        """Device-side note of the first step whose loss or gradient norm (of every part: the fused
        norm over all its gradients) is non-finite; a handful of scalar ops, no host sync."""
        norms = self.default_step.grad_norms
        self._bad_names = ["loss", *(f"gradient of {n}" for n in norms)]
        vals = torch.stack([loss.detach().float().reshape(()), *(v.detach().float().reshape(()) for v in norms.values())])
        bad = ~torch.isfinite(vals)
        new = bad.any() & (self._first_bad < 0)
        self._first_bad = torch.where(new, step, self._first_bad)
        self._bad_what = bad if self._bad_what is None or self._bad_what.shape != bad.shape else \
            torch.where(new, bad, self._bad_what)

    # -- loop ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def train(self) -> dict:
        """Run to train.steps; SIGTERM / SIGINT end it after the current step with a checkpoint."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:  # the handlers point at this trainer only while it runs
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> dict:
        cfg = self.cfg.train
        writer = self._writer()
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True, file=sys.stderr)
        it = iter(self.data.loader)
        sums: dict[str, torch.Tensor] = {}
        n_acc, t_last, wait = 0, time.perf_counter(), 0.0
        last: dict = {}
        while self.step < cfg.steps and self._stop_signal is None:
            t0 = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t0
            out = self.train_step(batch, self.step)
            self.step += 1
            bar.update(1)
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.float()
            n_acc += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                last = self._log_metrics(writer, sums, n_acc, time.perf_counter() - t_last, wait)
                bar.set_postfix(loss=f"{last['loss']:.4f}", align=f"{last['align']:.4f}")
                sums, n_acc, t_last, wait = {}, 0, time.perf_counter(), 0.0
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step != cfg.steps:
                self.sample_grid(writer)
            if cfg.fid_every and self.step % cfg.fid_every == 0:
                self.online_fid(writer)
        bar.close()
        if self._stop_signal is not None:
            self._log(f"signal {self._stop_signal}: writing a checkpoint at step {self.step} and exiting")
            self.save()
        else:
            self.sample_grid(writer)
        if writer is not None:
            writer.close()
        self._log(f"done: step {self.step}, run folder {self.run_dir}" + (self._perf_summary(last) if last else ""))
        return last

    @staticmethod
    def _perf_summary(last: dict) -> str:
        out = (f", last loss {last['loss']:.4f}, {last['img_per_s']:.1f} img/s, {last['tflops']:.3g} TFLOP/s"
               f", data wait {100 * last['data_wait']:.1f}%")
        return out + (f", MFU {100 * last['mfu']:.1f}%" if "mfu" in last else ", MFU n/a (no peak for this device)")

    def _check_finite(self) -> None:
        """Raise NonFiniteError naming the first non-finite step (collective: every rank agrees)."""
        first = int(self._first_bad)
        what = [n for n, b in zip(self._bad_names, self._bad_what.tolist()) if b] if first > 0 else []
        if self.world > 1:  # the earliest step of any rank, and what any rank found non-finite at it
            seen = [(f, w) for f, w in all_gather_object((first, what)) if f > 0]
            first = min(f for f, _ in seen) if seen else -1
            found = {n for f, w in seen if f == first for n in w}
            what = [n for n in self._bad_names if n in found]
        if first <= 0:
            return
        data = self._check_batch(first)
        if self.world > 1:  # each rank read its own share of the batch
            found = all_gather_object(data)
            data = next((d for d in found if "data is bad" in d), found[0])
        raise checkpoint.NonFiniteError(
            f"non-finite {' and '.join(what) or 'value'} at step {first} in {self.run_dir} "
            f"(metrics.jsonl numbering){data}; no checkpoint was written after it. "
            f"Last good checkpoint: {checkpoint.latest_checkpoint(self.run_dir)}")

    def _check_batch(self, step: int) -> str:
        """The dataset records of step `step`'s batch (this rank's), checked for non-finite values
        in the files: '; the data is bad: FILE record R ...' or '; its batch's data is finite'."""
        loader = self.data.loader
        check = getattr(loader, "check_batch", None)
        if check is None:
            return ""
        pos = loader.state_dict()
        consumed = pos["epoch"] * loader.batches_per_epoch + pos["index"]
        number = consumed - 1 - (self.step - step)  # batches are consumed one per step
        if number < 0:
            return ""
        epoch, index = divmod(number, loader.batches_per_epoch)
        try:
            bad = check(epoch, index)
        except Exception as e:  # the check is a diagnosis; it must not hide the error it explains
            return f"; its batch could not be checked ({type(e).__name__}: {e})"
        if bad is None:
            return f"; its batch (epoch {epoch}, batch {index}) holds finite data"
        return f"; the data is bad: {bad}"

    def _log_metrics(self, writer, sums, n, dt, wait) -> dict:
        if self.world > 1:
            keys = sorted(sums)
            vec = torch.stack([sums[k] for k in keys])
            dist.all_reduce(vec)
            sums = {k: v / self.world for k, v in zip(keys, vec)}
        self._check_finite()
        vals = {k: float(v) / n for k, v in sums.items()}
        img_s = n * self.cfg.train.batch_size / max(dt, 1e-9)
        vals.update(step=self.step, lr=self._lr(self.step - 1), img_per_s=img_s,
                    tflops=img_s * self.flops_per_image / 1e12, data_wait=wait / max(dt, 1e-9))
        peak = peak_tflops(self.device)
        if peak:
            vals["mfu"] = vals["tflops"] / (peak * self.world)
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(vals) + "\n")
            if writer is not None:
                for k in ("loss", "denoise", "align", *self._recipe_logs(vals)):
                    writer.add_scalar(f"loss/{k}", vals[k], self.step)
                writer.add_scalar("optim/grad_norm", vals["grad_norm"], self.step)
                writer.add_scalar("optim/lr", vals["lr"], self.step)
                for k in ("img_per_s", "tflops", "data_wait", "mfu"):
                    if k in vals:
                        writer.add_scalar(f"perf/{k}", vals[k], self.step)
        return vals

    @staticmethod
    def _recipe_logs(vals: dict) -> list[str]:
        """The scalars a recipe's loss added (Loss.logs), logged beside the losses."""
        known = {"loss", "denoise", "align", "grad_norm", "step", "lr", "img_per_s", "tflops", "data_wait", "mfu"}
        return [k for k in vals if k not in known]

    def _writer(self):
        """TensorBoard, plus W&B when log.wandb is on (irepa.train.run_log): one object, rank 0 only."""
        if not self.is_main:
            return None
        from irepa.train.run_log import open_run_log
        return open_run_log(self.cfg, self.run_dir, self.step)

    # -- checkpoints and samples ---------------------------------------------------------
    def save(self) -> None:
        self._check_finite()
        data_state = self.data.loader.state_dict()
        if self.world > 1:
            data_state = {str(r): s for r, s in enumerate(all_gather_object(data_state))}
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        trainer_state = {"data": data_state, "ema_decays": self.cfg.train.ema_decays, "world_size": self.world,
                         "loss_scale": self.scaler.state_dict(), "encoder_dims": self.data.encoder_dims}
        path = checkpoint.save(self.run_dir, self.step, self.parts, trainer_state=trainer_state, rng=rng,
                               keep=self.cfg.train.keep_checkpoints)
        sharded = self.parallel == "fsdp"
        self._log(f"checkpoint {path}" + (f" (sharded; `python -m irepa.train.export {self.run_dir}` for one file)"
                                          if sharded else ""))

    @torch.no_grad()
    def sample_grid(self, writer=None, per_class: int = 8, max_classes: int = 10) -> Path | None:
        if self.data.decode is None:
            self._log("no sample grid: the dataset's VAE folder is not on this machine")
            return None
        model = self._full_ema_model()  # collective under FSDP
        if not self.is_main:
            return None
        from irepa.grid import save_grid
        classes = min(self.cfg.model.num_classes, max_classes)
        labels = torch.arange(classes, device=self.device).repeat_interleave(per_class)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        images = self._sample_images(model, labels, g)
        path = save_grid(images, self.run_dir / "samples" / f"step-{self.step:07d}.png", nrow=per_class)
        if writer is not None:
            import numpy as np
            from PIL import Image
            writer.add_image("samples", np.asarray(Image.open(path)), self.step, dataformats="HWC")
        self._log(f"samples {path}")
        return path

    def _sample_images(self, model, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """EMA samples for `labels`, decoded to images in [0, 1] (train.sample_method / sample_steps)."""
        m, t = self.cfg.model, self.cfg.train
        noise = torch.randn(labels.shape[0], m.in_channels, m.input_size, m.input_size, generator=generator,
                            device=self.device)
        x = self.recipe.sample(model, noise, labels, method=t.sample_method, steps=t.sample_steps, generator=generator)
        return self.data.decode(x.float())

    @torch.no_grad()
    def online_fid(self, writer=None) -> float | None:
        """FID of train.fid_samples EMA samples (random labels) against train.fid_ref: a
        small-N monitor, biased upward against a 50K evaluation; logged as eval/fid_online."""
        model = self._full_ema_model()  # collective under FSDP
        if not self.is_main:
            return None
        from irepa.metrics.fid import online_fid
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 17)
        n_cls = self.cfg.model.num_classes

        def sample_fn(b):
            return self._sample_images(model, torch.randint(n_cls, (b,), generator=g, device=self.device), g)

        t = self.cfg.train
        fid = online_fid(sample_fn, self._fid_ref, n=t.fid_samples, weights=t.fid_weights, device=self.device,
                         quantize=self.recipe.sample_quantize)  # as launch/sample.py writes the recipe's samples
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "fid_online": fid, "fid_samples": t.fid_samples}) + "\n")
        if writer is not None:
            writer.add_scalar("eval/fid_online", fid, self.step)
        self._log(f"online FID ({t.fid_samples} samples) at step {self.step}: {fid:.2f}")
        return fid

    def _full_ema_model(self):
        if not isinstance(self.ema, ShardedEMA):
            return self.ema.models[0]
        sd = self.ema.full_state_dict(0)
        if not self.is_main:
            return None
        model = self.recipe.build_model(fused=False).to(self.device).eval()
        model.load_state_dict(sd)
        return model


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        teardown()
