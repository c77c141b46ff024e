"""The recipe registry and interface (irepa.recipes): the choice and its cross-check, presets, a
recipe's own config section, the order of a step's random draws, and a recipe with a second
trained part and its own step (what REPA-E needs) checkpointed and resumed exactly."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from irepa import config, recipes
from irepa.recipes import PartSpec
from irepa.recipes.sit import SiTRecipe

TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "data.resolution": 64, "train.batch_size": 16,
        "train.log_every": 1, "train.ckpt_every": 2, "train.sample_steps": 2, "train.ema_decays": [0.9],
        "optim.warmup_steps": 0, "train.device": "cpu"}


def test_registry_chooses_by_name_and_checks_the_model_family():
    assert recipes.names() == ["jit", "meanflow", "repae", "sit"]
    assert recipes.get("jit").data_kind == "pixels" and recipes.get("sit").data_kind == "latent"
    cfg = recipes.resolve("digits-jit-irepa")
    assert type(recipes.for_config(cfg)).__name__ == "JiTRecipe"
    with pytest.raises(ValueError, match=r"recipe 'sit' trains SiT models, but model.name is 'JiT-T/16' "
                                         r"\(train.recipe jit trains it\)"):
        recipes.resolve("digits-jit-irepa", {"train.recipe": "sit"})
    with pytest.raises(ValueError, match="unknown recipe 'meanflw'; known: \\['jit', 'meanflow', 'repae', 'sit'\\]"):
        recipes.resolve(overrides={"train.recipe": "meanflw"})
    table = recipes.presets()
    assert all(tree["train"]["recipe"] in recipes.names() for tree in table.values())
    assert table["sit-xl2-irepa"]["train"]["recipe"] == "sit" and table["jit-b16-irepa"]["train"]["recipe"] == "jit"
    assert not any(tree["data"]["source"].startswith("data/") for tree in table.values())  # never in the package


def test_config_json_of_older_runs_still_loads():
    """Run folders written before train.objective became train.recipe resume and sample as before."""
    d = recipes.resolve("digits-jit-irepa").to_dict()
    d["train"]["objective"] = d["train"].pop("recipe")
    assert config.Config.from_dict(json.loads(json.dumps(d))).train.recipe == "jit"
    with pytest.raises(ValueError, match="unknown section 'meanflw'"):
        config.Config.from_dict({**d, "meanflw": {}})


def test_sit_draws_come_in_one_order_for_the_whole_batch():
    """Posterior sample, label dropout, t, noise: the order of the trainer's step before the recipes
    existed (so the digits default is bit-identical), from one generator."""
    recipe = SiTRecipe(recipes.resolve())
    x, std = torch.randn(6, 1, 4, 4), torch.rand(6, 1, 4, 4)
    d = recipe.draw({"x": x, "x_std": std, "y": torch.zeros(6, dtype=torch.long)}, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x_post = x + std * torch.randn(x.shape, generator=g)
    drop = torch.rand(6, generator=g) < 0.1
    t = torch.rand(6, generator=g)
    noise = torch.randn(x.shape, generator=g)
    for k, want in {"x": x_post, "drop": drop, "t": t, "noise": noise}.items():
        assert torch.equal(d[k], want), k
    assert all(v.shape[0] == 6 for v in d.values())  # batch-sliceable


@dataclass
class ToyOptions:
    disc_weight: float = 0.5
    """weight of the second part's loss"""


class ToyStep:
    """The default step for the diffusion model, then a second part with its own optimizer."""

    def __init__(self, step):
        self.step = step

    def __call__(self, batch, index):
        out = self.step(batch, index)
        disc = self.step.parts["disc"]
        with self.step.autocast():
            loss = disc.train_module(batch["x"]).pow(2).mean() * self.step.recipe.options.disc_weight
        self.step.backward(loss)
        out["disc"] = loss.detach()
        out["disc_grad_norm"] = self.step.optimizer_step(disc, index, update_scale=False)
        return out


