"""The MeanFlow recipe in the trainer (irepa/recipes/meanflow.py): presets, the order of a step's
draws, exact resume, micro-batches, compiled blocks and JVP, sampling through launch/sample.py.
The math itself is checked against independent references in tests/test_meanflow.py."""
from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from irepa import meanflow as mf
from irepa import recipes
from irepa.recipes.meanflow import MeanFlowRecipe
from irepa.train import checkpoint
from irepa.train.trainer import Trainer

from interrupts import Crash, Interrupt, crash

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.name": "SiT-Tiny/2", "model.input_size": 8, "data.resolution": 64, "train.batch_size": 8,
        "train.log_every": 1, "train.ckpt_every": 3, "train.sample_steps": 1, "train.ema_decays": [0.9],
        "optim.warmup_steps": 0, "train.device": "cpu"}
_CACHE = {}


@pytest.fixture(autouse=True, scope="module")
def _shared_dataset_cache(digits_cache):
    _CACHE["dir"] = digits_cache


@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


def _cfg(out_dir, name, **over):
    return recipes.resolve("digits-meanflow-irepa", {**TINY, "train.out_dir": str(out_dir), "train.run_name": name,
                                                     "data.cache_dir": _CACHE["dir"], **over})


def test_presets_carry_the_published_settings():
    table = recipes.presets()
    for tag, model, depth, guidance in (("b2", "SiT-B/2", 4, (1.0, 0.5, 0.0, 1.0)),
                                        ("l2", "SiT-L/2", 8, (0.2, 0.92, 0.0, 0.8)),
                                        ("xl2", "SiT-XL/2", 8, (0.2, 0.92, 0.0, 0.75))):
        for kind, projector in (("repa", "mlp"), ("irepa", "conv")):
            cfg = recipes.resolve(f"meanflow-sit-{tag}-{kind}")
            assert cfg.train.recipe == "meanflow" and cfg.model.name == model and cfg.model.align_depth == depth
            assert cfg.align.projector == projector and (cfg.align.gamma is None) == (kind == "repa")
            m = cfg.meanflow
            assert (m.omega, m.kappa, m.t_start, m.t_end) == guidance
            assert (m.p_mean, m.p_std, m.data_proportion, m.norm_p, m.norm_eps) == (-0.4, 1.0, 0.75, 1.0, 0.01)
            assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.lr == 1e-4 and cfg.optim.grad_clip is None
            assert cfg.model.class_dropout_prob == 0.1 and cfg.train.steps == 100_000
            assert (cfg.train.sample_method, cfg.train.sample_steps) == ("euler", 1)
    assert recipes.resolve("meanflow-sit-b2-irepa").meanflow.effective_scale == 2.0
    assert "digits-meanflow-irepa" in table and "digits-meanflow-repa" in table
    assert recipes.resolve("digits-meanflow-irepa", {"omega": 2.0}).meanflow.omega == 2.0  # short keys
    with pytest.raises(ValueError, match="kappa"):
        recipes.resolve("digits-meanflow-irepa", {"meanflow.kappa": 1.0})
    with pytest.raises(ValueError, match="trains SiT"):
        recipes.resolve("digits-meanflow-irepa", {"model.name": "JiT-Tiny/4"})


