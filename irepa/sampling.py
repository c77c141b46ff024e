"""Samplers for flow models: Euler-Maruyama SDE, Euler and Heun ODE, CFG with an interval.

`velocity_fn(x, t, y) -> v` is the model's velocity for the SiT convention (t = 1 noise,
t = 0 data). Time stepping is done in float64 on the host; the state stays in the
noise's dtype/device. CFG mixes conditional and null-class velocities,
v = v_u + cfg (v_c - v_u), only while t lies inside [low, high].
"""
from __future__ import annotations

from typing import Callable

import torch

from .transport import score_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided_velocity(velocity_fn: VelocityFn, x: torch.Tensor, t: float, labels: torch.Tensor,
                    cfg: float, interval: tuple[float, float], null_class: int | None) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    low, high = interval
    if cfg == 1.0 or not (low <= t <= high):
        return velocity_fn(x, tt, labels)
    if null_class is None:
        raise ValueError("cfg != 1 needs null_class (the model's null label index)")
    both = velocity_fn(torch.cat([x, x]), torch.cat([tt, tt]),
                       torch.cat([labels, torch.full_like(labels, null_class)]))
    v_c, v_u = both.chunk(2)
    return v_u + cfg * (v_c - v_u)


@torch.no_grad()
def sample(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor, method: str = "sde",
           steps: int = 250, cfg: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
           null_class: int | None = None, t_last: float = 0.04,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 (data).

    method "sde": Euler-Maruyama on dx = [v - 0.5 w(t) s] dt + sqrt(w(t)) dW with w(t)=2t,
    from t=1 to t_last in `steps - 1` steps, then one noise-free step to 0 (SiT/REPA).
    "euler"/"heun": ODE dx = v dt on linspace(1, 0, steps + 1); Heun skips its corrector on
    the last step (t=0).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    vel = lambda x, t: guided_velocity(velocity_fn, x, t, labels, cfg, interval, null_class)  # noqa: E731
    x = noise
    if method in ("euler", "heun"):
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t_cur
            d = vel(x, t_cur)
            x_next = x + dt * d
            if method == "heun" and t_next > 0:
                x_next = x + dt * 0.5 * (d + vel(x_next, t_next))
            x = x_next
        return x
    if method == "sde":
        if steps < 2:
            raise ValueError("the SDE sampler needs steps >= 2")
        ts = torch.linspace(1.0, t_last, steps, dtype=torch.float64).tolist()
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t_cur  # negative
            tt = torch.full((x.shape[0],), t_cur, dtype=torch.float32, device=x.device)
            v = vel(x, t_cur)
            w = 2.0 * t_cur
            drift = v - 0.5 * w * score_from_velocity(v, x, tt)
            dw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * abs(dt) ** 0.5
            x = x + drift * dt + (w ** 0.5) * dw
        # final noise-free step from t_last to 0 with the probability-flow-free mean drift
        t_cur = ts[-1]
        tt = torch.full((x.shape[0],), t_cur, dtype=torch.float32, device=x.device)
        v = vel(x, t_cur)
        drift = v - 0.5 * (2.0 * t_cur) * score_from_velocity(v, x, tt)
        return x + drift * (0.0 - t_cur)
    raise ValueError(f"unknown sampling method {method!r}; choose 'sde', 'euler' or 'heun'")