class ToyRecipe(SiTRecipe):
    name = "toy"
    Options = ToyOptions
    presets = {"toy-digits": SiTRecipe.presets["digits-sit-irepa"]}

    def extra_parts(self, device):
        torch.manual_seed(7)
        disc = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3, padding=1))  # BN: the EMA must average its stats
        return {"disc": PartSpec(disc, ema_decays=(0.5,), grad_clip=1.0)}

    def make_step(self, step):
        return ToyStep(step)


@pytest.fixture
def toy(monkeypatch):
    reg = recipes._registry()
    monkeypatch.setitem(reg, "toy", ToyRecipe)  # its config section comes with it (recipes.sections())
    return ToyRecipe


@pytest.fixture
def cache(digits_cache, one_thread):
    return digits_cache


def _toy_cfg(tmp_path, name, cache="", **over):
    return recipes.resolve("toy-digits", {**TINY, "train.out_dir": str(tmp_path), "train.run_name": name,
                                          "data.cache_dir": cache or str(tmp_path / "datasets"), **over})


def test_a_recipe_section_is_typed_overridable_and_saved(toy, tmp_path):
    cfg = _toy_cfg(tmp_path, "a", disc_weight=0.25)  # a short key of the recipe's own section
    assert cfg.toy.disc_weight == 0.25 and cfg.train.recipe == "toy"
    assert json.loads(cfg.to_json())["toy"] == {"disc_weight": 0.25}
    assert recipes.stored_config(json.loads(cfg.to_json())).toy.disc_weight == 0.25
    assert "--toy.disc_weight = 0.5" in recipes.describe("toy-digits")
    assert _toy_cfg(tmp_path, "b").toy.disc_weight == 0.5  # the defaults are written out too
    with pytest.raises(ValueError, match="unknown config key 'toy.disc_wieght'"):
        _toy_cfg(tmp_path, "c", **{"toy.disc_wieght": 1.0})


def test_extra_part_with_its_own_step_checkpoints_and_resumes_exactly(toy, tmp_path, cache):
    from irepa.train import checkpoint
    from irepa.train.trainer import Trainer

    full = Trainer(_toy_cfg(tmp_path, "full", cache, **{"train.steps": 4}))
    bn0 = full.run.parts["disc"].ema.models[0][0].running_mean.clone()
    full.train()
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("disc" in r and "disc_grad_norm" in r for r in rows)
    ckpt = checkpoint.latest_checkpoint(tmp_path / "full")
    files = set(json.loads((ckpt / "manifest.json").read_text())["files"])
    assert {"disc.safetensors", "disc-optimizer.safetensors", "disc-ema.safetensors", "model.safetensors"} <= files
    ema_bn = full.run.parts["disc"].ema.models[0][0].running_mean
    assert not torch.equal(ema_bn, bn0) and not torch.equal(ema_bn, full.run.parts["disc"].module[0].running_mean)

    Trainer(_toy_cfg(tmp_path, "half", cache, **{"train.steps": 2})).train()
    resumed = Trainer(_toy_cfg(tmp_path, "half", cache, **{"train.steps": 4}))
    assert resumed.step == 2
    resumed.train()
    for name in ("model", "disc"):
        a, b = full.run.parts[name], resumed.run.parts[name]
        for k, v in a.module.state_dict().items():
            torch.testing.assert_close(b.module.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=f"{name}.{k}")
        for k, v in a.ema.state_dicts()[0].items():
            torch.testing.assert_close(b.ema.state_dicts()[0][k], v, rtol=1e-6, atol=1e-7, msg=f"{name} ema {k}")
    with pytest.raises(checkpoint.CheckpointError, match="holds no trained part 'extra'"):
        checkpoint.load(ckpt, {"model": full.run.parts["model"], "extra": full.run.parts["disc"]})
