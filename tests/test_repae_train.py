"""REPA-E through the trainer: exact resume of all three parts, and 2 gloo ranks against one process.

The 2-rank run (SiT under FSDP2 with the synchronized latent BatchNorm, VAE and discriminator
under DDP) is checked against a single process that replays it by hand: each rank's batch
and generator for its VAE and discriminator passes (their losses averaged, as DDP averages
gradients), and one SiT pass over both halves together (what the synchronized BatchNorm
computes). So weights, EMA and optimizer states must agree to float32 round-off. The
discriminator's BatchNorm running statistics are left out (under DDP they are rank 0's; they
never enter a forward, which uses batch statistics in training).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irepa import recipes, transport

ROOT = Path(__file__).resolve().parents[1]
B, WORLD = 8, 2
TINY = {"model.input_size": 4, "data.resolution": 32, "repae.vae": "tiny", "train.batch_size": B,
        "train.precision": "fp32", "train.log_every": 1, "train.ckpt_every": 2, "train.sample_steps": 2,
        "train.device": "cpu", "optim.warmup_steps": 0, "repae.recon_every": 0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets"))


def _cfg(out: Path, name: str, cache: str, **extra):
    return recipes.resolve("digits-repae-irepa", {**TINY, "data.cache_dir": cache, "train.out_dir": str(out),
                                                  "train.run_name": name, **extra})


def _files(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    return {p.name: load_file(str(p)) for p in sorted(ckpt.glob("*.safetensors")) if p.name != "trainer.safetensors"}


def test_resume_is_exact_for_all_parts(tmp_path, cache):
    """4 steps straight = 2 steps, a new process-like Trainer resuming, 2 more: every tensor of
    every part (SiT + EMA with BatchNorm buffers, VAE, discriminator, their three AdamW states)."""
    from irepa.train.trainer import Trainer
    Trainer(_cfg(tmp_path, "straight", cache, **{"train.steps": 4})).train()
    Trainer(_cfg(tmp_path, "split", cache, **{"train.steps": 2})).train()
    tr = Trainer(_cfg(tmp_path, "split", cache, **{"train.steps": 4}))
    assert tr.step == 2
    tr.train()
    a = _files(tmp_path / "straight/checkpoints/step-0000004")
    b = _files(tmp_path / "split/checkpoints/step-0000004")
    assert {"vae.safetensors", "vae-optimizer.safetensors", "disc.safetensors", "disc-optimizer.safetensors",
            "optimizer.safetensors", "ema.safetensors", "model.safetensors"} <= set(a)
    assert a.keys() == b.keys()
    for f in a:
        assert a[f].keys() == b[f].keys(), f
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), f"{f}:{k}"
    assert any(k.endswith("latent_norm.bn.running_var") for k in a["ema.safetensors"])
    # the trained pos_embed (repae.train_pos_embed, default true) is saved, averaged and resumed with the rest
    table = tr.run.model.module.model.sincos_pos_embed()
    assert not torch.equal(a["model.safetensors"]["model.pos_embed"], table)
    assert not torch.equal(a["ema.safetensors"]["pos_embed"], table)
    assert any(p is tr.run.model.module.model.pos_embed for p in tr.run.model.optimizer.param_groups[0]["params"])
    assert (tmp_path / "straight/samples/step-0000004.png").is_file()


def test_compiled_steps_match_eager(tmp_path, cache, monkeypatch):
    """train.compile true (the SiT blocks compiled per block, fullgraph) against eager: 3 REPA-E
    steps give the same SiT, VAE and discriminator losses and gradient norms, and the same weights
    of all three parts. Every torch.compile runs with the aot_eager backend (dynamo and AOT autograd
    capture the graphs Inductor would get, without its code generation: seconds on CPU). Two graphs,
    each shared by the blocks: the frozen eval pass of the VAE update (SiT weights without gradient,
    the alignment loss's gradient flowing to the latent) and the training pass of the SiT update.
    Measured on the 2-core CPU: the two runs agree exactly (aot_eager runs the same ATen ops)."""
    from torch._dynamo.utils import counters

    from irepa.train.trainer import Trainer

    def run(name, **over):
        tr = Trainer(_cfg(tmp_path, name, cache, **{"train.steps": 3, "train.ckpt_every": 1000, **over}))
        it = iter(tr.run.data.loader)
        outs = [{k: float(v) for k, v in tr.run.step_fn(next(it), s).items()} for s in range(3)]
        return outs, {n: p.module.state_dict() for n, p in tr.run.parts.items()}

    eager, eager_w = run("eager")
    torch._dynamo.reset()
    counters.clear()
    real_compile = torch.compile

    def aot_eager(fn=None, **kw):
        kw.pop("mode", None)
        return real_compile(fn, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager)
    compiled, compiled_w = run("compiled", **{"train.compile": True})
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # frozen eval pass, training pass
    assert {"loss", "denoise", "align", "vae_loss", "vae_align", "d_loss", "grad_norm_vae"} <= set(eager[0])
    for s, (a, b) in enumerate(zip(compiled, eager)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), f"step {s + 1} {k}: compiled {a[k]}, eager {b[k]}"
    for part in eager_w:
        for k, v in eager_w[part].items():
            torch.testing.assert_close(compiled_w[part][k], v, atol=1e-6, rtol=1e-5, msg=lambda m: f"{part}.{k}: {m}")
    torch._dynamo.reset()


# AdamW's eps raised from 1e-8: its first steps move each weight by ~lr * sign(grad), so a weight whose
# gradient is ~0 would move by a float round-off's sign; with eps 1e-4 a round-off stays a round-off
EPS = {"optim.eps": 1e-4}


def _replay(out: Path, cache: str, steps: int, **extra):
    """One process, the 2-rank run by hand (see the module docstring)."""
    from irepa.autoencoder.losses import discriminator_loss, generator_loss
    from irepa.autoencoder.sdvae import Posterior
    from irepa.train.build import build_data
    from irepa.train.trainer import Trainer
    tr = Trainer(_cfg(out, "replay", cache, **{"train.steps": steps, **extra}))
    st = tr.run.step_fn
    r, model, vae, disc = st.recipe, st.model, st.vae, st.disc
    net = model.module
    loaders = [iter(build_data(tr.cfg, r, net.model, k, WORLD, "cpu").loader) for k in range(WORLD)]
    for index in range(steps):
        per = []
        for k in range(WORLD):
            tr.run.default_step.rank = k
            g = tr.run.default_step.generator(index)
            batch = next(loaders[k])
            d = r.draw_data(batch, g)
            mean, logvar, z, recon = vae.module(d["x"], g)
            t = transport.sample_time(z.shape[0], generator=g)
            noise = torch.randn(z.shape, generator=g)
            per.append(dict(batch=batch, d=d, mean=mean, logvar=logvar, z=z, recon=recon, t=t, noise=noise))
        tr.run.default_step.rank = 0
        if index == 0:
            st._estimate_stats(torch.cat([p["z"].detach() for p in per]))
        trained = [p for p in net.parameters() if p.requires_grad]
        net.eval()
        for p in trained:
            p.requires_grad_(False)
        for p in per:
            hidden = r.alignment_hidden(net.model, p["batch"], {"x": p["z"], "t": p["t"], "noise": p["noise"]})
            al = net.head(hidden, p["batch"]["feats"])
            rec, _ = generator_loss(p["d"]["x"], p["recon"], Posterior(p["mean"], p["logvar"]), disc.module,
                                    st.lpips, index, st.loss_cfg)
            ((rec + r.options.vae_align_weight * al) / WORLD).backward()
        for p in trained:
            p.requires_grad_(True)
        net.train()
        tr.run.default_step.optimizer_step(vae, index, update_scale=False)
        for p in per:
            dl, _ = discriminator_loss(p["d"]["x"], p["recon"], disc.module, index, st.loss_cfg)
            (dl / WORLD).backward()
        tr.run.default_step.optimizer_step(disc, index, update_scale=False)
        cat = lambda key: torch.cat([p[key] for p in per])  # noqa: E731
        batch = {"y": torch.cat([p["batch"]["y"] for p in per])}
        feats = [torch.cat([p["batch"]["feats"][0] for p in per])]
        draws = {"x": cat("z").detach(), "t": cat("t"), "noise": cat("noise"),
                 "drop": torch.cat([p["d"]["drop"] for p in per])}
        dn, al, _ = net(batch, draws, feats)
        (dn + tr.cfg.align.weight * al).backward()
        tr.run.default_step.optimizer_step(model, index)
    return tr


def test_two_ranks_match_one_process(tmp_path, cache):
    ref = _replay(tmp_path, cache, steps=2, **EPS)  # first: prepares the digits set in the shared cache, in one process
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    args = []
    for k, v in {**TINY, "data.cache_dir": cache, "train.out_dir": str(tmp_path), "train.run_name": "two",
                 "train.steps": 2, "train.parallel": "fsdp", **EPS}.items():
        args += [f"--{k}", str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(ROOT / "launch/train.py"), "--preset", "digits-repae-irepa", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    subprocess.run([sys.executable, "-m", "irepa.train.export", str(tmp_path / "two")], env=env, check=True,
                   capture_output=True, timeout=300, cwd=ROOT)
    got = _files(tmp_path / "two/export/checkpoints/step-0000002")

    def close(a: dict, b: dict, what: str):
        for k, v in b.items():
            if what == "disc" and ("running_" in k or "num_batches" in k):
                continue
            torch.testing.assert_close(a[k].float(), v.float(), atol=2e-5, rtol=1e-4, msg=lambda m: f"{what}.{k}: {m}")
    close(got["model.safetensors"], ref.run.parts["model"].module.state_dict(), "model")
    close(got["ema.safetensors"], ref.run.parts["model"].ema.state_dicts()[0], "ema")
    close(got["vae.safetensors"], ref.run.parts["vae"].module.state_dict(), "vae")
    close(got["disc.safetensors"], ref.run.parts["disc"].module.state_dict(), "disc")
    metrics = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


def test_sample_export_and_latent_only_training(tmp_path, cache):
    """A REPA-E run -> launch/sample.py (decoded by the run's own VAE) -> launch/export_vae.py ->
    prepare with the exported VAE (its EMA BatchNorm statistics become the fixed normalization)
    -> the plain SiT recipe trains on it."""
    import importlib.util

    import numpy as np

    from irepa.data import prepare
    from irepa.train.trainer import Trainer

    def launch(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    Trainer(_cfg(tmp_path, "e2e", cache, **{"train.steps": 2})).train()
    run = tmp_path / "e2e"
    npz = launch("sample").main(str(run), str(tmp_path / "samples"), num_samples=4, batch=4, method="euler", steps=2,
                                device="cpu")
    with np.load(npz) as z:
        assert z["arr_0"].shape == (4, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    out = launch("export_vae").main(str(run), str(tmp_path / "e2e-vae"))
    from safetensors.torch import load_file

    from irepa.train.export import export, load_for_inference
    ema = load_file(str(run / "checkpoints/step-0000002/ema.safetensors"))
    for src in (run, export(run)):  # the run, and its single-file export (python -m irepa.train.export)
        model, _ = load_for_inference(src)
        assert isinstance(model.pos_embed, torch.nn.Parameter) and torch.equal(model.pos_embed.detach(), ema["pos_embed"])
    stats = json.loads((Path(out) / "latent_stats.json").read_text())
    torch.testing.assert_close(torch.tensor(stats["mean"]).float(), ema["latent_norm.bn.running_mean"])
    torch.testing.assert_close(torch.tensor(stats["std"]).float() ** 2 - 1e-4, ema["latent_norm.bn.running_var"],
                               rtol=1e-4, atol=1e-6)
    data = prepare("digits", str(tmp_path / "latents"), resolution=32, vae=out, encoders=["hog-patch"], formats=("memmap",),
                   progress=False, device="cpu", batch_size=512)
    cfg = recipes.resolve("digits-sit-irepa", {"data.source": data, "data.resolution": 32, "model.input_size": 4,
                                               "model.in_channels": 4, "train.steps": 2, "train.batch_size": 8,
                                               "train.out_dir": str(tmp_path), "train.run_name": "ldm",
                                               "train.sample_steps": 2, "train.device": "cpu"})
    last = Trainer(cfg).train()
    assert last["step"] == 2 and np.isfinite(last["loss"])
    assert (tmp_path / "ldm/samples/step-0000002.png").is_file()


def test_runs_from_before_train_pos_embed_keep_the_fixed_table(tmp_path, cache):
    """A REPA-E run whose config.json predates repae.train_pos_embed trained the fixed table: it
    loads (sampling, export) with it; a resume that would train the table is refused with one
    line before the run folder is touched, and --repae.train_pos_embed false resumes it. A run
    that trains the table is not resumed with it fixed either."""
    from irepa.errors import InputError
    from irepa.train.export import load_for_inference, run_config
    from irepa.train.trainer import Trainer
    Trainer(_cfg(tmp_path, "old", cache, **{"train.steps": 1, "repae.train_pos_embed": False})).train()
    run = tmp_path / "old"
    stored = json.loads((run / "config.json").read_text())
    assert stored["repae"].pop("train_pos_embed") is False
    (run / "config.json").write_text(json.dumps(stored))  # as runs made before the option wrote it
    before = (run / "config.json").read_bytes()
    assert run_config(run / "checkpoints/step-0000001").repae.train_pos_embed is False
    model, _ = load_for_inference(run)
    assert "pos_embed" not in model.state_dict() and torch.equal(model.pos_embed, model.sincos_pos_embed())
    with pytest.raises(InputError, match="train_pos_embed"):
        Trainer(_cfg(tmp_path, "old", cache, **{"train.steps": 2}))
    assert (run / "config.json").read_bytes() == before
    assert Trainer(_cfg(tmp_path, "old", cache, **{"train.steps": 2, "repae.train_pos_embed": False})).step == 1
    (tmp_path / "new").mkdir()
    (tmp_path / "new/config.json").write_text(_cfg(tmp_path, "new", cache).to_json())
    with pytest.raises(InputError, match="train_pos_embed"):
        Trainer(_cfg(tmp_path, "new", cache, **{"repae.train_pos_embed": False}))
