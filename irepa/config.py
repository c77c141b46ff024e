"""Typed configuration tree and CLI overrides.

A run is described by `Config` (model, align, data, optim, train, plus the run's recipe's own
option section under the recipe's name; the recipe sections are passed in as `sections`).
`build_config(tree, overrides)` applies overrides given as dotted keys ("train.batch_size")
or unique leaf names ("batch_size") to a preset tree; every section validates itself in
__post_init__ and the resolved tree is written to the run folder as config.json. Every override is converted to its field's declared type
(irepa.coerce: `--train.resume false` is False, `--train.steps 2.5` is refused) and every
error a config can cause is a `ConfigError`, a one-line UserError naming the key. The presets
themselves belong to the recipes (irepa.recipes.resolve(preset, overrides) looks them up):
this module imports nothing of irepa but the leaf modules irepa.errors and irepa.coerce.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from irepa.coerce import annotations_of, coerce, type_name
from irepa.errors import UserError


class ConfigError(UserError, ValueError):
    """A preset, key or value the config refuses; the message names it (printed as one line)."""


@dataclass
class ModelConfig:
    name: str = "SiT-XL/2"
    """registry name: SiT-S/2, SiT-B/2, SiT-L/2, SiT-XL/2, JiT-B/16, ... (irepa.models.names())"""
    input_size: int = 32
    """spatial side of the model input: latent side for SiT (256 px / 8), pixel side for JiT"""
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    """label dropout for classifier-free guidance; the null class is index num_classes"""
    align_depth: int | None = None
    """block (1-indexed) whose output is aligned; None = the size's published default"""
    attn_backend: Literal["auto", "sdpa", "flash", "xformers"] = "auto"
    """auto | sdpa | flash | xformers"""
    fused_kernels: bool | None = None
    """fused Triton adaLN in the blocks (SiT); None = on when training on CUDA"""

    def __post_init__(self):
        if self.input_size <= 0 or self.in_channels <= 0 or self.num_classes <= 0:
            raise ValueError(f"model: input_size, in_channels, num_classes must be positive ({self})")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"model.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")


@dataclass
class AlignConfig:
    encoders: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    """target encoders (irepa.encoders.names()); one projector each, losses averaged; [] = no alignment"""
    projector: Literal["conv", "mlp"] = "conv"
    """conv (iREPA: 3x3 conv on the token grid) or mlp (REPA)"""
    gamma: float | None = 0.6
    """spatial-norm mean scale (iREPA: 0.6 SiT, 0.8 JiT); None = no spatial norm (REPA)"""
    weight: float = 1.0
    """lambda: total = denoising + weight * alignment"""
    hidden_dim: int = 2048
    """MLP projector width"""
    proj_kernel_size: int = 3
    """conv projector kernel side (odd): 3 as the paper and the JiT release; the LDM release's
    --proj-kwargs-kernel-size defaults to 1 (its irepa.yaml keeps that), so 1 matches those runs"""
    fused_loss: bool | None = None
    """fused Triton alignment loss; None = on when training on CUDA"""

    def __post_init__(self):
        if self.projector not in ("conv", "mlp"):
            raise ValueError(f"align.projector must be 'conv' or 'mlp', got {self.projector!r}")
        if isinstance(self.encoders, str):
            self.encoders = [self.encoders]
        if self.weight < 0:
            raise ValueError(f"align.weight must be >= 0, got {self.weight}")
        k = self.proj_kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"align.proj_kernel_size must be a positive odd integer (1, 3, 5, ...), got {k!r}")


