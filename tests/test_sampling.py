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


def test_cfg_below_one_guides_only_under_the_jit_rule():
    """SiT release: guided only when cfg_scale > 1.0 (ldm/samplers.py@99ad4ac), so cfg 0.5 is
    unguided; JiT release: guided whenever cfg != 1 (jit/denoiser.py@99ad4ac)."""
    null = 5

    def v(x, t, y):
        return torch.where((y == null).view(-1, 1), torch.zeros_like(x), torch.ones_like(x)) * 1.0

    noise, labels = torch.zeros(2, 1), torch.tensor([0, 1])
    sit = sample(v, noise, labels, "euler", 4, 0.5, (0.0, 1.0), null_class=null, interval_rule="sit")
    jit = sample(v, noise, labels, "euler", 4, 0.5, (0.0, 1.0), null_class=null, interval_rule="jit")
    torch.testing.assert_close(sit, torch.full_like(sit, -1.0))  # v = 1 over t 1 -> 0
    torch.testing.assert_close(jit, torch.full_like(jit, -0.5))  # 0 + 0.5 (1 - 0) inside the whole interval


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


# ---------------------------------------------------------------------------- CFG interval rules
# The expected call sequences below were derived by hand from the releases' control flow and
# checked against the release code itself, run side by side outside this project
# (End2End-Diffusion/iREPA@99ad4ac, 7080 grids x intervals x methods, all equal).

G, U = True, False  # guided (a doubled batch with null labels) / unguided model call


def _record_calls(method, steps, interval, rule, jit=False, null=7):
    """[(time, guided?)] of every model call `sample` makes; JiT models are called at s = 1 - t."""
    calls = []

    def model(x, t, y):
        calls.append((round(float(t[0]), 6), bool((y == null).any())))
        return torch.zeros_like(x)

    fn = velocity_from_x_prediction(model, eps=0.05) if jit else model  # JiT's clamp (irepa.recipes.jit)
    sample(fn, torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]), method, steps, 2.0, interval, null_class=null,
           interval_rule=rule)
    return calls


@pytest.mark.parametrize("interval,want", [
    ((0.5, 1.0), [(1.0, G), (0.8, G), (0.8, G), (0.6, G), (0.6, G), (0.4, G), (0.4, U), (0.2, U), (0.2, U)]),
    ((0.0, 0.6), [(1.0, U), (0.8, U), (0.8, U), (0.6, U), (0.6, G), (0.4, G), (0.4, G), (0.2, G), (0.2, G)]),
])
def test_sit_heun_corrector_follows_the_guidance_decided_at_t_cur(interval, want):
    """ldm/samplers.py@99ad4ac, euler_sampler(heun=True): CFG is on when low <= t_cur <= high
    (closed, float64) and the corrector, though it calls the model at t_next, is guided or
    not as its step's t_cur decided: with [0.5, 1] the step 0.6 -> 0.4 guides its corrector
    at 0.4; with [0, 0.6] the step 0.8 -> 0.6 leaves its corrector at 0.6 unguided.
    Grid linspace(1, 0, 6) = 1, .8, .6, .4, .2, 0; Heun skips the corrector of the last step."""
    assert _record_calls("heun", 5, interval, "sit") == want


def test_sit_rule_is_closed_on_the_float64_grid():
    """euler_sampler@99ad4ac compares float64 t_cur with the bounds: linspace(1, 0, 11) holds
    0.7 and 0.30000000000000004, both inside [0.3, 0.7]; the SDE decides at t_cur too."""
    want = [(t, 0.3 <= t <= 0.7) for t in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)]
    assert _record_calls("euler", 10, (0.3, 0.7), "sit") == want
    assert [g for _, g in want] == [U, U, U, G, G, G, G, G, U, U]
    sde = _record_calls("sde", 6, (0.3, 0.7), "sit")  # linspace(1, 0.04, 6): 1, .808, .616, .424, .232, .04
    assert [g for _, g in sde] == [U, U, G, G, U, U]


@pytest.mark.parametrize("method,steps,jit_interval_,want", [
    # open at both ends: s = 0.4 (low) and s = 0.8 (high) are unguided; the corrector decides at its own s
    ("heun", 5, (0.4, 0.8), [(0.0, U), (0.2, U), (0.2, U), (0.4, U), (0.4, U), (0.6, G), (0.6, G), (0.8, U),
                             (0.8, U)]),
    # low = 0 is special: guidance reaches s = 0
    ("euler", 5, (0.0, 0.5), [(0.0, G), (0.2, G), (0.4, G), (0.6, U), (0.8, U)]),
    ("euler", 5, (0.2, 0.5), [(0.0, U), (0.2, U), (0.4, G), (0.6, U), (0.8, U)]),
    # the release's float32 grid: linspace(0, 1, 4)[2] = 0.66666663 < float32(2/3) = 0.66666669, so guided
    ("euler", 3, (0.0, 2 / 3), [(0.0, G), (0.333333, G), (0.666667, G)]),
    ("heun", 3, (1 / 3, 1.0), [(0.0, U), (0.333333, U), (0.333333, U), (0.666667, G), (0.666667, G)]),
])
def test_jit_rule_follows_the_jit_release(method, steps, jit_interval_, want):
    """jit/denoiser.py@99ad4ac, Denoiser._forward_sample: every call (Heun's corrector too) is
    unguided when s >= high or (low != 0 and s <= low), s the JiT time on the float32 grid
    linspace(0, 1, steps + 1); generate() ends with one Euler step. The interval is given
    to `sample` in SiT time (jit_interval) and the calls are recorded at the model's s."""
    assert _record_calls(method, steps, jit_interval(*jit_interval_), "jit", jit=True) == want


def test_interval_rule_is_checked():
    with pytest.raises(ValueError, match="interval rule"):
        sample(exact_velocity, torch.randn(2, 1), None, "euler", 2, interval_rule="edm")
