"""One assembly of a training run: `build_run(cfg, ...) -> Run`.

The trainer, the export of sharded checkpoints (`offline_parts`), perf/bench_step.py,
perf/bench_repae.py and perf/roofline all build their run here, so what they measure and
predict is what trains. In this order (the seeds and the order of random draws are part of
a run's definition: a rerun gives the same initial weights):

  recipe -> seed -> diffusion model -> data (the loader; or the `data` a caller gives: the
  benchmarks' random tensors) -> seed + 1 -> alignment head -> trained tree (AlignedDiffusion)
  -> activation checkpointing -> micro-batch plan -> EMA, compile, FSDP2 / DDP (irepa.train.
  parallelize), AdamW -> the recipe's further parts (seed + 2 inside) -> loss scaler -> the
  step (irepa.train.step.TrainStep, or the recipe's `make_step`) -> decoder.

Options for tools that build a run unlike the trainer's: `data` (batches they make
themselves), `compile_scope="model"` (one graph for the whole tree, perf/bench_step.py's
reference-style baseline), `autocast` and `fused_optimizer` (perf/roofline traces a CUDA
step on fake CPU tensors), `instrument` (called with the trained tree before the plan: the
roofline tags its ops).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Callable

import torch

from irepa import recipes
from irepa.config import Config
from irepa.errors import InputError
from irepa.recipes import Recipe
from irepa.train import memory, parallelize
from irepa.train.build import (AlignedDiffusion, DataBundle, adamw, base_lr, build_data, build_head, scan_full,
                               to_device)
from irepa.train.ema import make_ema
from irepa.train.flops import train_flops_per_image
from irepa.train.loss_scale import LossScaler
from irepa.train.step import Part, TrainStep

Autocast = Callable[[torch.dtype], AbstractContextManager]


@dataclass
class Run:
    """Everything a training run is made of; the trainer runs its loop over `step_fn`."""

    cfg: Config
    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    data: DataBundle
    parts: dict[str, Part]
    """trained parts by name: "model" (the diffusion model and its projectors) and the recipe's further ones"""
    default_step: TrainStep
    """the step's pieces (generator, learning rate, gradient norms of the last step)"""
    step_fn: Callable[[dict, int], dict[str, torch.Tensor]]
    """step_fn(batch, index) -> scalars on the device: the default step, or the recipe's (make_step)"""
    scaler: LossScaler
    amp_dtype: torch.dtype | None
    parallel: str
    """none | ddp | fsdp"""
    micro_batch: int
    memory_plan: memory.MemoryPlan | None
    warmup_steps: int
    flops_per_image: float
    """useful training FLOPs per image (model + projector, forward + backward): the MFU numerator"""
    decode: Callable[[torch.Tensor], torch.Tensor] | None
    """model outputs -> images in [0, 1] (None: no decoder on this machine)"""

    @property
    def model(self) -> Part:
        return self.parts["model"]


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """train.precision -> the autocast dtype (auto: bf16 on CUDA, fp32 elsewhere; fp32: None)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def build_run(cfg: Config, *, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"),
              data: DataBundle | None = None, log: Callable[[str], None] | None = None,
              compile_scope: str = "blocks", autocast: Autocast | None = None, fused_optimizer: bool | None = None,
              instrument: Callable[[AlignedDiffusion, DataBundle], None] | None = None) -> Run:
    """The run of `cfg` on this rank (see the module docstring). data: batches the caller makes itself
    (a DataBundle without a loader: its encoder widths and online encoders); None builds the loader.
    log: progress lines (rank 0 prints them)."""
    log = log or (lambda msg: None)
    on_cuda = device.type == "cuda"
    amp = amp_dtype(cfg.train.precision, device)
    recipe = recipes.for_config(cfg)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and in every rerun
    model = recipe.build_model(on_cuda if cfg.model.fused_kernels is None else cfg.model.fused_kernels)
    if data is None:
        data = build_data(cfg, recipe, model, rank, world, device)
        if cfg.data.verify == "full":
            scan_full(data, rank == 0, log)
    torch.manual_seed(cfg.train.seed + 1)
    fused_loss = on_cuda if cfg.align.fused_loss is None else cfg.align.fused_loss
    head = build_head(cfg, model.dim, data.encoder_dims, fused_loss)
    net = to_device(AlignedDiffusion(model, head, recipe), device)
    flops = train_flops_per_image(model, head)  # of the plain tree, before any wrapping
    if instrument is not None:
        instrument(net, data)
    parallel = parallelize.resolve_mode(cfg.train.parallel, world)
    if cfg.train.activation_checkpointing:  # before the memory plan, which then sees its savings
        parallelize.apply_activation_checkpointing(net.model)
    micro, plan = plan_micro_batch(cfg, net, recipe, data, amp, world, parallel, device, autocast)
    if plan is not None:
        log(f"memory plan: {plan.describe()}")
    parts = {"model": model_part(cfg, net, data, amp, parallel, device, compile_scope, fused_optimizer),
             **extra_parts(cfg, recipe, device, parallel, fused_optimizer)}
    o = cfg.optim
    # epochs -> steps with this run's dataset and global batch (loader batches are per rank); a run
    # given its batches has no epochs to count
    counted = o.warmup_epochs > 0 and data.loader is not None
    warmup = round(o.warmup_epochs * data.loader.batches_per_epoch) if counted else o.warmup_steps
    scaler = LossScaler(amp == torch.float16)  # fp16 only; a no-op otherwise
    default = TrainStep(recipe, parts, features=data.features, micro_batch=micro, amp_dtype=amp, scaler=scaler,
                        align_weight=cfg.align.weight, warmup_steps=warmup, seed=cfg.train.seed, rank=rank,
                        device=device, autocast=autocast)
    step_fn = recipe.make_step(default)
    decode = recipe.decoder(data.manifest, device, parts={name: p.module for name, p in parts.items()})
    return Run(cfg, recipe, rank, world, device, data, parts, default, step_fn, scaler, amp, parallel, micro, plan,
               warmup, flops, decode)


def plan_micro_batch(cfg: Config, net: AlignedDiffusion, recipe: Recipe, data: DataBundle, amp: torch.dtype | None,
                     world: int, parallel: str, device: torch.device,
                     autocast: Autocast | None = None) -> tuple[int, memory.MemoryPlan | None]:
    """train.micro_batch_size, or (0) the largest divisor of the per-rank batch that fits (irepa.train.memory)."""
    t = cfg.train
    local = t.batch_size // world
    if t.micro_batch_size:
        if local % t.micro_batch_size:
            raise InputError(f"train.micro_batch_size={t.micro_batch_size} must divide the per-rank batch "
                             f"{local} (batch_size {t.batch_size} over {world} ranks)")
        return t.micro_batch_size, None
    budget = None if t.memory_budget_gib is None else int(t.memory_budget_gib * 2**30)
    if budget is None and device.type != "cuda":
        return local, None  # no device limit to plan against
    dims = data.encoder_dims if net.head is not None else []
    static = memory.static_bytes(net, len(t.ema_decays), world, parallel == "fsdp", device)
    plan = memory.plan_train_step(net, recipe, dims, amp, local, static, device, budget, autocast=autocast)
    return plan.micro_batch, plan


def model_part(cfg: Config, net: AlignedDiffusion, data: DataBundle, amp: torch.dtype | None, parallel: str,
               device: torch.device, compile_scope: str = "blocks", fused_optimizer: bool | None = None) -> Part:
    """The diffusion model's part: EMA, then compile and FSDP2 / DDP (irepa.train.parallelize), then AdamW."""
    t = cfg.train
    # plain EMA copies are taken before wrapping; FSDP's shard-local EMA after sharding
    ema = make_ema(net.model, t.ema_decays, sharded=False) if parallel != "fsdp" else None
    if t.compile and data.online_encoders and compile_scope == "blocks":
        parallelize.compile_encoders(data.online_encoders)
    train_module = parallelize.parallelize(net, parallel, device, compile=t.compile, compile_mode=t.compile_mode,
                                           param_dtype=amp, compile_scope=compile_scope)
    if ema is None:
        ema = make_ema(net.model, t.ema_decays, sharded=True)
    params = [p for p in net.parameters() if p.requires_grad]
    lr = base_lr(cfg)
    return Part(net, train_module, adamw(cfg, params, lr, device, fused_optimizer), params, lr, ema, net.model,
                cfg.optim.grad_clip, parallel)