@dataclass
class DataConfig:
    source: str = "digits"
    """'digits' (built in, scikit-learn) or the path of a dataset made by launch/prepare.py"""
    resolution: int = 256
    """image side the encoders see (tokens = (resolution/16)^2)"""
    backend: Literal["auto", "ffcv", "memmap"] = "auto"
    """loader for prepared data: auto | ffcv | memmap"""
    online_encoders: bool = False
    """run the encoders in the train step on streamed images instead of stored features"""
    cache_dir: str | None = None
    """where the built-in dataset is prepared once; None = <train.out_dir>/datasets"""
    hflip: bool = True
    """train on each sample's mirrored view half the time (the prepared data stores both, ADM's augmentation);
    false: the unmirrored view only (the digits presets: a mirrored digit is not a digit of its class)"""
    verify: str = "sampled"
    """check of the prepared files at startup: sampled (sizes + sampled digests) | full (every byte against
    full digests where prepare recorded them, and every record scanned for non-finite values) | none"""

    def __post_init__(self):
        if self.resolution % 16:
            raise ValueError(f"data.resolution must be a multiple of 16 (encoder patch grid), got {self.resolution}")
        if self.verify not in ("sampled", "full", "none"):
            raise ValueError(f"data.verify must be sampled, full or none, got {self.verify!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    """max global grad norm; None = no clipping (JiT)"""
    warmup_steps: int = 0
    """linear warm-up from 0 to lr, then constant"""
    warmup_epochs: float = 0.0
    """warm-up length in passes over the dataset (> 0 replaces warmup_steps; the trainer counts the
    steps from the dataset size and the global batch). The JiT recipe: 5"""
    scale_lr_with_batch: bool = False
    """lr * batch / 256 (JiT)"""

    def __post_init__(self):
        if self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise ValueError(f"optim: warmup_steps and warmup_epochs must be >= 0, got {self.warmup_steps}, "
                             f"{self.warmup_epochs}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.lr <= 0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim: lr must be > 0 and betas two numbers in [0, 1), got lr={self.lr} betas={self.betas}")


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    recipe: str = "sit"
    """training recipe (irepa.recipes.names()): sit (flow matching, velocity, t=1 noise) | jit (x-prediction,
    t=1 data); it must accept model.name's family"""
    steps: int = 400_000
    batch_size: int = 256
    """global batch over all ranks"""
    seed: int = 0
    ema_decays: list[float] = field(default_factory=lambda: [0.9999])
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32"""
    compile: bool = False
    """torch.compile the model per block (fullgraph; the Triton kernels run inside the graphs)"""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode for the blocks: default | max-autotune-no-cudagraphs (autotunes GEMM
    templates and fuses epilogues into them: minutes of compilation, possibly faster steps)"""
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """data parallelism: auto (fsdp when several ranks, else none) | none | ddp | fsdp (FSDP2 fully_shard)"""
    activation_checkpointing: bool = False
    """recompute each block's activations in the backward (less memory, ~1/3 more compute)"""
    micro_batch_size: int = 0
    """per-rank samples per forward/backward; gradients accumulate over batch_size / world / micro_batch_size
    of them before each optimizer step. 0 = auto: the largest divisor of the per-rank batch whose
    activations fit the device (irepa.train.memory; the whole batch on CPU unless memory_budget_gib is set)"""
    memory_budget_gib: float | None = None
    """device memory the micro-batch planner may use; None = 90% of the GPU's memory"""
    out_dir: str = "runs"
    run_name: str | None = None
    """folder under out_dir; None = preset name"""
    resume: bool = True
    """continue from the newest complete checkpoint in the run folder"""
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_checkpoints: int = 2
    sample_every: int = 0
    """write a sample grid every N steps (0 = only at the end)"""
    sample_steps: int = 50
    sample_method: Literal["sde", "euler", "heun"] = "euler"
    device: str = "auto"
    fid_every: int = 0
    """online FID of the EMA model every N steps (0 = off); needs fid_ref"""
    fid_ref: str | None = None
    """reference batch .npz (ADM: images under arr_0, or mu/sigma statistics)"""
    fid_samples: int = 5000
    fid_weights: str | None = None
    """Inception weights file; None = $IREPA_INCEPTION_WEIGHTS or the local cache"""

    def __post_init__(self):
        if not isinstance(self.recipe, str) or not self.recipe:
            raise ValueError(f"train.recipe must be a recipe name (irepa.recipes.names()), got {self.recipe!r}")
        if self.steps <= 0 or self.batch_size <= 0 or self.log_every <= 0 or self.ckpt_every <= 0:
            raise ValueError("train: steps, batch_size, log_every and ckpt_every must be positive")
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"train.parallel must be auto|none|ddp|fsdp, got {self.parallel!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"train.precision must be auto|bf16|fp16|fp32, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.micro_batch_size < 0:
            raise ValueError(f"train.micro_batch_size must be >= 0 (0 = auto), got {self.micro_batch_size}")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ValueError(f"train.memory_budget_gib must be > 0, got {self.memory_budget_gib}")
        if self.fid_every and not self.fid_ref:
            raise ValueError("train.fid_every needs train.fid_ref (a reference .npz)")
        if self.fid_every < 0 or self.fid_samples < 2:
            raise ValueError(f"train.fid_every must be >= 0 and fid_samples >= 2, got {self.fid_every}, {self.fid_samples}")
        if isinstance(self.ema_decays, (int, float)):
            self.ema_decays = [float(self.ema_decays)]
        if not self.ema_decays or not all(0 < d < 1 for d in self.ema_decays):
            raise ValueError(f"train.ema_decays must be numbers in (0, 1), got {self.ema_decays}")


@dataclass
class LogConfig:
    """Where the trainer's scalars and sample grids go: TensorBoard always, Weights & Biases on request."""
    wandb: bool = False
    """also log to Weights & Biases (pip install wandb): the same scalars and sample grids as TensorBoard"""
    wandb_project: str = "irepa"
    wandb_entity: str | None = None
    """W&B team or user; None = the logged-in account's default"""
    wandb_name: str | None = None
    """W&B run name; None = the run folder's name"""
    wandb_mode: Literal["online", "offline"] = "online"
    """offline: write the W&B run under <run folder>/wandb, no network (`wandb sync` uploads it later)"""


_SECTION_TYPES = {"model": ModelConfig, "align": AlignConfig, "data": DataConfig, "optim": OptimConfig,
                  "train": TrainConfig, "log": LogConfig}
_RENAMED = {("train", "objective"): "recipe"}  # config.json of runs made before the key was renamed
Sections = Mapping[str, type]
"""recipe option sections by name (a recipe's `Options` under its name, irepa.recipes.sections()): every
function here that reads or builds a config takes them as an argument; this module keeps no registry"""


def _section_type(name: str, sections: Sections) -> type:
    if name in _SECTION_TYPES:
        return _SECTION_TYPES[name]
    if name in sections and name != "preset":
        return sections[name]
    raise ConfigError(f"config: unknown section {name!r} (sections: {list(_SECTION_TYPES)}"
                      f"{', recipe sections: ' + str(sorted(sections)) if sections else ''})")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """recipe option sections by name (`sections`); also reachable as cfg.<name>"""

    def __getattr__(self, name: str):
        extra = self.__dict__.get("extra") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(f"Config has no section or field {name!r}")

    @property
    def run_dir(self) -> Path:
        """The run folder: train.out_dir / (train.run_name, else the preset's name)."""
        return Path(self.train.out_dir) / (self.train.run_name or self.preset or "run")

    def to_dict(self) -> dict:
        out = {k: dataclasses.asdict(getattr(self, k)) for k in _SECTION_TYPES}
        out.update({k: dataclasses.asdict(v) for k, v in self.extra.items()})
        return {**out, "preset": self.preset}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, sections: Sections | None = None) -> "Config":
        """A config tree (config.json) -> Config; `sections`: the recipe sections it may hold."""
        sections = sections or {}
        kw: dict[str, Any] = {"extra": {}}
        for name, value in d.items():
            if name == "preset":
                kw[name] = value
                continue
            sec_cls = _section_type(name, sections)
            value = {_RENAMED.get((name, k), k): v for k, v in value.items()}
            known = {f.name for f in dataclasses.fields(sec_cls)}
            bad = set(value) - known
            if bad:
                raise ConfigError(f"config: unknown key(s) {sorted(bad)} in section {name!r}")
            try:
                section = sec_cls(**value)
            except ConfigError:
                raise
            except ValueError as e:  # a section's own check (__post_init__): the message names the key
                raise ConfigError(str(e)) from None
            if name in _SECTION_TYPES:
                kw[name] = section
            else:
                kw["extra"][name] = section
        return cls(**kw)


