"""Training recipes, one file each, and the registry that chooses one (train.recipe).

A recipe is how a model is trained and sampled: its time convention, objective, velocity
for the samplers, data kind, decoder and presets. The trainer, perf/bench_step.py, the
sample grid, online FID and launch/sample.py ask the run's recipe (`for_config(cfg)`);
nothing else switches on a recipe's name.

  sit   SiT flow matching (REPA / iREPA), latents          irepa/recipes/sit.py
  jit   JiT x-prediction, pixels                           irepa/recipes/jit.py
  meanflow MeanFlow average velocity (1- and N-step), latents  irepa/recipes/meanflow.py
  repae SiT + SD-VAE trained end to end (REPA-E), pixels  irepa/recipes/repae.py

How to add a recipe
-------------------
Add one file, irepa/recipes/<name>.py, with a subclass of `Recipe` (irepa/recipes/base.py;
subclass an existing recipe to inherit its defaults). The registry imports every module of
this package and registers each Recipe subclass it defines that has a `name`. The file provides:

  name              registry key: the value of train.recipe
  model_families    model name prefixes it trains, e.g. ("SiT",); a run whose model.name is
                    of another family is refused when the config is resolved
  data_kind         "latent" or "pixels": what the built-in digits preparation (and prepare) stores
  presets           {preset name: config tree}; train.recipe is filled in by the registry
  draw(batch, generator)
                    every random draw of a step for the whole batch, made once: a dict of
                    tensors with a leading batch dim (micro-batches slice it). Start from
                    draw_data(), which draws the posterior sample "x" and label dropout "drop"
  loss(model, batch, draws)
                    one micro-batch -> Loss(denoise, hidden for the alignment head, logs)
and, where the defaults (SiT's) do not fit:
  Options           a dataclass of the recipe's own settings: config section <name>
                    (cfg.<name>, --<name>.<key>, listed by --help); a key added once runs
                    exist goes in its ClassVar ADDED with the value those runs had
  model_kwargs(fused) / build_model(fused)
                    extra constructor keywords or modules (SiT.forward takes extra_cond [B, D],
                    added to its t + y conditioning)
  velocity_fn(model)
                    the trained model as a velocity in SiT time for irepa.sampling
  sample(model, noise, labels, method=, steps=, cfg=, interval=, null_class=, generator=)
                    the sampler every caller uses (default: irepa.sampling.sample on velocity_fn)
  decoder(manifest, device, vae=None, scaling=None)
                    model outputs -> images in [0, 1] (default: the data's codec, irepa.codec)
  extra_parts(device)
                    {name: PartSpec(module, optimizer, ema_decays, grad_clip)}: more trained
                    parts; each gets its optimizer, EMA, wrapping and files in every checkpoint
  make_step(step)   replace the train step (several parts, several optimizers, a fixed order)
                    with an object that uses the default step's pieces (see Recipe.make_step)
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from irepa import models
from irepa.config import Config, ConfigError, build_config, describe as describe_config, merge_trees, register_section

from .base import Loss, PartSpec, Recipe

__all__ = ["Recipe", "Loss", "PartSpec", "DEFAULT_PRESET", "names", "get", "for_config", "presets", "resolve",
           "describe", "stored_config"]

DEFAULT_PRESET = "digits-sit-irepa"
_REGISTRY: dict[str, type[Recipe]] = {}


def _registry() -> dict[str, type[Recipe]]:
    if not _REGISTRY:
        found: dict[str, type[Recipe]] = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            if info.name == "base":
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            for obj in vars(module).values():
                if (isinstance(obj, type) and issubclass(obj, Recipe) and obj.__module__ == module.__name__
                        and obj.name):
                    if obj.name in found:
                        raise ValueError(f"recipe name {obj.name!r} is defined twice ({found[obj.name].__module__}, "
                                         f"{module.__name__})")
                    if obj.data_kind not in ("latent", "pixels"):
                        raise ValueError(f"recipe {obj.name!r}: data_kind must be 'latent' or 'pixels'")
                    if obj.Options is not None:
                        register_section(obj.name, obj.Options)
                    found[obj.name] = obj
        _REGISTRY.update(found)
    return _REGISTRY


def names() -> list[str]:
    return sorted(_registry())


def get(name: str) -> type[Recipe]:
    reg = _registry()
    if name not in reg:
        raise ConfigError(f"unknown recipe {name!r}; known: {sorted(reg)}")
    return reg[name]


def for_config(cfg: Config) -> Recipe:
    """The run's recipe, bound to its config; refuses a model of a family the recipe does not train."""
    cls = get(cfg.train.recipe)
    if cfg.model.name not in models.names():
        known = [n for n in models.names() if n.split("-", 1)[0] in cls.model_families]
        raise ConfigError(f"unknown model.name {cfg.model.name!r}; recipe {cls.name!r} trains {', '.join(known)}")
    family = cfg.model.name.split("-", 1)[0]
    if family not in cls.model_families:
        owners = [n for n, c in _registry().items() if family in c.model_families]
        raise ConfigError(f"recipe {cls.name!r} trains {'/'.join(cls.model_families)} models, but model.name is "
                          f"{cfg.model.name!r}" + (f" (train.recipe {' or '.join(owners)} trains it)" if owners else ""))
    return cls(cfg)


def presets() -> dict[str, dict]:
    """Every recipe's presets, each with its train.recipe filled in."""
    out: dict[str, dict] = {}
    for name, cls in _registry().items():
        for preset, tree in cls.presets.items():
            if preset in out:
                raise ValueError(f"preset {preset!r} is defined by two recipes")
            given = tree.get("train", {}).get("recipe", name)
            if given != name:
                raise ValueError(f"preset {preset!r} of recipe {name!r} says train.recipe={given!r}")
            out[preset] = merge_trees(tree, {"train": {"recipe": name}})
    return out


def resolve(preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None) -> Config:
    """Preset + overrides -> validated Config whose recipe accepts its model (ValueError naming what is wrong)."""
    table = presets()
    if preset not in table:
        raise ConfigError(f"unknown preset {preset!r}; known: {sorted(table)}")
    tree = table[preset]
    own = get(tree["train"]["recipe"])
    if own.Options is not None:  # the recipe's options: listed by --help, written to config.json, short keys work
        tree = merge_trees({own.name: {}}, tree)
    cfg = build_config(tree, overrides, preset)
    for_config(cfg)
    return cfg


def stored_config(tree: dict) -> Config:
    """The Config of a run folder's config.json. A recipe option added after the run was made is
    absent from it and takes the value the run was trained with (the Options' ADDED), not today's
    default."""
    tree = dict(tree)
    for name, cls in _registry().items():
        added = getattr(cls.Options, "ADDED", None) if cls.Options is not None else None
        if added and isinstance(tree.get(name), dict):
            tree[name] = {**added, **tree[name]}
    return Config.from_dict(tree)


def describe(preset: str = DEFAULT_PRESET) -> str:
    """Every config key with its value in `preset` and its documentation (launch/train.py --help)."""
    return describe_config(resolve(preset))
