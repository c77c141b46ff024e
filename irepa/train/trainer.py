"""The training loop: one step function, exact resume, atomic checkpoints, logging.

Randomness of a step (noise, t, label dropout, posterior draw) comes from a generator
seeded by (seed, rank, step), so a resumed run repeats an uninterrupted one exactly.
The hot loop does not synchronize with the device except on log and checkpoint steps.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from irepa.config import Config
from irepa.sampling import sample
from irepa.train import checkpoint as ckpt_io
from irepa.train import parallelize, sharded_checkpoint
from irepa.train.build import DiffusionWithAlignment, build_data, build_head, build_model
from irepa.train.ema import EMA
from irepa.train.flops import peak_tflops, train_flops_per_image
from irepa.train.loss_scale import LossScaler
from irepa.train.objective import build_objective


class AlignedDiffusion(DiffusionWithAlignment):
    """Forward = both losses, so DDP / FSDP / compile wrap one module."""

    def __init__(self, model, head, objective):
        super().__init__(model, head)
        self.objective = objective

    def forward(self, x, y, feats, generator, drop_mask, draws=None):
        """draws = objective.draw(x, generator) made beforehand (micro-batches of one batch), else drawn here."""
        if draws is None:
            draws = self.objective.draw(x, generator)
        denoise, hidden = self.objective.loss(self.model, x, y, draws, drop_mask)
        if self.head is None:
            return denoise, denoise.new_zeros(())
        return denoise, self.head(hidden, feats)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.local_rank, self.world = _dist_info()
        self.device = self._pick_device(cfg.train.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        self.run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or cfg.preset or "run")
        self.amp_dtype = self._amp_dtype()
        on_cuda = self.device.type == "cuda"
        fused_adaln = on_cuda if cfg.model.fused_kernels is None else cfg.model.fused_kernels
        fused_loss = on_cuda if cfg.align.fused_loss is None else cfg.align.fused_loss

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and in every rerun
        model = build_model(cfg, fused_adaln)
        self.data = build_data(cfg, model, self.rank, self.world, self.device)
        torch.manual_seed(cfg.train.seed + 1)
        head = build_head(cfg, model.dim, self.data.encoder_dims, fused_loss)
        objective = build_objective(cfg.train.objective, cfg.train.time_sampling)
        self.net = AlignedDiffusion(model, head, objective).to(self.device)
        self.flops_per_image = train_flops_per_image(model, head)
        self.parallel = parallelize.resolve_mode(cfg.train.parallel, self.world)
        if cfg.train.activation_checkpointing:  # before the memory plan, which then sees its savings
            parallelize.apply_activation_checkpointing(self.net.model)
        self.micro_batch = self._plan_micro_batch(model)
        # plain EMA copies are taken before wrapping; FSDP's shard-local EMA after sharding
        self.ema = EMA(self.net.model, cfg.train.ema_decays) if self.parallel != "fsdp" else None
        self.train_module = self._wrap(self.net)
        if self.ema is None:
            self.ema = parallelize.make_ema(self.net.model, cfg.train.ema_decays, self.parallel)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        lr = cfg.optim.lr * (cfg.train.batch_size / 256 if cfg.optim.scale_lr_with_batch else 1.0)
        self.base_lr = lr
        o = cfg.optim
        # epochs -> steps with this run's dataset and global batch (loader batches are per rank)
        self.warmup_steps = (round(o.warmup_epochs * self.data.loader.batches_per_epoch) if o.warmup_epochs > 0
                             else o.warmup_steps)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                           weight_decay=cfg.optim.weight_decay, fused=on_cuda or None)
        self.scaler = LossScaler(self.amp_dtype == torch.float16)  # fp16 only; a no-op otherwise
        self.step = 0
        self._stop_signal: int | None = None
        # test hook: IREPA_SIGNAL_AT="STEP:SIGNUM" sends SIGNUM to this process after STEP
        hook = os.environ.get("IREPA_SIGNAL_AT")
        self._signal_at = tuple(int(v) for v in hook.split(":")) if hook else None
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._prepare_run_dir()
        self._fid_ref = None
        if cfg.train.fid_every and self.is_main:  # fail before step 0 on a missing reference or weights
            if self.data.decode is None:
                raise ValueError("train.fid_every needs a decoder for samples (the dataset's VAE folder)")
            from irepa.metrics.fid import reference_stats
            self._fid_ref = reference_stats(cfg.train.fid_ref, weights=cfg.train.fid_weights, device=self.device)
        self._maybe_resume()

    # -- setup ---------------------------------------------------------------------------
    def _pick_device(self, name: str) -> torch.device:
        if name == "auto":
            name = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(name)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    def _amp_dtype(self):
        p = self.cfg.train.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]

    def _wrap(self, net):
        """Activation checkpointing -> compile per block -> FSDP2 / DDP (irepa.train.parallelize)."""
        t = self.cfg.train
        if t.compile and self.data.online_encoders:
            parallelize.compile_encoders(self.data.online_encoders)
        return parallelize.parallelize(net, self.parallel, self.device, compile=t.compile, compile_mode=t.compile_mode,
                                       param_dtype=self.amp_dtype)  # checkpointing was applied in __init__

    def _plan_micro_batch(self, model) -> int:
        """train.micro_batch_size, or (0) the largest divisor of the per-rank batch that fits (irepa.train.memory)."""
        t = self.cfg.train
        local = t.batch_size // self.world
        if t.micro_batch_size:
            if local % t.micro_batch_size:
                raise ValueError(f"train.micro_batch_size={t.micro_batch_size} must divide the per-rank batch "
                                 f"{local} (batch_size {t.batch_size} over {self.world} ranks)")
            return t.micro_batch_size
        budget = None if t.memory_budget_gib is None else int(t.memory_budget_gib * 2**30)
        if budget is None and self.device.type != "cuda":
            return local  # no device limit to plan against
        from irepa.train import memory
        C, S = model.in_channels, model.input_size
        tokens = model.grid ** 2
        dims = self.data.encoder_dims if self.net.head is not None else []
        dev = self.device

        def make_inputs(n):
            return (torch.randn(n, C, S, S, device=dev), torch.zeros(n, dtype=torch.long, device=dev),
                    [torch.randn(n, tokens, d, device=dev, dtype=torch.bfloat16) for d in dims],
                    torch.zeros(n, dtype=torch.bool, device=dev))

        def forward(x, y, feats, drop):
            amp = torch.autocast(dev.type, self.amp_dtype) if self.amp_dtype else nullcontext()
            with amp:
                self.net(x, y, feats, None, drop)

        static = memory.static_bytes(self.net, len(t.ema_decays), self.world, self.parallel == "fsdp", dev)
        plan = memory.plan_micro_batch(forward, make_inputs, local, static, dev, budget)
        self._log(f"memory plan: {plan.describe()}")
        return plan.micro_batch

    def _prepare_run_dir(self) -> None:
        cfg_path = self.run_dir / "config.json"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg_path.is_file() and self.cfg.train.resume:
                old = json.loads(cfg_path.read_text())
                new = self.cfg.to_dict()
                diff = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s in ("model", "align", "data")
                        for k, v in new[s].items() if old.get(s, {}).get(k) != v]
                if diff:
                    raise ValueError(f"{cfg_path}: this run folder was made with a different model/align/data "
                                     f"config ({'; '.join(diff)}); use another train.run_name or train.resume=False")
            tmp = cfg_path.with_suffix(".json.tmp")
            tmp.write_text(self.cfg.to_json())
            os.replace(tmp, cfg_path)
        self._barrier()

    def _maybe_resume(self) -> None:
        latest = ckpt_io.latest_checkpoint(self.run_dir) if self.cfg.train.resume else None
        if latest is None:
            return
        if sharded_checkpoint.is_sharded(latest):  # any world size, FSDP or plain
            tr, rng = sharded_checkpoint.load_sharded(latest, self.net, self.optimizer, self.ema)
            state = {"rng": rng}
        else:
            state = ckpt_io.load_checkpoint(latest)
            if self.parallel == "fsdp":
                sharded_checkpoint.load_full_into_sharded(state, self.net, self.optimizer, self.ema, self.params)
            else:
                self.net.load_state_dict(state["model"])
                self.ema.load_state_dicts(state["ema"])
                self.optimizer.load_state_dict(state["optimizer"])
            tr = state["trainer"]
        self.step = int(tr["step"])
        self.scaler.load_state_dict(tr.get("loss_scale"))
        data = tr["data"]
        if "epoch" not in data:  # one position per rank; a new world size continues from rank 0's (same epoch, batch)
            data = data.get(str(self.rank), data["0"])
        self.data.loader.load_state_dict(data)
        torch.set_rng_state(state["rng"]["cpu"])
        self._log(f"resumed from {latest} at step {self.step}")

    def _barrier(self):
        if self.world > 1:
            dist.barrier()

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[irepa] {msg}", file=sys.stderr, flush=True)

    # -- the step ------------------------------------------------------------------------
    def _generator(self, step: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.cfg.train.seed * 1_000_003 + self.rank) * 1_000_033 + step)
        return g

    def _lr(self, step: int) -> float:
        w = self.warmup_steps
        return self.base_lr * min(1.0, (step + 1) / w) if w > 0 else self.base_lr

    def train_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        gen = self._generator(step)
        x = batch["x"]
        if "x_std" in batch:
            x = x + batch["x_std"] * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        # online encoders run per micro-batch on batch["images"] (the loader then stores no features)
        feats = None if self.data.online_encoders else batch.get("feats")
        p = self.cfg.model.class_dropout_prob
        drop = torch.rand(x.shape[0], generator=gen, device=x.device) < p if p > 0 else None
        # every random draw is made for the whole batch, so the micro-batch size changes no result
        draws = self.net.objective.draw(x, gen)
        denoise, align = self._accumulate(x, batch["y"], feats, batch.get("images"), drop, draws)
        loss = denoise + self.cfg.align.weight * align
        ok = self.scaler.unscale_and_check(self.params)  # fp16: an overflow on any rank skips the step
        clip = self.cfg.optim.grad_clip
        grad_norm = parallelize.clip_grad_norm_(self.params, clip if clip else math.inf)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        if ok:
            self.optimizer.step()
        self.scaler.update(ok)
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.net.model)
        self._finite &= torch.isfinite(loss)
        return {"loss": loss.detach(), "denoise": denoise.detach(), "align": align.detach(), "grad_norm": grad_norm}

    def _grad_sync(self, enabled: bool):
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        if self.parallel == "ddp":
            return nullcontext() if enabled else self.train_module.no_sync()
        if self.parallel == "fsdp":
            self.net.set_requires_gradient_sync(enabled)
        return nullcontext()

    def _accumulate(self, x, y, feats, images, drop, draws):
        """Forward + backward over micro-batches; returns the batch-mean (denoise, align), detached.

        Each micro-batch's loss is weighted by its share of the batch, so the summed gradients
        are those of the batch mean."""
        B, m = x.shape[0], self.micro_batch
        amp = torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else nullcontext()
        weight = self.cfg.align.weight
        if feats is None and images is None:
            raise ValueError("the batch has neither stored features ('feats') nor 'images' for online encoders")
        totals = []
        for start in range(0, B, m):
            s = slice(start, min(start + m, B))
            f = self.data.online_features(images[s]) if feats is None else [t[s] for t in feats]
            with self._grad_sync(s.stop == B):
                with amp:
                    d, a = self.train_module(x[s], y[s], f, None, None if drop is None else drop[s],
                                             draws=(draws[0][s], draws[1][s]))
                share = (s.stop - s.start) / B
                self.scaler.scale_loss((d + weight * a) * share).backward()
            totals.append((d.detach() * share, a.detach() * share))
        return sum(t[0] for t in totals), sum(t[1] for t in totals)

    # -- loop ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def train(self) -> dict:
        cfg = self.cfg.train
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
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
            if self._signal_at and self.step == self._signal_at[0]:
                os.kill(os.getpid(), self._signal_at[1])
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
        if not bool(self._finite):
            raise FloatingPointError(
                f"non-finite loss before step {self.step} in {self.run_dir}; no checkpoint written for it. "
                f"Last good checkpoint: {ckpt_io.latest_checkpoint(self.run_dir)}")

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
                for k in ("loss", "denoise", "align"):
                    writer.add_scalar(f"loss/{k}", vals[k], self.step)
                writer.add_scalar("optim/grad_norm", vals["grad_norm"], self.step)
                writer.add_scalar("optim/lr", vals["lr"], self.step)
                for k in ("img_per_s", "tflops", "data_wait", "mfu"):
                    if k in vals:
                        writer.add_scalar(f"perf/{k}", vals[k], self.step)
        return vals

    def _writer(self):
        if not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.run_dir))

    # -- checkpoints and samples ---------------------------------------------------------
    def save(self) -> None:
        self._check_finite()
        data_state = self.data.loader.state_dict()
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, data_state)
            data_state = {str(r): s for r, s in enumerate(states)}
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        trainer_state = {"data": data_state, "ema_decays": self.cfg.train.ema_decays, "world_size": self.world,
                         "loss_scale": self.scaler.state_dict()}
        if self.parallel == "fsdp":  # every rank writes its shards (irepa.train.sharded_checkpoint)
            path = sharded_checkpoint.save_sharded(
                self.run_dir, self.step, net=self.net, optimizer=self.optimizer, ema=self.ema, rng_tensors=rng,
                keep=self.cfg.train.keep_checkpoints,
                trainer_state={**trainer_state, "encoder_dims": self.data.encoder_dims})
            self._log(f"checkpoint {path} (sharded; `python -m irepa.train.export {self.run_dir}` for one file)")
        elif self.is_main:
            path = ckpt_io.save_checkpoint(
                self.run_dir, self.step, model_sd=self.net.state_dict(), ema_sds=self.ema.state_dicts(),
                optimizer_sd=self.optimizer.state_dict(), rng_tensors=rng, keep=self.cfg.train.keep_checkpoints,
                trainer_state=trainer_state)
            self._log(f"checkpoint {path}")
        self._barrier()

    @torch.no_grad()
    def sample_grid(self, writer=None, per_class: int = 8, max_classes: int = 10) -> Path | None:
        if self.data.decode is None:
            self._log("no sample grid: the dataset's VAE folder is not on this machine")
            return None
        model = self._full_ema_model()  # collective under FSDP
        if not self.is_main:
            return None
        from irepa.train.grid import save_grid
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
        x = sample(self.velocity_fn(model), noise, labels, method=t.sample_method, steps=t.sample_steps,
                   generator=generator)
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
        fid = online_fid(sample_fn, self._fid_ref, n=t.fid_samples, weights=t.fid_weights, device=self.device)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "fid_online": fid, "fid_samples": t.fid_samples}) + "\n")
        if writer is not None:
            writer.add_scalar("eval/fid_online", fid, self.step)
        self._log(f"online FID ({t.fid_samples} samples) at step {self.step}: {fid:.2f}")
        return fid

    def _full_ema_model(self):
        if not isinstance(self.ema, parallelize.ShardedEMA):
            return self.ema.models[0]
        sd = self.ema.full_state_dict(0)
        if not self.is_main:
            return None
        model = build_model(self.cfg, fused=False).to(self.device).eval()
        model.load_state_dict(sd)
        return model

    def velocity_fn(self, model):
        if self.cfg.train.objective == "jit":  # x-prediction at JiT time 1 - t -> SiT-convention velocity
            from irepa.models.jit import jit_velocity_fn
            return jit_velocity_fn(model)
        return lambda x, t, y: model(x, t, y)[0]


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