def merge_trees(base: dict, over: dict) -> dict:
    """A copy of the nested dict `base` with `over` written over it (dicts merged key by key)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        out[k] = merge_trees(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _sections_of(tree: dict, sections: Sections) -> dict[str, type]:
    """The core sections plus the recipe sections `tree` holds."""
    return {**_SECTION_TYPES, **{k: _section_type(k, sections) for k in tree if k not in _SECTION_TYPES
                                 and k != "preset"}}


def build_config(tree: dict, overrides: dict[str, Any] | None = None, preset: str = "",
                 sections: Sections | None = None) -> Config:
    """A preset tree + overrides -> validated Config. An unknown key is a ValueError naming it.

    A recipe section belongs to the recipe of its name (`sections`): the run's recipe
    (train.recipe, after the overrides) gets its section, an override of another recipe's
    section is refused (it would be stored and never read), and such a section carried by the
    preset (one whose recipe --train.recipe replaced) is dropped."""
    tree = merge_trees(tree, {})
    recipe_sections = sections or {}
    sections = _sections_of(tree, recipe_sections)
    leaves: dict[str, list[str]] = {}
    given: dict[str, str] = {}
    for sec, typ in sections.items():
        for f in dataclasses.fields(typ):
            leaves.setdefault(f.name, []).append(sec)
    for key, value in (overrides or {}).items():
        if "." in key:
            sec, name = key.split(".", 1)
        else:
            secs = leaves.get(key, [])
            if not secs:
                raise ConfigError(f"unknown config key {key!r}: no section has it{_did_you_mean(key, sections)} "
                                  f"(sections: {list(sections)}; --help lists every key)")
            if len(secs) > 1:
                raise ConfigError(f"override {key!r} is in sections {secs}; write it as section.{key}")
            sec, name = secs[0], key
        typ = sections.get(sec) or recipe_sections.get(sec)
        if typ is None or name not in {f.name for f in dataclasses.fields(typ)}:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, sections)} (--help lists every key)")
        tree.setdefault(sec, {})[name] = coerce(value, field_types(typ).get(name, Any), f"{sec}.{name}")
        if sec in recipe_sections:
            given.setdefault(sec, f"{sec}.{name}")
    return Config.from_dict({**_own_recipe_section(tree, given, recipe_sections), "preset": preset}, recipe_sections)


def _own_recipe_section(tree: dict, given: dict[str, str], sections: Sections) -> dict:
    """`tree` with the recipe sections of train.recipe only; `given`: recipe section -> a key the user set in it."""
    recipe = tree.get("train", {}).get("recipe", TrainConfig.recipe)
    for sec, key in given.items():
        if sec != recipe:
            raise ConfigError(f"--{key} is an option of the {sec!r} recipe, but this run's recipe is {recipe!r} "
                              f"(train.recipe), which never reads it; drop it, or pick a {sec} preset (--list_presets)")
    out = {k: v for k, v in tree.items() if k not in sections or k == recipe}
    if recipe in sections:
        out.setdefault(recipe, {})  # its options are written to config.json and listed by --help
    return out


def field_types(typ: type) -> dict[str, Any]:
    """A config dataclass's field annotations, resolved (what overrides are converted to)."""
    return annotations_of(typ)