def extra_parts(cfg: Config, recipe: Recipe, device: torch.device, parallel: str,
                fused_optimizer: bool | None = None) -> dict[str, Part]:
    """The recipe's further trained parts (Recipe.extra_parts), each with optimizer and EMA;
    data-parallel ones are DDP-wrapped (their gradients are all-reduced)."""
    out = {}
    for name, spec in recipe.extra_parts(device).items():
        module = to_device(spec.module, device)
        ema = make_ema(module, list(spec.ema_decays), sharded=False) if spec.ema_decays else None
        train_module = module
        if parallel in ("ddp", "fsdp"):
            train_module = parallelize.apply_ddp(module, device)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = (spec.optimizer(params) if spec.optimizer is not None else
               adamw(cfg, params, base_lr(cfg), device, fused_optimizer))
        out[name] = Part(module, train_module, opt, params, opt.param_groups[0]["lr"], ema, None, spec.grad_clip,
                         "ddp" if train_module is not module else "none")
    return out


def offline_parts(cfg: Config, encoder_dims: list[int]) -> dict[str, Part]:
    """Every trained part of a run as plain modules on the CPU (one process, no data, eager reference
    ops): for export and inspection."""
    offline = replace(cfg, model=replace(cfg.model, fused_kernels=False), align=replace(cfg.align, fused_loss=False),
                      train=replace(cfg.train, parallel="none", compile=False, micro_batch_size=0,
                                    memory_budget_gib=None))
    return build_run(offline, data=DataBundle(loader=None, encoder_dims=list(encoder_dims), manifest={})).parts
