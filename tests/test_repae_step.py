"""REPA-E's end-to-end step, the latent BatchNorm and the EMA of buffers.

Compared against: nn.BatchNorm2d(affine=False, eps=1e-4, momentum=0.1) (the reference's
layer), REPA-E's EMA formula written out (d * ema + (1 - d) * x for float buffers, copy
for integer ones), and gradients recomputed independently with torch.autograd.grad from
the loss terms the reference puts in each update.
"""
from __future__ import annotations

import copy

import pytest
import torch

from irepa import recipes, transport
from irepa.align import AlignmentHead
from irepa.autoencoder.losses import generator_loss
from irepa.autoencoder.sdvae import Posterior
from irepa.models.latent_norm import LatentNorm
from irepa.train.build import AlignedDiffusion
from irepa.train.ema import EMA
from irepa.train.loss_scale import LossScaler
from irepa.train.step import Part, TrainStep

B, RES, E = 4, 32, 16


def test_latent_norm_matches_batchnorm_train_and_eval():
    torch.manual_seed(0)
    ours, ref = LatentNorm(4), torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    scale, bias = torch.tensor([0.5, 2.0, 1.0, 0.25]), torch.tensor([0.1, -0.2, 0.3, 1.0])
    ours.init_from_stats(scale, bias)
    ref.running_mean.copy_(bias)
    ref.running_var.copy_((1 / scale) ** 2)
    z = torch.randn(6, 4, 5, 5) * 3 + 1
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        torch.testing.assert_close(ours(z), ref(z))
        torch.testing.assert_close(ours.bn.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.bn.running_var, ref.running_var)
        assert ours.bn.num_batches_tracked.item() == ref.num_batches_tracked.item()
    s, b = ours.stats()
    torch.testing.assert_close(s, ref.running_var.rsqrt())
    torch.testing.assert_close(b, ref.running_mean)
    x = ours.eval()(z)  # eval normalizes with sqrt(var + eps); decoding uses var^-1/2 (no eps), as the reference
    torch.testing.assert_close(ours.denormalize(x), z, rtol=1e-3, atol=1e-3)
    assert ours.state_dict().keys() == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    with pytest.raises(ValueError, match="channels"):
        ours.init_from_stats(torch.ones(3), torch.zeros(3))


