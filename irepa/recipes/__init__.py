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
subclass an existing recipe to inherit its defaults), and add the class to `RECIPES` below:
the registry is that list, nothing registers itself on import. The file provides:

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
  decoder(manifest, device, vae=None, scaling=None, parts=None, checkpoint=None)
                    model outputs -> images in [0, 1] (default: the data's codec, irepa.codec)
  extra_parts(device)
                    {name: PartSpec(module, optimizer, ema_decays, grad_clip)}: more trained
                    parts; each gets its optimizer, EMA, wrapping and files in every checkpoint
  make_step(step)   replace the train step (several parts, several optimizers, a fixed order)
                    with an object that uses the default step's pieces (see Recipe.make_step)
  alignment_hidden(model, batch, draws)
                    the hidden state alone, for a step that aligns without denoising (REPA-E)
  trains_decoder, decoder_tag(checkpoint), export_decoder(ckpt, out, overwrite)
                    a recipe whose decoder is a trained part of the run (REPA-E's VAE)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from irepa import models
from irepa.config import Config, ConfigError, build_config, describe as describe_config, merge_trees

from .base import Loss, PartSpec, Recipe
from .jit import JiTRecipe
from .meanflow import MeanFlowRecipe
from .repae import RepaERecipe
from .sit import SiTRecipe

__all__ = ["Recipe", "Loss", "PartSpec", "RECIPES", "DEFAULT_PRESET", "names", "get", "for_config", "sections",
           "presets", "resolve", "describe", "stored_config"]

RECIPES: tuple[type[Recipe], ...] = (JiTRecipe, MeanFlowRecipe, RepaERecipe, SiTRecipe)
"""every recipe the registry knows (train.recipe is one of their names)"""
DEFAULT_PRESET = "digits-sit-irepa"
MOVED = {("train", "time_sampling"): "time_sampling"}
"""keys that moved from a core section into the recipes' own sections: (section, key) -> key there. Old
config.json files and command lines still work: the value goes to the run's recipe's section when that
recipe has the option, and a config.json's value is dropped where the recipe never read it"""
_REGISTRY: dict[str, type[Recipe]] = {}


def _registry() -> dict[str, type[Recipe]]:
    if not _REGISTRY:
        for cls in RECIPES:
            if not cls.name or cls.name in _REGISTRY:
                raise ValueError(f"recipe {cls.__name__}: its name {cls.name!r} is empty or taken")
            if cls.data_kind not in ("latent", "pixels"):
                raise ValueError(f"recipe {cls.name!r}: data_kind must be 'latent' or 'pixels'")
            _REGISTRY[cls.name] = cls
    return _REGISTRY


def names() -> list[str]:
    return sorted(_registry())


def get(name: str) -> type[Recipe]:
    reg = _registry()
    if name not in reg:
        raise ConfigError(f"unknown recipe {name!r}; known: {sorted(reg)}")
    return reg[name]


def sections() -> dict[str, type]:
    """The recipes' own config sections: name -> Options dataclass (what irepa.config reads and builds)."""
    return {name: cls.Options for name, cls in _registry().items() if cls.Options is not None}


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
    overrides = _moved_overrides(dict(overrides or {}), overrides_recipe(tree, overrides))
    cfg = build_config(tree, overrides, preset, sections())
    for_config(cfg)
    return cfg


def overrides_recipe(tree: dict, overrides: dict[str, Any] | None) -> str:
    """The recipe a preset tree has after the overrides (train.recipe, dotted or short)."""
    over = overrides or {}
    return str(over.get("train.recipe", over.get("recipe", tree.get("train", {}).get("recipe", "sit"))))


def _moved_overrides(overrides: dict[str, Any], recipe: str) -> dict[str, Any]:
    """--train.time_sampling X (a key that moved, MOVED) -> --<recipe>.time_sampling X."""
    for (section, key), new in MOVED.items():
        if f"{section}.{key}" not in overrides:
            continue
        value = overrides.pop(f"{section}.{key}")
        if new not in _option_names(get(recipe)):
            owners = [n for n, c in _registry().items() if new in _option_names(c)]
            raise ConfigError(f"--{section}.{key} is now an option of the {' and '.join(owners)} recipes "
                              f"(--<recipe>.{new}); recipe {recipe!r} has no such option")
        overrides[f"{recipe}.{new}"] = value
    return overrides


def _option_names(cls: type[Recipe]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Options)} if cls.Options is not None else set()


def stored_config(tree: dict) -> Config:
    """The Config of a run folder's config.json. A recipe option added after the run was made is
    absent from it and takes the value the run was trained with (the Options' ADDED), not today's
    default."""
    tree = _moved_keys(tree)
    for name, cls in _registry().items():
        added = getattr(cls.Options, "ADDED", None) if cls.Options is not None else None
        if added and isinstance(tree.get(name), dict):
            tree[name] = {**added, **tree[name]}
    return Config.from_dict(tree, sections())


def _moved_keys(tree: dict) -> dict:
    """A config.json's keys that moved (MOVED) put into its recipe's section (or dropped where the recipe
    never read them: train.time_sampling of a jit or meanflow run)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    train = tree.get("train", {})
    recipe = train.get("recipe", train.get("objective", "sit"))
    for (section, key), new in MOVED.items():
        if key not in tree.get(section, {}):
            continue
        value = tree[section].pop(key)
        if recipe in _registry() and new in _option_names(get(recipe)):
            tree.setdefault(recipe, {}).setdefault(new, value)
    return tree


def describe(preset: str = DEFAULT_PRESET) -> str:
    """Every config key with its value in `preset` and its documentation (launch/train.py --help)."""
    return describe_config(resolve(preset))
