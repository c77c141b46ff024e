"""Samplers on an analytic flow: Gaussian data, where the exact velocity is known.

Data x ~ N(m, s^2) per dimension, noise e ~ N(0, 1), x_t = (1 - t) x + t e. Then
E[e - x | x_t] = -m + (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2) * (x_t - (1 - t) m), so every
sampler should land on N(m, s^2) up to discretisation and Monte-Carlo error.
"""
import pytest
import torch

from irepa.sampling import (jit_interval, model_velocity_fn, sample, time_grid, velocity_from_x_prediction,
                            x_prediction_to_velocity)

M, S = 1.5, 0.5


def exact_velocity(x, t, y=None, m=M, s=S):
    a = (1 - t).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    tb = t.view_as(a).to(x.dtype)
    var = a * a * s * s + tb * tb
    return -m + (tb - a * s * s) / var * (x - a * m)


def exact_x_prediction(z, s_jit, y=None, m=M, s=S):
    """E[x | z] at JiT time s (s = 1 data): the posterior mean a JiT model regresses."""
    t = 1 - s_jit
    a = (1 - t).view(-1, *([1] * (z.dim() - 1)))
    tb = t.view_as(a)
    var = a * a * s * s + tb * tb
    return m + a * s * s / var * (z - a * m)


@pytest.mark.parametrize("method,steps", [("sde", 250), ("euler", 100), ("heun", 20)])
def test_samplers_reproduce_gaussian_data(method, steps):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, 2, 2, 2, generator=g)
    x = sample(exact_velocity, noise, None, method, steps, generator=torch.Generator().manual_seed(1))
    assert x.dtype == noise.dtype and x.shape == noise.shape
    assert abs(x.mean().item() - M) < 0.03
    assert abs(x.var().item() / S ** 2 - 1) < 0.06, x.var().item()


def test_sde_step_count_and_grid():
    calls = []

    def v(x, t, y):
        calls.append(t[0].item())
        return exact_velocity(x, t)
    sample(v, torch.randn(8, 1), None, "sde", 250)
    assert len(calls) == 250
    grid = time_grid("sde", 250)
    assert grid[0] == 1.0 and abs(grid[-2] - 0.04) < 1e-12 and grid[-1] == 0.0 and len(grid) == 251
    calls.clear()
    sample(v, torch.randn(8, 1), None, "heun", 10)
    assert len(calls) == 2 * 10 - 1  # no corrector on the last step


def test_jit_x_prediction_matches_velocity():
    z = torch.randn(64, 3)
    t = torch.rand(64) * 0.9 + 0.05
    v_ref = exact_velocity(z, t)
    v = x_prediction_to_velocity(exact_x_prediction(z, 1 - t), z, t, eps=0.05)
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-4)
    # the wrapper calls the model at JiT time s = 1 - t; Heun on it reproduces the data (a
    # small eps: JiT's 0.05 clamp deliberately damps the last step, t = 0.02 -> 0)
    x = sample(velocity_from_x_prediction(exact_x_prediction, eps=1e-4), torch.randn(4096, 4,
               generator=torch.Generator().manual_seed(2)), None, "heun", 50)
    assert abs(x.mean().item() - M) < 0.03 and abs(x.var().item() / S ** 2 - 1) < 0.06
    assert jit_interval(0.1, 1.0) == pytest.approx((0.0, 0.9))


def test_cfg_applied_only_inside_interval():
    null = 5
    seen = []

    def v(x, t, y):
        seen.append((t[0].item(), x.shape[0], (y == null).any().item()))
        return torch.where((y == null).view(-1, 1), torch.zeros_like(x), torch.ones_like(x)) * 1.0

    noise, labels = torch.zeros(3, 1), torch.tensor([0, 1, 2])
    steps, cfg, lo, hi = 10, 3.0, 0.3, 0.6
    x = sample(v, noise, labels, "euler", steps, cfg, (lo, hi), null_class=null)
    ts = time_grid("euler", steps)[:-1]
    assert len(seen) == steps
    for (t, b, has_null), t_grid in zip(seen, ts):
        inside = lo <= t_grid <= hi
        assert abs(t - t_grid) < 1e-6
        assert (b == 6 and has_null) == inside and (b == 3 and not has_null) == (not inside)
    # v_c = 1, v_u = 0: guided velocity cfg inside, 1 outside; dt = -0.1 each step
    n_in = sum(lo <= t <= hi for t in ts)
    expect = -0.1 * (n_in * cfg + (steps - n_in) * 1.0)
    torch.testing.assert_close(x, torch.full_like(x, expect), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="null_class"):
        sample(v, noise, labels, "euler", 2, cfg=2.0)


def test_model_velocity_fn_and_errors():
    class M2(torch.nn.Module):
        in_channels = 2

        def forward(self, x, t, y):
            return torch.cat([x, 7 + x], 1), None  # learned-sigma layout: 2C channels, a tuple
    f = model_velocity_fn(M2())
    out = f(torch.ones(1, 2, 1, 1), torch.ones(1), torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 2, 1, 1) and out.eq(1).all()
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample(exact_velocity, torch.randn(2, 1), None, "ddim", 10)
    with pytest.raises(ValueError, match="steps"):
        sample(exact_velocity, torch.randn(2, 1), None, "sde", 1)