def test_ema_averages_float_buffers_and_copies_counters():
    """REPA-E's update_ema: float buffers (BatchNorm running stats) averaged, integer ones copied."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), LatentNorm(3))
    ema = EMA(m, [0.9])
    e0 = {k: v.clone() for k, v in ema.models[0].state_dict().items()}
    m[1].train()(torch.randn(8, 3, 2, 2))
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ema.update(m)
    sd, new = ema.models[0].state_dict(), m.state_dict()
    for k in ("1.bn.running_mean", "1.bn.running_var", "0.weight"):
        torch.testing.assert_close(sd[k], 0.9 * e0[k] + 0.1 * new[k])
    assert sd["1.bn.num_batches_tracked"].item() == 1


TINY = {"model.input_size": 4, "data.resolution": 32, "repae.vae": "tiny", "train.batch_size": B,
        "train.device": "cpu", "train.precision": "fp32"}


def _step(seed=0, lr_vae=1e-2, lr_sit=1e-2, lr_disc=1e-2, sgd=False, clip=1.0, **over):
    """A REPA-E step with plain parts (one process), built the way the trainer builds them."""
    cfg = recipes.resolve("digits-repae-irepa", {**TINY, "optim.grad_clip": clip, **over})
    r = recipes.for_config(cfg)
    torch.manual_seed(seed)
    model = r.build_model(fused=False)
    model.latent_norm.init_from_stats(torch.full((4,), 2.0), torch.zeros(4))
    net = AlignedDiffusion(model, AlignmentHead(model.dim, [E], "conv", 0.6), r)
    opt = (lambda ps, lr: torch.optim.SGD(ps, lr=lr)) if sgd else (lambda ps, lr: torch.optim.AdamW(ps, lr=lr))
    parts = {"model": Part(net, net, opt(list(net.parameters()), lr_sit), list(net.parameters()), lr_sit,
                           EMA(model, [0.9]), model, clip)}
    for name, spec in r.extra_parts(torch.device("cpu")).items():
        ps = list(spec.module.parameters())
        lr = lr_vae if name == "vae" else lr_disc
        parts[name] = Part(spec.module, spec.module, opt(ps, lr), ps, lr, None, None, clip)
    st = TrainStep(r, parts, features=lambda b: b["feats"], micro_batch=B, amp_dtype=None, scaler=LossScaler(False),
                   align_weight=cfg.align.weight, warmup_steps=0, seed=0, rank=0, device=torch.device("cpu"))
    return r.make_step(st)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(B, 3, RES, RES, generator=g) * 2 - 1, "y": torch.randint(0, 10, (B,), generator=g),
            "feats": [torch.randn(B, 4, E, generator=g)]}


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _replay_vae_and_draws(ref, batch, index):
    """The draws and pre-update VAE outputs of step `index`, remade from a copy of the step."""
    g = ref.step.generator(index)
    d = ref.recipe.draw_data(batch, g)
    mean, logvar, z, recon = ref.vae.module(d["x"], g)
    t = transport.sample_time(B, generator=g)
    noise = torch.randn(z.shape, generator=g)
    return d, mean, logvar, z, recon, t, noise


def _sit_gradients(fresh, batch, d, z, t, noise):
    """Gradients of the SiT update's loss (denoise + 0.5 align on the detached latent) w.r.t. every
    parameter of `fresh` (the SiT + head as they were before the step), in parameter order."""
    draws = {"x": z.detach(), "t": t, "noise": noise, "drop": d["drop"]}
    dn, al, _ = fresh(batch, draws, batch["feats"])
    return torch.autograd.grad(dn + 0.5 * al, list(fresh.parameters()))


def test_step_routes_gradients_as_the_reference():
    """SGD(lr=1), no clipping: each part's update is minus the gradient of exactly its loss.
    VAE: L_rec + 1.5 * align through the frozen eval-mode SiT (no diffusion term);
    SiT: denoise + 0.5 * align on the detached latent of the pre-update VAE."""
    st = _step(sgd=True, lr_vae=1.0, lr_sit=1.0, clip=None)
    ref = copy.deepcopy(st)
    fresh = copy.deepcopy(st.model.module)
    batch = _batch()
    vae0, sit0 = _params(st.vae.module), _params(st.model.module)
    st(batch, 1)  # index 1: no statistics estimate (that is index 0 only)
    d, mean, logvar, z, recon, t, noise = _replay_vae_and_draws(ref, batch, 1)
    net = ref.model.module.eval()
    xn = net.model.latent_norm(z)
    _, hidden = net.model(transport.interpolate(xn, noise, t), t, batch["y"], None)
    align_v = net.head(hidden, batch["feats"])
    rec, _ = generator_loss(d["x"], recon, Posterior(mean, logvar), ref.disc.module, ref.lpips, 1, ref.loss_cfg)
    vae_ps = list(ref.vae.module.parameters())
    g_vae = torch.autograd.grad(rec + 1.5 * align_v, vae_ps, retain_graph=True)
    for p0, p1, gr in zip(vae0, st.vae.module.parameters(), g_vae):
        torch.testing.assert_close(p1.detach(), p0 - gr, rtol=1e-4, atol=1e-6)
    # the checks could fail: the alignment term moves the VAE (its encoder), and a diffusion
    # term would move it too were z not detached
    g_align = torch.autograd.grad(align_v, vae_ps, retain_graph=True, allow_unused=True)
    assert sum(gr.abs().sum() for gr in g_align if gr is not None) > 0
    net.train()
    draws = {"x": z, "t": t, "noise": noise, "drop": d["drop"]}
    d_live, _, _ = net(batch, draws, batch["feats"])
    g_diff = torch.autograd.grad(d_live, vae_ps, retain_graph=True, allow_unused=True)
    assert sum(gr.abs().sum() for gr in g_diff if gr is not None) > 0
    # SiT: its update is the gradient of denoise + 0.5 align at the initial weights and BN stats
    g_sit = _sit_gradients(fresh, batch, d, z, t, noise)
    for p0, p1, gr in zip(sit0, st.model.module.parameters(), g_sit):
        torch.testing.assert_close(p1.detach(), p0 - gr, rtol=1e-4, atol=1e-6)


def test_pos_embed_is_trained_as_the_release_by_default():
    """The release's train_repae.py@3ad8046 re-enables requires_grad on every SiT parameter before
    the SiT update, its sin-cos pos_embed (a requires_grad=False Parameter) included: AdamW, the
    clip and the EMA all take it. repae.train_pos_embed false keeps the fixed buffer; the other
    recipes always do (REPA's and iREPA's train.py never re-enable it)."""
    batch = _batch()
    st = _step(lr_sit=1e-4)
    m = st.model.module.model
    table = m.sincos_pos_embed()
    assert isinstance(m.pos_embed, torch.nn.Parameter) and torch.equal(m.pos_embed.detach(), table)
    assert any(p is m.pos_embed for p in st.model.params)
    assert "pos_embed" in m.state_dict() and "pos_embed" in st.model.ema.models[0].state_dict()
    st(batch, 1)
    moved = (m.pos_embed.detach() - table).abs()
    assert float(moved.max()) == pytest.approx(1e-4, rel=0.02)  # AdamW's first step: lr x sign(grad)
    torch.testing.assert_close(st.model.ema.models[0].pos_embed, table + 0.1 * (m.pos_embed.detach() - table))

    fixed = _step(lr_sit=1e-4, **{"repae.train_pos_embed": False})
    f = fixed.model.module.model
    fixed(batch, 1)
    assert not isinstance(f.pos_embed, torch.nn.Parameter) and torch.equal(f.pos_embed, table)
    assert "pos_embed" not in f.state_dict()
    for preset in ("digits-sit-irepa", "digits-meanflow-irepa"):
        other = recipes.for_config(recipes.resolve(preset)).build_model(fused=False)
        assert "pos_embed" not in dict(other.named_parameters()), preset


def test_sit_clip_factor_includes_pos_embed():
    """SGD(lr=1) with the SiT's grad norm clipped to 1e-3: every SiT weight, pos_embed included,
    moves by -g * 1e-3 / (||g|| + 1e-6) with ||g|| the norm over all its gradients, pos_embed's
    included, as the release's clip_grad_norm_(model.parameters()) computes it."""
    clip = 1e-3
    st = _step(sgd=True, lr_vae=0.0, lr_sit=1.0, clip=clip)
    ref, fresh = copy.deepcopy(st), copy.deepcopy(st.model.module)
    batch = _batch()
    sit0 = _params(st.model.module)
    out = st(batch, 1)
    d, _, _, z, _, t, noise = _replay_vae_and_draws(ref, batch, 1)
    g_sit = _sit_gradients(fresh, batch, d, z, t, noise)
    names = [n for n, _ in fresh.named_parameters()]
    total = torch.cat([g.double().flatten() for g in g_sit]).norm()
    without = torch.cat([g.double().flatten() for n, g in zip(names, g_sit) if n != "model.pos_embed"]).norm()
    assert float(total / without - 1) > 1e-5  # pos_embed's share of the norm is visible at this precision
    assert float(out["grad_norm"]) == pytest.approx(float(total), rel=2e-6)
    coef = clip / (float(out["grad_norm"]) + 1e-6)
    for n, p0, p1, gr in zip(names, sit0, st.model.module.parameters(), g_sit):
        torch.testing.assert_close(p1.detach(), p0 - coef * gr, rtol=1e-5, atol=1e-9, msg=lambda m: f"{n}: {m}")


