"""MeanFlow math (irepa.meanflow) against independent references.

References: central finite differences in float64 for du/dt; the closed-form average
velocity of the linear path for Gaussian data N(mu, s^2 I) (derived below) for the loss
and the samplers; the flow-matching MSE of irepa.transport for the r = t case; the
formulas of Gsunshine/meanflow meanflow.py@d70cb55 (sample_tr, guidance_fn, cond_drop,
solver_step) written out here for draws and guidance.
"""
import math

import pytest
import torch

from irepa import forward_ad
from irepa import meanflow as mf
from irepa import models, transport


def _two_time_sit(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = mf.attach_h_embedder(models.build("SiT-Tiny/2", input_size=8, in_channels=2, num_classes=5, **kw)).to(dtype)
    with torch.no_grad():  # break adaLN-Zero so every path carries signal
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


class GaussianAverageVelocity(torch.nn.Module):
    """The exact average velocity of the linear path for data x ~ N(mu, s^2 I), e ~ N(0, I).

    z_tau = (1 - tau) x + tau e is Gaussian with mean (1 - tau) mu and std
    sigma(tau) = sqrt((1 - tau)^2 s^2 + tau^2). The probability-flow ODE keeps
    xi = (z - (1 - tau) mu) / sigma(tau) fixed, so z_r = (1 - r) mu + sigma(r) xi and
        u(z, r, t) = (z_t - z_r) / (t - r) = -mu + (sigma_t - sigma_r) / (t - r) * xi,
        (sigma_t - sigma_r) / (t - r) = ((t + r) - s^2 (2 - t - r)) / (sigma_t + sigma_r),
    the last form smooth at r = t, where u is the marginal velocity v(z, t).
    Called like a two-time SiT (irepa.meanflow.average_velocity): its h_embedder passes h on as
    extra_cond, forward(z, t, y, drop_mask, extra_cond=h) -> (u, None).
    """

    null_class = 0

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    @staticmethod
    def h_embedder(h):
        return h

    def sigma(self, tau):
        return torch.sqrt((1 - tau) ** 2 * self.s ** 2 + tau ** 2)

    def forward(self, z, t, y, drop_mask=None, extra_cond=None):
        t, h = t.to(z.dtype), extra_cond.to(z.dtype)  # samplers pass fp32 times; the closed form is checked in float64
        r = t - h
        tb, rb = (a.view(-1, *([1] * (z.dim() - 1))) for a in (t, r))
        slope = ((tb + rb) - self.s ** 2 * (2 - tb - rb)) / (self.sigma(tb) + self.sigma(rb))
        return -self.mu + slope * (z - (1 - tb) * self.mu) / self.sigma(tb), None


def _draws(x, generator, s: mf.MeanFlowSettings, label_dropout: float = 0.1) -> dict:
    """The recipe's order (irepa.recipes.meanflow): label dropout (first_k of rand < p), then t, r, noise."""
    drop = mf.first_k(torch.rand(x.shape[0], generator=generator) < label_dropout) if label_dropout else None
    return {"drop": drop, **mf.draw_times_and_noise(x, generator, s)}


def _loss(model, x, y, d, s, null_class):
    return mf.loss(model, x, y, d["t"], d["r"], d["noise"], d["drop"], s, null_class)


def _gaussian_batch(B=64, shape=(2, 4, 4), s=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    x = mu + s * torch.randn(B, *shape, generator=g, dtype=torch.float64)
    return mu, x, g


# ---- draws -------------------------------------------------------------------------------

def test_t_r_draws_follow_the_recipe():
    B = 20000
    t, r = mf.sample_t_r(B, torch.Generator().manual_seed(1))
    n = int(0.75 * B)
    assert torch.equal(t[:n], r[:n]) and bool((r[n:] < t[n:]).all())
    assert bool(((t > 0) & (t < 1)).all())
    # t = max and r = min of two sigmoid(N(-0.4, 1)) draws: P(t <= sigmoid(-0.4)) = 1/4, P(r <= it) = 3/4
    med = torch.sigmoid(torch.tensor(-0.4))
    assert abs((t <= med).double().mean().item() - 0.25) < 0.015
    assert abs((r[n:] <= med).double().mean().item() - 0.75) < 0.03
    assert torch.equal(mf.sample_t_r(7, torch.Generator().manual_seed(1))[0],
                       mf.sample_t_r(7, torch.Generator().manual_seed(1))[0])


def test_label_dropout_takes_the_first_entries():
    drops = [mf.first_k(torch.rand(50, generator=torch.Generator().manual_seed(i)) < 0.1) for i in range(200)]
    for d in drops:
        k = int(d.sum())
        assert bool(d[:k].all()) and not bool(d[k:].any())
    assert abs(sum(int(d.sum()) for d in drops) / (200 * 50) - 0.1) < 0.02


def test_settings_validation():
    with pytest.raises(ValueError, match="kappa"):
        mf.MeanFlowSettings(kappa=1.0)
    with pytest.raises(ValueError, match="jvp must be one of"):
        mf.MeanFlowSettings(jvp="nope")
    with pytest.raises(ValueError, match="t_start"):
        mf.MeanFlowSettings(t_start=0.8, t_end=0.2)
    assert mf.MeanFlowSettings(omega=1.0, kappa=0.5).effective_scale == 2.0
    assert mf.MeanFlowSettings(omega=0.2, kappa=0.92).effective_scale == pytest.approx(2.5)


# ---- target -------------------------------------------------------------------------------

@pytest.mark.parametrize("jvp", ["split", "joint"])
def test_jvp_target_equals_finite_differences_float64(jvp):
    """u_tgt = v - (t - r) du/dt with du/dt along (v, 1, 0); du/dt by central differences,
    h = t - r moving with t; the error falls with the step as O(eps^2)."""
    m = _two_time_sit(torch.float64)
    g = torch.Generator().manual_seed(3)
    B = 4
    z, v = torch.randn(B, 2, 8, 8, generator=g, dtype=torch.float64), torch.randn(B, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.1
    r = t * torch.rand(B, generator=g, dtype=torch.float64)
    r[0] = t[0]  # one r = t entry: the target is v there
    y = torch.randint(0, 5, (B,), generator=g)
    s = mf.MeanFlowSettings(jvp=jvp)
    u, hidden, u_tgt = mf.average_velocity_and_target(m, z, t, r, y, None, v, s)

    def f(zz, tt):
        return mf.average_velocity(m, zz, tt, tt - r, y)[0]

    errs = []
    for eps in (1e-3, 1e-5):
        dudt_fd = (f(z + eps * v, t + eps) - f(z - eps * v, t - eps)) / (2 * eps)
        tgt_fd = v - (t - r).view(-1, 1, 1, 1) * dudt_fd
        errs.append((u_tgt - tgt_fd).abs().max().item())
    assert errs[1] < 1e-9 and errs[1] < errs[0] / 1000
    torch.testing.assert_close(u_tgt[0], v[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(u, f(z, t), rtol=1e-12, atol=1e-12)
    assert u.requires_grad and hidden.requires_grad and not u_tgt.requires_grad


def test_split_and_joint_give_the_same_loss_hidden_and_gradients():
    """Same math, two schedules of the JVP; the joint hidden state comes through has_aux with its gradient."""
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    grads, outs = [], []
    for jvp in ("split", "joint"):
        m = _two_time_sit(torch.float64)
        s = mf.MeanFlowSettings(jvp=jvp, omega=1.0, kappa=0.5)
        d = _draws(x, torch.Generator().manual_seed(5), s)
        loss, hidden, extras = _loss(m, x, y, d, s, m.null_class)
        (loss + hidden.square().mean()).backward()
        outs.append((loss.detach(), hidden.detach(), extras["mf_mse"]))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)


def test_gaussian_exact_average_velocity_has_zero_loss():
    """The closed-form u with the marginal velocity as tangent: u_tgt = u within float64 rounding."""
    mu, x, g = _gaussian_batch()
    model = GaussianAverageVelocity(mu, 0.5)
    B = x.shape[0]
    t, r = mf.sample_t_r(B, g, data_proportion=0.25)
    t, r = t.double(), r.double()
    e = torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    v_marginal = mf.average_velocity(model, z, t, torch.zeros_like(t), None)[0]
    for jvp in ("split", "joint"):
        u, _, u_tgt = mf.average_velocity_and_target(model, z, t, r, None, None, v_marginal,
                                                     mf.MeanFlowSettings(jvp=jvp))
        loss, per = mf.adaptive_loss(u, u_tgt)
        assert per.max().item() < 1e-24 and loss.item() < 1e-22
    # a wrong model (u of N(mu, (1.1 s)^2)) is not a zero of the loss
    wrong = GaussianAverageVelocity(mu, 0.55)
    u, _, u_tgt = mf.average_velocity_and_target(wrong, z, t, r, None, None, v_marginal, mf.MeanFlowSettings())
    assert mf.adaptive_loss(u, u_tgt)[1].mean() > 1e-4


def test_gaussian_training_target_is_unbiased():
    """With the per-sample velocity v = e - x the target is affine in v, so its mean over the
    posterior x | z_t (Monte Carlo here) is the marginal target, u itself."""
    mu, _, g = _gaussian_batch(B=1)
    s = 0.5
    model = GaussianAverageVelocity(mu, s)
    K = 4000
    t = torch.full((K,), 0.7, dtype=torch.float64)
    r = torch.full((K,), 0.2, dtype=torch.float64)
    z0 = (0.3 * mu + 0.7 * torch.randn(mu.shape, generator=g, dtype=torch.float64))
    z = z0.expand(K, *mu.shape).clone()
    a, b = 0.3, 0.7
    var = a ** 2 * s ** 2 + b ** 2
    post_mean = mu + a * s ** 2 / var * (z0 - a * mu)
    x = post_mean + s * b / math.sqrt(var) * torch.randn(K, *mu.shape, generator=g, dtype=torch.float64)
    v = (z - a * x) / b - x
    u, _, u_tgt = mf.average_velocity_and_target(model, z, t, r, None, None, v, mf.MeanFlowSettings())
    spread = u_tgt.std(0)
    assert ((u_tgt.mean(0) - u[0]).abs() < 5 * spread / math.sqrt(K)).all()
    assert spread.min() > 0.1  # a real per-sample spread, not a degenerate check


def test_point_mass_data_full_loss_is_zero():
    """s = 0: the per-sample velocity is the marginal one, so the whole `loss` (draws, label
    dropout, guidance with omega = 1) is zero for the exact u."""
    mu, _, _ = _gaussian_batch(B=1)
    model = GaussianAverageVelocity(mu, 0.0)
    x = mu.expand(32, *mu.shape).clone()
    s = mf.MeanFlowSettings(data_proportion=0.5)
    d = _draws(x, torch.Generator().manual_seed(2), s)
    loss, _, extras = _loss(model, x, torch.zeros(32, dtype=torch.long), d, s, 0)
    assert loss.item() < 1e-20 and extras["mf_mse"].item() < 1e-22


def test_r_equal_t_reduces_to_flow_matching():
    """All r = t and p = 0: the loss is the flow-matching MSE (summed per sample) of the net
    at h = 0, with the same gradients; the JVP term is multiplied by t - r = 0."""
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    s = mf.MeanFlowSettings(data_proportion=1.0, norm_p=0.0)
    m1, m2 = _two_time_sit(torch.float64), _two_time_sit(torch.float64)
    d = _draws(x, torch.Generator().manual_seed(4), s, label_dropout=0.0)
    assert torch.equal(d["t"], d["r"])
    loss, _, _ = _loss(m1, x, y, d, s, m1.null_class)
    t = d["t"].double()
    z = transport.interpolate(x, d["noise"], t)
    # transport.denoising_loss (the SiT objective's MSE over every element), kept in float64 here
    pred = mf.average_velocity(m2, z, t, torch.zeros_like(t), y)[0]
    fm = (pred - transport.velocity_target(x, d["noise"])).pow(2).mean()
    torch.testing.assert_close(loss, fm * x[0].numel(), rtol=1e-12, atol=0)
    loss.backward()
    (fm * x[0].numel()).backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-9, atol=1e-12)


def test_adaptive_weight():
    u, tgt = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    loss, per = mf.adaptive_loss(u, tgt, norm_p=1.0, norm_eps=0.01)
    L = (u - tgt).pow(2).sum((1, 2, 3))
    torch.testing.assert_close(per, L)
    torch.testing.assert_close(loss, (L / (L + 0.01)).mean())
    u.requires_grad_(True)
    l2, _ = mf.adaptive_loss(u, tgt, norm_p=0.5)
    (gu,) = torch.autograd.grad(l2, u)
    # the weight is a constant: d/du of L / sg(L + c)^p = 2 (u - tgt) / (L + c)^p / B
    expect = 2 * (u - tgt) / (L + 0.01).pow(0.5).view(-1, 1, 1, 1) / 3
    torch.testing.assert_close(gu, expect.detach())


# ---- guidance ------------------------------------------------------------------------------

@pytest.mark.parametrize("omega,kappa,lo,hi", [(1.0, 0.5, 0.0, 1.0), (2.0, 0.0, 0.0, 1.0), (0.2, 0.92, 0.0, 0.75)])
def test_guided_target_velocity(omega, kappa, lo, hi):
    m = _two_time_sit(torch.float64)
    B = 8
    z, v = torch.randn(B, 2, 8, 8, dtype=torch.float64), torch.randn(B, 2, 8, 8, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, B, dtype=torch.float64)
    y = torch.randint(0, 5, (B,))
    s = mf.MeanFlowSettings(omega=omega, kappa=kappa, t_start=lo, t_end=hi)
    v_g = mf.guided_target_velocity(m, z, t, y, v, m.null_class, s)
    zero = torch.zeros_like(t)
    v_c = mf.average_velocity(m, z, t, zero, y)[0]
    v_u = mf.average_velocity(m, z, t, zero, torch.full_like(y, m.null_class))[0]
    for i in range(B):
        if lo <= t[i] <= hi:
            expect = omega * v[i] + (1 - omega - kappa) * v_u[i] + kappa * v_c[i]
            if kappa == 0:
                torch.testing.assert_close(expect, v_u[i] + omega * (v[i] - v_u[i]))
        else:
            expect = v[i]
        torch.testing.assert_close(v_g[i], expect, rtol=1e-10, atol=1e-10)


def test_dropped_samples_get_null_label_and_unguided_target(monkeypatch):
    m = _two_time_sit(torch.float64)
    x = torch.randn(10, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (10,))
    s = mf.MeanFlowSettings(omega=1.0, kappa=0.5)
    d = _draws(x, torch.Generator().manual_seed(0), s)
    d["drop"] = torch.arange(10) < 3
    seen = {}
    real = mf.average_velocity_and_target

    def spy(model, z, t, r, yy, drop, v_g, st, jvp_fn=None):
        seen.update(v_g=v_g, drop=drop, z=z)
        return real(model, z, t, r, yy, drop, v_g, st, jvp_fn)
    monkeypatch.setattr(mf, "average_velocity_and_target", spy)
    _loss(m, x, y, d, s, m.null_class)
    v = d["noise"] - x
    torch.testing.assert_close(seen["v_g"][:3], v[:3])
    assert not torch.allclose(seen["v_g"][3:], v[3:])
    assert torch.equal(seen["drop"], d["drop"])
    with pytest.raises(ValueError, match="null class"):
        mf.guided_target_velocity(m, seen["z"], d["t"], y, v, None, s)


# ---- sampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4])
def test_sampler_lands_on_gaussian_data(steps):
    """The exact average velocity maps noise e to mu + s e in any number of steps: the
    samples have the data's moments and each one is exactly that map."""
    mu, _, g = _gaussian_batch(B=1, shape=(3, 4, 4))
    s = 0.5
    model = GaussianAverageVelocity(mu, s)
    noise = torch.randn(4000, 3, 4, 4, generator=g, dtype=torch.float64)
    out = mf.sample(model, noise, None, steps=steps)
    torch.testing.assert_close(out, mu + s * noise, rtol=1e-10, atol=1e-10)
    n = noise.shape[0]
    assert (out.mean(0) - mu).abs().max() < 5 * s / math.sqrt(n)
    assert (out.std(0) - s).abs().max() < 5 * s / math.sqrt(2 * n)


def test_sampler_steps_and_times():
    calls = []

    class Rec(torch.nn.Module):
        h_embedder = staticmethod(lambda h: h)

        def forward(self, z, t, y, drop_mask=None, extra_cond=None):
            calls.append((t[0].item(), extra_cond[0].item()))
            return torch.ones_like(z), None

    out = mf.sample(Rec(), torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), steps=4)
    assert [round(c[0], 6) for c in calls] == [1.0, 0.75, 0.5, 0.25] and all(abs(c[1] - 0.25) < 1e-7 for c in calls)
    torch.testing.assert_close(out, -torch.ones(2, 1, 2, 2))
    assert mf.time_grid(1) == [1.0, 0.0]
    assert mf.time_grid(3, times=[1.0, 0.6, 0.0]) == [1.0, 0.6, 0.0]
    with pytest.raises(ValueError, match="decrease strictly"):
        mf.time_grid(2, times=[1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="steps >= 1"):
        mf.time_grid(0)


def test_h_embedder_conditioning_and_plain_state_dict():
    """MeanFlow's SiT (Gsunshine/meanflow models/models_dit.py@d70cb55, DiT): c = t_emb(t)
    + y_emb(y) + h_emb(h), a second timestep embedder initialized N(0, 0.02) like t_embedder;
    the plain SiT's keys are untouched."""
    torch.manual_seed(0)
    plain = models.build("SiT-Tiny/2", input_size=8, in_channels=4, num_classes=10)
    m = mf.attach_h_embedder(models.build("SiT-Tiny/2", input_size=8, in_channels=4, num_classes=10))
    extra = set(m.state_dict()) - set(plain.state_dict())
    assert extra == {"h_embedder.mlp.0.weight", "h_embedder.mlp.0.bias", "h_embedder.mlp.2.weight",
                     "h_embedder.mlp.2.bias"}
    for i in (0, 2):
        assert abs(m.h_embedder.mlp[i].weight.std().item() - 0.02) < 0.003
        assert torch.count_nonzero(m.h_embedder.mlp[i].bias) == 0
    missing, unexpected = m.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(extra) and not unexpected
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, y, h = torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.4]), torch.tensor([1, 2]), torch.tensor([0.5, 0.0])
    _, hidden = mf.average_velocity(m, x, t, h, y)
    tok = m.x_embedder(x).flatten(2).transpose(1, 2) + m.pos_embed
    c = m.t_embedder(t) + m.h_embedder(h) + m.y_embedder(y)
    assert torch.allclose(hidden, m.blocks[0](tok, c), atol=1e-6)
    assert not torch.allclose(mf.average_velocity(m, x, t, h, y)[0], mf.average_velocity(m, x, t, 0 * h, y)[0])


def test_two_time_sit_one_step_sample_calls_h_one():
    m = _two_time_sit()
    noise = torch.randn(3, 2, 8, 8)
    y = torch.tensor([0, 1, 2])
    out = mf.sample(m, noise, y, steps=1)
    ref = noise - mf.average_velocity(m, noise, torch.ones(3), torch.ones(3), y)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_jvp_through_compiled_blocks_uses_their_eager_forward():
    """An eager torch.func.jvp cannot enter a compiled function (pytorch#128711); the JVP runs
    the blocks' eager forward and the compiled forward is back afterwards."""
    m = _two_time_sit()
    x = torch.randn(3, 2, 8, 8)
    t, r, y, v = torch.full((3,), 0.8), torch.full((3,), 0.3), torch.tensor([0, 1, 2]), torch.randn(3, 2, 8, 8)
    ref = mf.jvp_call(m, x, t, r, y, None, v, False)
    for blk in m.blocks:
        blk.forward = torch.compile(blk.forward, backend="aot_eager", fullgraph=True)
    compiled = [blk.forward for blk in m.blocks]
    with pytest.raises(Exception, match="functorch"):  # what the eager-forward swap avoids
        with forward_ad.jvp_mode():
            torch.func.jvp(lambda a: mf.average_velocity(m, a, t, t - r, y)[0], (x,), (v,))
    out = mf.jvp_call(m, x, t, r, y, None, v, False)
    torch.testing.assert_close(out[1], ref[1])
    assert [blk.forward for blk in m.blocks] == compiled
