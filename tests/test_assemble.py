"""One assembly of a run (irepa.train.assemble.build_run) and what it replaced: every tool that
builds a run calls it; the recipe interface declares every hook its callers use; recipe options
live in the recipe's own section (with the old spellings mapped); the registry is an explicit
list; nothing outside irepa/recipes/ compares a recipe name; the trainer's components work alone."""
from __future__ import annotations

import importlib

import json
import re
from pathlib import Path

import pytest
import torch

from irepa import config, models, recipes
from irepa.config import ConfigError
from irepa.recipes.base import Recipe
from irepa.train import assemble

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "data.resolution": 64, "train.batch_size": 8,
        "train.ema_decays": [0.9], "optim.warmup_steps": 0, "train.device": "cpu"}


def _perf(name: str):
    return importlib.import_module(f"perf.{name}")


def test_every_tool_builds_its_run_through_build_run(tmp_path, digits_cache, one_thread, monkeypatch):
    """The trainer, export (offline_parts), bench_step, bench_repae and the roofline each call the one
    entry, once per run they build (the same function object, not a copy)."""
    from irepa.train import trainer
    tools = {"trainer": trainer, "offline_parts": assemble, "bench_step": _perf("bench_step"),
             "bench_repae": _perf("bench_repae"), "roofline": _perf("roofline.trace")}
    calls, real = [], assemble.build_run
    for who, module in tools.items():
        assert module.build_run is real, who

        def spy(*args, _who=who, **kw):
            calls.append(_who)
            return real(*args, **kw)
        monkeypatch.setattr(module, "build_run", spy)
    cfg = recipes.resolve(overrides={**TINY, "train.out_dir": str(tmp_path), "train.run_name": "r",
                                     "data.cache_dir": digits_cache})
    trainer.Trainer(cfg)
    assemble.offline_parts(cfg, [32])
    tools["bench_step"].build_case("SiT-Tiny/2", tools["bench_step"].QUICK["SiT-Tiny/2"], "eager", 4,
                                   torch.device("cpu"), plan_only=True)
    tools["bench_repae"].build("digits", torch.device("cpu"), 2, "fp32")
    tools["roofline"].trace_step("SiT-Tiny/2", "eager", 4, _perf("roofline").DEVICES["h200"], micro_batch=4,
                                 quick=True)
    assert calls == list(tools)


def test_offline_parts_are_the_trainers_initial_parts(tmp_path, digits_cache, one_thread):
    """Export rebuilds a run's parts as the trainer built them: same names, shapes and initial values."""
    from irepa.train.trainer import Trainer
    cfg = recipes.resolve(overrides={**TINY, "train.out_dir": str(tmp_path), "train.run_name": "r",
                                     "data.cache_dir": digits_cache})
    run = Trainer(cfg).run
    live, offline = run.parts, assemble.offline_parts(cfg, run.data.encoder_dims)
    assert offline.keys() == live.keys()
    for name, part in live.items():
        a, b = part.module.state_dict(), offline[name].module.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_roofline_traces_the_trainers_loss_scaler_and_update():
    """The baseline (fp16) trace holds the trainer's own loss scaler (its unscale, then the optimizer
    and EMA in the update phase, marked by the step's profiler range), not a GradScaler of its own."""
    R = _perf("roofline")
    tr = R.trace_step("SiT-Tiny/2", "baseline", 4, R.DEVICES["h200"], micro_batch=4, quick=True)
    update = [o.name for o in tr.ops if o.phase == "update"]
    assert update.count("_amp_foreach_non_finite_check_and_unscale_") == 1
    assert "_fused_adamw_" in update and "_foreach_lerp_" in update  # AdamW (fused, as on CUDA), EMA
    assert not any(o.phase == "update" for o in tr.ops if o.name in ("mm", "addmm", "convolution"))


_CALLERS = ["irepa/train", "irepa/compare/backend.py", "launch", "perf"]  # compare's other "recipe"s are spec rows