def test_parts_do_not_touch_each_other():
    """VAE lr 0: the VAE ends the step unchanged and without gradients (the SiT pass leaks
    none); SiT lr 0: the SiT weights are unchanged by the VAE update. The SiT update is the
    same whether or not the VAE stepped before it."""
    batch = _batch()
    a = _step(lr_vae=0.0)
    vae0 = _params(a.vae.module)
    a(batch, 1)
    assert all(torch.equal(p0, p1) for p0, p1 in zip(vae0, a.vae.module.parameters()))
    assert all(p.grad is None for p in a.vae.module.parameters())
    b = _step(lr_sit=0.0)
    sit0, vae0 = _params(b.model.module), _params(b.vae.module)
    b(batch, 1)
    assert all(torch.equal(p0, p1) for p0, p1 in zip(sit0, b.model.module.parameters()))
    assert not all(torch.equal(p0, p1) for p0, p1 in zip(vae0, b.vae.module.parameters()))
    c = _step()
    c(batch, 1)
    for pa, pc in zip(a.model.module.parameters(), c.model.module.parameters()):
        assert torch.equal(pa, pc)


def test_same_draws_and_modes_in_both_passes():
    seen = {}
    st = _step()
    st.observer = lambda name, **kw: seen.__setitem__(name, kw)
    out = st(_batch(), 0)  # index 0: the latent BatchNorm (and its EMA) start from this batch (latent_stats=estimate)
    v, s = seen["vae_pass"], seen["sit_pass"]
    assert torch.equal(v["t"], s["t"]) and torch.equal(v["noise"], s["noise"])
    assert v["training"] is False and v["frozen"] is True
    assert s["training"] is True and s["frozen"] is False
    assert all(torch.isfinite(val).all() for val in out.values())
    bn = st.model.module.model.latent_norm.bn
    assert bn.num_batches_tracked.item() == 1  # only the SiT pass updates the BatchNorm statistics
    ema_bn = st.model.ema.models[0].latent_norm.bn
    assert not torch.allclose(ema_bn.running_var, torch.full((4,), 0.25))  # estimated from the batch