def test_draws_come_in_one_order_for_the_whole_batch():
    """Posterior sample, label dropout (rand < p, made MeanFlow's first-k), t and r, noise."""
    recipe = MeanFlowRecipe(recipes.resolve("digits-meanflow-irepa"))
    B = 40
    x, std = torch.randn(B, 1, 4, 4), torch.rand(B, 1, 4, 4)
    d = recipe.draw({"x": x, "x_std": std, "y": torch.zeros(B, dtype=torch.long)}, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x_post = x + std * torch.randn(x.shape, generator=g)
    k = int((torch.rand(B, generator=g) < 0.1).sum())
    a, b = (torch.sigmoid(-0.4 + torch.randn(B, generator=g)) for _ in range(2))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    r[:30] = t[:30]
    noise = torch.randn(x.shape, generator=g)
    want = {"x": x_post, "drop": torch.arange(B) < k, "t": t, "r": r, "noise": noise}
    assert d.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(d[key], value), key
    assert k > 0  # the check saw a dropped label


def test_resume_after_a_crash_matches_uninterrupted(tmp_path):
    """Model, EMA and logged losses (and the MeanFlow extras) of a run killed after its step-3
    checkpoint and resumed equal those of the run that was never interrupted."""
    Trainer(_cfg(tmp_path, "full", **{"train.steps": 6})).train()
    tr = Trainer(_cfg(tmp_path, "killed", **{"train.steps": 6}))

    tr.run.data.loader = Interrupt(tr.run.data.loader, 4, crash)  # dies before batch 5: the run is killed during step 5
    with pytest.raises(Crash):
        tr.train()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "killed")] == ["step-0000003"]
    resumed = Trainer(_cfg(tmp_path, "killed", **{"train.steps": 6}))
    assert resumed.step == 3
    resumed.train()
    full = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    res = {json.loads(x)["step"]: json.loads(x) for x in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()}
    for row in full[3:]:
        for key in ("loss", "denoise", "align", "mf_mse", "v_mse", "grad_norm"):
            assert res[row["step"]][key] == pytest.approx(row[key], rel=1e-6, abs=1e-7), (row["step"], key)
    a = checkpoint.read_checkpoint(tmp_path / "full/checkpoints/step-0000006")
    b = checkpoint.read_checkpoint(tmp_path / "killed/checkpoints/step-0000006")
    for part in ("model", "ema"):
        sa, sb = (a[part][0], b[part][0]) if part == "ema" else (a[part], b[part])
        assert sa.keys() == sb.keys() and any("h_embedder" in k for k in sa)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (part, key)
    assert (tmp_path / "full/samples/step-0000006.png").stat().st_size > 0


