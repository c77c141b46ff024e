"""Samplers for flow models: Euler-Maruyama SDE, Euler and Heun ODE, CFG with an interval.

Convention: SiT time, x_t = (1 - t) x + t e, t = 1 is noise, t = 0 data, and
`velocity_fn(x, t, y) -> v` returns the velocity v = e - x (a model's `(out, hidden)`
tuple is fine too: the first element is used). JiT predicts x at its own time s = 1 - t
(s = 1 data); `velocity_from_x_prediction(x_pred_fn, eps)` wraps it into this convention, so
every model uses the same integrators. Which wrapper a trained model needs is its recipe's
choice (irepa.recipes: `Recipe.velocity_fn`).

Numerics: the grid of times is built in float64 and the state is integrated in float64
(the REPA release does the same); each model call gets the state cast to the noise's
dtype and t as float32. CFG mixes conditional and null-class velocities,
v = v_u + cfg (v_c - v_u), on the model calls the interval rule selects (`guidance_schedule`:
the SiT release's rule or the JiT release's, each exactly as its release decides, ends
included). The score is affine in v, so guiding the velocity equals guiding the SDE drift
as REPA does; JiT's guidance on x_hat equals guidance on v (same denominator).
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import InputError
from .transport import score_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("sde", "euler", "heun")
INTERVAL_RULES = ("sit", "jit")  # whose release decides where CFG is on (see guidance_schedule)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def x_prediction_to_velocity(x_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    """SiT-convention velocity from an x-prediction: v = (x_t - x_hat) / max(t, eps).

    t [B] is SiT time (JiT's s = 1 - t). eps is the recipe's clamp of 1 - s (JiT's T_EPS,
    irepa.recipes.jit), which keeps v finite at the data end.
    """
    tb = t.to(torch.float32).clamp_min(eps).view(-1, *([1] * (x_t.dim() - 1)))
    return ((x_t.float() - x_hat.float()) / tb).to(x_t.dtype)


def velocity_from_x_prediction(x_pred_fn: Callable, eps: float) -> VelocityFn:
    """Wrap a JiT-style `x_pred_fn(z, s, y) -> x_hat` (JiT time s = 1 - t, s = 1 data; a
    `(x_hat, hidden)` tuple is fine) as a SiT-convention `velocity_fn` for `sample`."""
    def velocity_fn(x, t, y):
        return x_prediction_to_velocity(_first(x_pred_fn(x, 1.0 - t, y)), x, t, eps)
    return velocity_fn


def jit_interval(low_s: float, high_s: float) -> tuple[float, float]:
    """A CFG interval given in JiT time s (s = 1 data) as the SiT-time interval `sample` takes;
    sample JiT models with interval_rule="jit" to apply it as the JiT release does."""
    return (1.0 - high_s, 1.0 - low_s)


def guided_velocity(velocity_fn: VelocityFn, x: torch.Tensor, t: float, labels: torch.Tensor | None,
                    cfg: float, guide: bool, null_class: int | None,
                    model_dtype: torch.dtype | None = None) -> torch.Tensor:
    """v(x, t), with classifier-free guidance when `guide` and cfg != 1; float64 out.

    `guide` is the interval rule's decision for this model call (`guidance_schedule`)."""
    xm = x.to(model_dtype or x.dtype)
    tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    if labels is None or cfg == 1.0 or not guide:
        return _first(velocity_fn(xm, tt, labels)).to(torch.float64)
    if null_class is None:
        raise ValueError("cfg != 1 needs null_class (the model's null label index, usually num_classes)")
    both = _first(velocity_fn(torch.cat([xm, xm]), torch.cat([tt, tt]),
                              torch.cat([labels, torch.full_like(labels, null_class)]))).to(torch.float64)
    v_c, v_u = both.chunk(2)
    return v_u + cfg * (v_c - v_u)


def time_grid(method: str, steps: int, t_last: float = 0.04) -> list[float]:
    """The float64 times visited: ODE linspace(1, 0, steps + 1); SDE linspace(1, t_last, steps) + [0]."""
    if method in ("euler", "heun"):
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    if not 0.0 < t_last < 1.0:
        raise ValueError(f"t_last must be in (0, 1), got {t_last}")
    return torch.linspace(1.0, t_last, steps, dtype=torch.float64).tolist() + [0.0]


def check_settings(method: str, steps: int, interval: tuple[float, float] = (0.0, 1.0),
                   interval_rule: str = "sit") -> None:
    """InputError (a ValueError) unless `sample` accepts this method, step count, CFG interval
    and interval rule."""
    if method not in METHODS:
        raise InputError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    least = 2 if method == "sde" else 1
    if steps < least:
        raise InputError(f"the {method} sampler needs at least {least} step{'s' * (least > 1)}, got {steps!r}")
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise InputError(f"CFG interval {','.join(map(str, interval))}: expected LOW,HIGH in SiT time "
                         f"(t = 1 is noise) with 0 <= LOW <= HIGH <= 1")
    if interval_rule not in INTERVAL_RULES:
        raise InputError(f"unknown CFG interval rule {interval_rule!r}; choose one of {', '.join(INTERVAL_RULES)}")


def guidance_schedule(method: str, steps: int, interval: tuple[float, float] = (0.0, 1.0),
                      interval_rule: str = "sit", t_last: float = 0.04) -> list[tuple[bool, bool]]:
    """Where CFG is on: per step k (time_grid[k] -> time_grid[k + 1]), whether the step's model
    call at t_cur is guided and whether Heun's corrector (its call at t_next) is.

    `interval` = (low, high) is in SiT time for both rules.

    "sit", the SiT/REPA/iREPA LDM release (ldm/samplers.py@99ad4ac, euler_sampler and
    euler_maruyama_sampler): guided when low <= t_cur <= high (closed, float64 t_cur); the
    Heun corrector follows the decision made at its step's t_cur, although it calls the
    model at t_next.

    "jit", the JiT release (jit/denoiser.py@99ad4ac, Denoiser._forward_sample): every call
    decides at its own time, in JiT time s = 1 - t on the release's float32 grid
    s_k = linspace(0, 1, steps + 1) (float32(1 - t) on the SDE grid, which JiT lacks), with
    the interval in JiT time (low_s, high_s) = (1 - high, 1 - low) compared in float32:
    unguided when s >= high_s or (low_s != 0 and s <= low_s), i.e. open at both ends except
    that low_s = 0 (high = 1 in SiT time) guides down to s = 0. A JiT-time low_s below 1e-16
    does not survive the round trip through SiT time (1 - (1 - low_s) = 0).
    """
    check_settings(method, steps, interval, interval_rule)
    ts = time_grid(method, steps, t_last)
    low, high = interval
    if interval_rule == "sit":
        on = [low <= t <= high for t in ts]
        return [(on[k], on[k]) for k in range(len(ts) - 1)]
    if method in ("euler", "heun"):
        s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
    else:
        s = torch.tensor([1.0 - t for t in ts], dtype=torch.float64).float()
    low_s, high_s = 1.0 - high, 1.0 - low
    # a float32 tensor against a Python float compares in float32, as the release's t[0] >= high
    off = (s >= high_s) | ((s <= low_s) if low_s != 0 else torch.zeros_like(s, dtype=torch.bool))
    on = (~off).tolist()
    return [(on[k], on[k + 1]) for k in range(len(ts) - 1)]


@torch.no_grad()
def sample(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor | None, method: str = "sde",
           steps: int = 250, cfg: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
           null_class: int | None = None, t_last: float = 0.04,
           generator: torch.Generator | None = None, interval_rule: str = "sit") -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 (data); returns samples in the noise's dtype.

    method "sde": Euler-Maruyama on dx = [v - 0.5 w(t) s] dt + sqrt(w(t)) dW, w(t) = 2t,
    s the score from v, on linspace(1, t_last, steps) (steps - 1 stochastic steps), then
    one noise-free mean step from t_last to 0: `steps` model evaluations (x2 with CFG).
    "euler"/"heun": ODE dx = v dt on linspace(1, 0, steps + 1); Heun skips its corrector on
    the last step (t = 0), so it costs 2 steps - 1 evaluations.
    `generator` drives the SDE noise (on the noise's device).
    `interval_rule`: "sit" for SiT-style models, "jit" for JiT models (`guidance_schedule`).
    The SiT release guides only when cfg > 1 (ldm/samplers.py@99ad4ac: `cfg_scale > 1.0`), so
    under the "sit" rule a cfg below 1 samples unguided; the JiT release guides whenever
    cfg != 1 (jit/denoiser.py@99ad4ac).
    """
    check_settings(method, steps, interval, interval_rule)
    if interval_rule == "sit" and cfg < 1.0:
        cfg = 1.0
    if labels is not None and labels.shape[0] != noise.shape[0]:
        raise ValueError(f"labels [{labels.shape[0]}] and noise [{noise.shape[0]}] disagree on the batch size")

    def vel(x, t, guide):
        return guided_velocity(velocity_fn, x, t, labels, cfg, guide, null_class, noise.dtype)

    ts = time_grid(method, steps, t_last)
    guide = guidance_schedule(method, steps, interval, interval_rule, t_last)
    x = noise.to(torch.float64)
    if method in ("euler", "heun"):
        for t_cur, t_next, (g_cur, g_next) in zip(ts[:-1], ts[1:], guide):
            dt = t_next - t_cur
            d = vel(x, t_cur, g_cur)
            x_next = x + dt * d
            if method == "heun" and t_next > 0:
                x_next = x + dt * 0.5 * (d + vel(x_next, t_next, g_next))
            x = x_next
        return x.to(noise.dtype)

    def drift(x, t, g):
        v = vel(x, t, g)
        tt = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        return v - 0.5 * (2.0 * t) * score_from_velocity(v, x, tt)

    for t_cur, t_next, (g_cur, _) in zip(ts[:-2], ts[1:-1], guide):
        dt = t_next - t_cur  # negative: integrating backwards in time
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(torch.float64)
        x = x + drift(x, t_cur, g_cur) * dt + (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * eps
    t_cur = ts[-2]
    return (x + drift(x, t_cur, guide[-1][0]) * (0.0 - t_cur)).to(noise.dtype)


def model_velocity_fn(model: torch.nn.Module, channels: int | None = None) -> VelocityFn:
    """`velocity_fn` of a SiT-style model whose forward returns (velocity, hidden).

    channels: keep the first C output channels (reference checkpoints with a learned sigma
    output 2C); None = the model's in_channels when it has that attribute, else all.
    """
    c = channels or getattr(model, "in_channels", None)

    def velocity_fn(x, t, y):
        v = _first(model(x, t, y))
        return v[:, :c] if c else v
    return velocity_fn
