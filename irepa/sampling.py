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
v = v_u + cfg (v_c - v_u), only while the current t lies in [low, high] (SiT time). The
score is affine in v, so guiding the velocity equals guiding the SDE drift as REPA does.
"""
from __future__ import annotations

from typing import Callable

import torch

from .transport import score_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("sde", "euler", "heun")


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
    """A CFG interval given in JiT time s (s = 1 data) as the SiT-time interval `sample` takes."""
    return (1.0 - high_s, 1.0 - low_s)


def guided_velocity(velocity_fn: VelocityFn, x: torch.Tensor, t: float, labels: torch.Tensor | None,
                    cfg: float, interval: tuple[float, float], null_class: int | None,
                    model_dtype: torch.dtype | None = None) -> torch.Tensor:
    """v(x, t) with classifier-free guidance when cfg != 1 and low <= t <= high; float64 out."""
    xm = x.to(model_dtype or x.dtype)
    tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    low, high = interval
    if labels is None or cfg == 1.0 or not (low <= t <= high):
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


def check_settings(method: str, steps: int, interval: tuple[float, float] = (0.0, 1.0)) -> None:
    """ValueError unless `sample` accepts this method, step count and CFG interval."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    if steps < (2 if method == "sde" else 1):
        raise ValueError(f"{method} needs steps >= {2 if method == 'sde' else 1}, got {steps}")
    if len(interval) != 2 or interval[0] > interval[1]:
        raise ValueError(f"CFG interval must be (low, high) with low <= high, got {tuple(interval)}")


@torch.no_grad()
def sample(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor | None, method: str = "sde",
           steps: int = 250, cfg: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
           null_class: int | None = None, t_last: float = 0.04,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 (data); returns samples in the noise's dtype.

    method "sde": Euler-Maruyama on dx = [v - 0.5 w(t) s] dt + sqrt(w(t)) dW, w(t) = 2t,
    s the score from v, on linspace(1, t_last, steps) (steps - 1 stochastic steps), then
    one noise-free mean step from t_last to 0: `steps` model evaluations (x2 with CFG).
    "euler"/"heun": ODE dx = v dt on linspace(1, 0, steps + 1); Heun skips its corrector on
    the last step (t = 0), so it costs 2 steps - 1 evaluations.
    `generator` drives the SDE noise (on the noise's device).
    """
    check_settings(method, steps, interval)
    if labels is not None and labels.shape[0] != noise.shape[0]:
        raise ValueError(f"labels [{labels.shape[0]}] and noise [{noise.shape[0]}] disagree on the batch size")

    def vel(x, t):
        return guided_velocity(velocity_fn, x, t, labels, cfg, interval, null_class, noise.dtype)

    ts = time_grid(method, steps, t_last)
    x = noise.to(torch.float64)
    if method in ("euler", "heun"):
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t_cur
            d = vel(x, t_cur)
            x_next = x + dt * d
            if method == "heun" and t_next > 0:
                x_next = x + dt * 0.5 * (d + vel(x_next, t_next))
            x = x_next
        return x.to(noise.dtype)

    def drift(x, t):
        v = vel(x, t)
        tt = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        return v - 0.5 * (2.0 * t) * score_from_velocity(v, x, tt)

    for t_cur, t_next in zip(ts[:-2], ts[1:-1]):
        dt = t_next - t_cur  # negative: integrating backwards in time
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(torch.float64)
        x = x + drift(x, t_cur) * dt + (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * eps
    t_cur = ts[-2]
    return (x + drift(x, t_cur) * (0.0 - t_cur)).to(noise.dtype)


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