def _did_you_mean(key: str, sections: dict[str, type]) -> str:
    import difflib
    keys = [f"{sec}.{f.name}" for sec, typ in sections.items() for f in dataclasses.fields(typ)]
    close = difflib.get_close_matches(key, keys + [k.split(".", 1)[1] for k in keys], n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _field_docs(typ) -> dict[str, str]:
    """The string literal under each field of a config dataclass (its documentation)."""
    import ast
    import inspect
    import textwrap
    body = ast.parse(textwrap.dedent(inspect.getsource(typ))).body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def describe(cfg: Config) -> str:
    """Every config key with its value in `cfg` and its documentation (launch/train.py --help)."""
    values = cfg.to_dict()
    lines = [f"config keys (values of preset {cfg.preset!r}; override with --section.key VALUE or --key VALUE):"]
    for sec in [*_SECTION_TYPES, *sorted(cfg.extra)]:
        typ = _SECTION_TYPES.get(sec) or type(cfg.extra[sec])
        docs, types_ = _field_docs(typ), field_types(typ)
        lines.append(f"\n[{sec}]")
        for f in dataclasses.fields(typ):
            kind = f"  ({type_name(types_[f.name])})" if f.name in types_ else ""
            lines.append(f"  --{sec}.{f.name} = {values[sec][f.name]!r}{kind}")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)