def test_the_recipe_interface_declares_every_hook_its_callers_use():
    """Every attribute the trainer, compare, the launch scripts and perf/ read off a recipe is declared
    by irepa.recipes.base.Recipe; none is read by getattr or by a private name."""
    used = set()
    for folder in _CALLERS:
        for path in [ROOT / folder] if folder.endswith(".py") else (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            used |= {(m, path.name) for m in re.findall(r"\brecipe\.(\w+)", text)}
            assert not re.search(r"getattr\(\s*(self\.)?recipe\b", text), path
            assert not re.search(r"\b(r|recipe)\._\w+", text), path
    declared = set(dir(Recipe)) | {"cfg"}  # cfg: set by Recipe.__init__
    assert {m for m, _ in used} and not {(m, f) for m, f in used if m not in declared}


def test_ema_copies_buffers_from_the_model():
    """What REPA-E sets at step 0 (the latent statistics) goes into every EMA copy by EMA.copy_buffers."""
    from irepa.models.latent_norm import LatentNorm
    from irepa.train.ema import EMA
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), LatentNorm(3))
    ema = EMA(m, [0.9, 0.5])
    m[1].init_from_stats(torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    ema.copy_buffers(m)
    for copy in ema.models:
        assert torch.equal(copy[1].bn.running_var, m[1].bn.running_var)
        assert torch.equal(copy[1].bn.running_mean, torch.tensor([1.0, 2.0, 3.0]))
        assert not torch.equal(copy[0].weight, torch.zeros(2, 2))  # weights untouched


def test_time_sampling_is_a_sit_option_and_the_old_key_still_works(tmp_path):
    """train.time_sampling moved to the recipe's own section: the old key on the command line and in
    a run's config.json lands there; a recipe that never read it refuses the override (naming the
    recipes that have it) and drops it from an old config.json."""
    assert recipes.resolve(overrides={"train.time_sampling": "lognormal"}).sit.time_sampling == "lognormal"
    assert recipes.resolve(overrides={"time_sampling": "lognormal"}).sit.time_sampling == "lognormal"
    assert recipes.resolve("digits-repae-irepa", {"train.time_sampling": "lognormal"}).repae.time_sampling \
        == "lognormal"
    with pytest.raises(ConfigError, match="train.time_sampling is now an option of the repae and sit recipes"):
        recipes.resolve("digits-jit-irepa", {"train.time_sampling": "lognormal"})
    old = recipes.resolve().to_dict()
    old["train"]["time_sampling"] = old.pop("sit")["time_sampling"] = "lognormal"
    assert recipes.stored_config(json.loads(json.dumps(old))).sit.time_sampling == "lognormal"
    jit = recipes.resolve("digits-jit-irepa").to_dict()
    jit["train"]["time_sampling"] = "uniform"
    assert "time_sampling" not in recipes.stored_config(jit).to_dict()["train"]
    from irepa.train.run_folder import resume_conflicts  # the resume check sees the moved key as the same
    assert resume_conflicts(recipes.stored_config(old), recipes.resolve(overrides={"time_sampling": "lognormal"}),
                            recipes.get("sit")) == []


def test_the_registry_is_an_explicit_list_and_config_keeps_none():
    assert [cls.name for cls in recipes.RECIPES] == ["jit", "meanflow", "repae", "sit"] == recipes.names()
    assert not hasattr(config, "register_section") and not hasattr(config, "_RECIPE_SECTIONS")
    tree = recipes.resolve("digits-meanflow-irepa").to_dict()
    with pytest.raises(ConfigError, match="unknown section 'meanflow'"):
        config.Config.from_dict(tree)  # the sections are an argument, not import-time state
    assert config.Config.from_dict(tree, recipes.sections()).meanflow.omega == 1.0


def test_the_model_registry_says_which_families_take_fused_kernels():
    """The base recipe asks irepa.models whether a family has a fused kernel; the JiT recipe removes
    nothing from its keywords (JiT refuses the flag, tests/test_jit.py)."""
    from irepa.recipes.jit import JiTRecipe
    assert "model_kwargs" not in vars(JiTRecipe)
    assert models.takes_fused_kernels("SiT-XL/2") and not models.takes_fused_kernels("JiT-B/16")
    jit = recipes.for_config(recipes.resolve("digits-jit-irepa"))
    assert "fused_kernels" not in jit.model_kwargs(True)
    assert recipes.for_config(recipes.resolve()).model_kwargs(True)["fused_kernels"] is True
    model = jit.build_model(True)
    assert all(blk.modulate.__module__ == "irepa.models.jit" for blk in model.blocks)


_RECIPE_NAME = re.compile(r"""(==|!=)\s*['"](sit|jit|meanflow|repae)['"]|['"](sit|jit|meanflow|repae)['"]\s*(==|!=)"""
                          r"""|recipes\.get\(\s*['"]""")


def test_no_file_outside_the_recipes_compares_a_recipe_name():
    """(irepa.sampling's interval rules "sit" / "jit" name the releases' CFG rules, not recipes.)"""
    for folder in ["irepa", "launch", "perf", "data", "kernels"]:
        for path in (ROOT / folder).rglob("*.py"):
            if "recipes" in path.relative_to(ROOT).parts:
                continue
            text = re.sub(r"interval_rule\s*==\s*['\"]\w+['\"]", "", path.read_text())
            assert not _RECIPE_NAME.search(text), path


def test_nonfinite_watch_names_the_first_bad_step_alone():
    from irepa.train.checkpoint import NonFiniteError
    from irepa.train.nonfinite import FiniteWatch
    w = FiniteWatch(torch.device("cpu"), world=1)
    ok, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    w.note(ok, {"model": ok}, 1)
    w.check(Path("run"), None, 1)  # nothing to report
    w.note(nan, {"model": ok}, 2)
    w.note(ok, {"model": nan}, 3)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 2 in run "):
        w.check(Path("run"), None, 3)


def test_metrics_log_writes_interval_means_and_the_recipes_columns(tmp_path):
    from irepa.train.metrics_log import MetricsLog
    cfg = recipes.resolve(overrides={"train.batch_size": 4})
    checked, scalars = [], []
    log = MetricsLog(cfg, tmp_path, is_main=True, world=1, device=torch.device("cpu"), flops_per_image=1e9,
                     lr=lambda index: 0.1 * index, before_write=lambda: checked.append(True))
    log.open(0)
    log.writer.close()
    log.writer = type("W", (), {"add_scalar": lambda self, *a: scalars.append(a), "close": lambda self: None})()
    for v in (1.0, 3.0):
        t = torch.tensor(v)
        log.add({"loss": t, "denoise": t, "align": t, "grad_norm": t, "vae_loss": 2 * t})
    row = log.write(2)
    assert checked and row["loss"] == 2.0 and row["vae_loss"] == 4.0 and row["lr"] == pytest.approx(0.1)
    assert ("loss/vae_loss", 4.0, 2) in scalars and json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 2
    log.close_bar()