def test_latent_stats_file_initialises_model_and_ema_at_step_0(tmp_path):
    """REPA-E's init_bn from <vae>-latents-stats.pt: running_mean = bias, running_var = scale^-2."""
    torch.save({"latents_scale": torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1),
                "latents_bias": torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)}, tmp_path / "x-latents-stats.pt")
    st = _step(**{"repae.latent_stats": str(tmp_path / "x-latents-stats.pt")})
    seen = {}
    st.observer = lambda name, **kw: seen.setdefault(name, (st.model.module.model.latent_norm.bn.running_var.clone(),
                                                            st.model.ema.models[0].latent_norm.bn.running_var.clone()))
    st(_batch(), 0)
    want = torch.tensor([4.0, 1.0, 0.25, 0.0625])
    torch.testing.assert_close(seen["vae_pass"][0], want)  # set before the VAE's pass, which uses them
    torch.testing.assert_close(seen["vae_pass"][1], want)
    with pytest.raises(FileNotFoundError, match="nothere"):
        _step(**{"repae.latent_stats": str(tmp_path / "nothere.pt")})


_WORKER = """
import sys, torch, torch.distributed as dist
from irepa.models.latent_norm import LatentNorm
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
z = torch.randn(8, 4, 3, 3) * 2 + 0.5
ln = LatentNorm(4).train()
part = z[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
out = ln(part)
(out * torch.arange(out.numel()).view_as(out).float()).sum().backward()
torch.save((out.detach(), part.grad, ln.bn.running_mean, ln.bn.running_var), sys.argv[1] + f"/r{rank}.pt")
dist.destroy_process_group()
"""


def test_latent_norm_two_ranks_equals_one_batch(tmp_path):
    """2 gloo ranks with half the batch each = nn.BatchNorm2d on the whole batch: outputs,
    running statistics and input gradients (what SyncBatchNorm does on GPUs)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    (tmp_path / "w.py").write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "w.py"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    z = (torch.randn(8, 4, 3, 3) * 2 + 0.5).requires_grad_(True)
    ref = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    out = ref(z)
    w = torch.cat([torch.arange(4 * 4 * 9).view(4, 4, 3, 3).float()] * 2)
    (out * w).sum().backward()
    torch.testing.assert_close(torch.cat([r[0] for r in res]), out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[1] for r in res]), z.grad, rtol=1e-4, atol=1e-5)
    for r in res:
        torch.testing.assert_close(r[2], ref.running_mean)
        torch.testing.assert_close(r[3], ref.running_var)