def test_micro_batches_match_the_whole_batch(tmp_path):
    """Gradient accumulation over micro-batches of 2 = one batch of 8 (first-k dropout and r = t
    are decided on the whole batch, so slicing changes no draw)."""
    outs, trs = [], []
    for m in (0, 2):
        tr = Trainer(_cfg(tmp_path, f"mb{m}", **{"train.micro_batch_size": m, "train.ckpt_every": 1000}))
        it = iter(tr.run.data.loader)
        outs.append([{k: float(v) for k, v in tr.run.step_fn(next(it), s).items()} for s in range(2)])
        trs.append(tr)
    for whole, micro in zip(*outs):
        assert micro == pytest.approx(whole, rel=1e-5, abs=1e-6)
    for (k, a), b in zip(trs[0].run.model.module.state_dict().items(), trs[1].run.model.module.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_compiled_checkpointed_and_joint_steps_match_eager(tmp_path, monkeypatch):
    """jvp joint = split; activation checkpointing in both modes (it fails inside a JVP without the
    recipe's unwrapping); train.compile: the blocks compiled per block (in-place forward) for the passes with
    gradient and the guidance, the no-grad JVP compiled as one graph; aot_eager backend (the
    graphs Inductor would get, without its code generation) for test time."""
    from irepa.train import parallelize

    def losses(name, **over):
        tr = Trainer(_cfg(tmp_path, name, **{"train.ckpt_every": 1000, **over}))
        it = iter(tr.run.data.loader)
        return [float(tr.run.step_fn(next(it), s)["loss"]) for s in range(2)], tr

    eager, _ = losses("eager", **{"meanflow.jvp": "split"})
    joint, _ = losses("joint", **{"meanflow.jvp": "joint"})
    assert joint == pytest.approx(eager, rel=1e-5, abs=1e-6)
    for jvp in ("split", "joint"):  # checkpoint wrappers call their block directly inside the JVP
        ac, _ = losses(f"ac-{jvp}", **{"meanflow.jvp": jvp, "train.activation_checkpointing": True})
        assert ac == pytest.approx(eager, rel=1e-5, abs=1e-6)
    torch._dynamo.reset()
    monkeypatch.setattr(parallelize, "apply_compile", partial(parallelize.apply_compile, backend="aot_eager"))
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", dynamic=False))
    compiled, tr = losses("compiled", **{"train.compile": True, "meanflow.jvp": "split"})
    assert tr.run.recipe._jvp_fn is not None  # the JVP went through the compiled function
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def _load_launch(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_script_makes_1_and_4_nfe_batches(tmp_path):
    """launch/sample.py on a MeanFlow run folder: --method euler --steps N is MeanFlow's N-step
    sampler (compared here with irepa.meanflow.sample on the EMA model and the plan's noise);
    heun integrates the instantaneous velocity u(z, t, t)."""
    from irepa import generate as gen
    from irepa.grid import to_uint8_nhwc
    from irepa.train.export import load_for_inference

    Trainer(_cfg(tmp_path, "run", **{"train.steps": 2, "train.ckpt_every": 2})).train()
    sample = _load_launch("sample")
    model, cfg = load_for_inference(tmp_path / "run")
    assert cfg.train.recipe == "meanflow" and hasattr(model, "h_embedder")
    _, recipe, info = sample.load_model(str(tmp_path / "run"), "ema", None, "cpu")
    decode, _ = sample.build_decoder(recipe, info, 1, None, None, None, "cpu")
    for steps in (1, 4):
        out = tmp_path / f"nfe{steps}"
        sample.main(str(tmp_path / "run"), str(out), num_samples=6, batch=6, method="euler", steps=steps,
                    shard_size=6, keep_shards=True, device="cpu", seed=1)
        with np.load(out / "samples.npz") as z:
            images, labels = z["arr_0"], z["arr_1"]
        assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8 and (out / "grid.png").is_file()
        plan = gen.SamplePlan(**{**json.loads((out / "plan.json").read_text())})
        noise = torch.randn((6, *plan.latent_shape), generator=torch.Generator().manual_seed(plan.shard_seed(0)))
        x = mf.sample(model, noise, torch.as_tensor(labels), steps=steps)
        want = to_uint8_nhwc(decode(x))
        assert np.abs(want.astype(int) - images.astype(int)).max() <= 1
    heun = tmp_path / "heun"
    sample.main(str(tmp_path / "run"), str(heun), num_samples=6, batch=6, method="heun", steps=3,
                shard_size=6, device="cpu", seed=1)
    assert (heun / "samples.npz").is_file()


def test_recipe_sampler_and_velocity():
    recipe = MeanFlowRecipe(recipes.resolve("digits-meanflow-irepa"))
    torch.manual_seed(0)
    model = recipe.build_model(False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    noise, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3])
    out = recipe.sample(model, noise, y, method="euler", steps=1)
    torch.testing.assert_close(out, noise - mf.average_velocity(model, noise, torch.ones(3), torch.ones(3), y)[0],
                               rtol=1e-5, atol=1e-5)
    t = torch.full((3,), 0.4)
    torch.testing.assert_close(recipe.velocity_fn(model)(noise, t, y),
                               mf.average_velocity(model, noise, t, torch.zeros(3), y)[0])


def test_fp32_target_under_fsdp_bf16_falls_back_to_autocast(tmp_path, capsys):
    """FSDP2 gathers bf16 parameters for the forward, so a JVP with autocast off would feed them
    fp32 activations (a dtype error, shown first); the recipe runs the target under the run's
    autocast instead and says so once. Single-rank process group, FSDP2 as the trainer applies it."""
    import dataclasses

    import torch.distributed as dist

    from irepa.train import parallelize
    from irepa.train.build import AlignedDiffusion

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        cfg = recipes.resolve("digits-meanflow-irepa", {"model.name": "SiT-Tiny/2", "model.input_size": 8,
                                                        "train.precision": "bf16", "align.encoders": []})
        recipe = recipes.for_config(cfg)
        torch.manual_seed(0)
        net = parallelize.apply_fsdp(AlignedDiffusion(recipe.build_model(False), None, recipe),
                                     torch.device("cpu"), torch.bfloat16)
        batch = {"x": torch.randn(4, 1, 8, 8), "y": torch.randint(0, 10, (4,))}
        draws = recipe.draw(batch, torch.Generator().manual_seed(0))
        recipe._settings = dataclasses.replace(recipe.options, target_precision="fp32")  # no fallback
        with pytest.raises(RuntimeError, match="should be the same|dtype"), torch.autocast("cpu", torch.bfloat16):
            net(batch, draws, [])
        recipe._settings = None
        capsys.readouterr()
        with torch.autocast("cpu", torch.bfloat16):
            denoise, _, _ = net(batch, draws, [])
        denoise.backward()
        assert recipe._settings.target_precision == "amp" and torch.isfinite(denoise)
        assert "MeanFlow target under the run's autocast" in capsys.readouterr().err
    finally:
        dist.destroy_process_group()
